"""tokenize: Mimi (package `moshi`) codes for every utterance, 32 codebooks at 12.5 Hz.

Each utterance is encoded on its own (as CSM expects), in batches padded at the end: Mimi's
encoder is causal, so end padding cannot change an utterance's own frames (a test checks this).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from stages.base import Resources, Stage
from stages.hub import hub_available, hub_file
from stages.overrides import ConfigError
from stages.overrides import require, require_resources
from stages.records import CODEC_RATE, Chunk

log = logging.getLogger(__name__)
FRAME_SAMPLES = 1920  # 24 kHz / 12.5 Hz
RANDOM_SEED = 1234
# moshi.models.loaders' DEFAULT_REPO and MIMI_NAME (tests/test_models.py checks they agree), named
# here so that preflight, in the driver, does not import moshi and torch: 1.1 s before Ray starts.
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
# WholeClipEncoder tiles the SEANet encoder's layers before this index: the 24 kHz, 6 kHz and 1.2 kHz
# ones, up to the stride-6 conv.
TILED_LAYERS = 9


class CodecUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class TokenizeConfig:
    weights: str | None = None  # local Mimi safetensors; None: the hub (kyutai/moshiko-pytorch-bf16)
    num_codebooks: int = 32
    allow_unreleased: bool = False  # use a deterministic randomly initialised Mimi if the weights are missing
    # Audio per encoder call (a padded batch). None: 4 s on CPU, where a batch only adds memory
    # traffic: utterances of 4 x 30 s conversations, one thread, 8.1x real time with 4 s, 6.8x with
    # 15 s, 6.2x with 30 s (and 4.3x with 120 s on a 300 s chunk, at twice the memory); 120 s on GPU,
    # where batching is what fills it. The codes do not depend on it (causal encoder, end padding).
    batch_seconds: float | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    actors: int | None = None  # pool size when unfused; None: grows with the backlog, up to what fits
    memory_gb: float = 1.2  # Mimi 0.45 GB + batches of up to 15 s 0.8 GB measured (120 s batches: 3 GB more)
    # bf16 autocast (CUDA). Off: on an H200 fp32 already encodes 2700-5300x real time at batch
    # 8-32 and bf16 gains only 1.06-1.35x (bench/gpu_check.sh), while its codes differed from fp32's
    # at 30-40 % of positions (random-init Mimi; unmeasured with the released weights).
    bf16: bool = False
    # Clips longer than this go through the encoder's first layers in tiles of it (WholeClipEncoder).
    # None: 1 s on CPU (1.4x faster on 16-32 s clips, one thread), whole clips on GPU; 0: whole clips.
    tile_seconds: float | None = None

    def __post_init__(self):
        require(1 <= self.num_codebooks <= 32, "num_codebooks", f"must be in [1, 32] (Mimi has 32), got {self.num_codebooks}")
        require(self.batch_seconds is None or self.batch_seconds > 0, "batch_seconds", f"must be > 0 or null, got {self.batch_seconds}")
        require(self.tile_seconds is None or self.tile_seconds == 0 or self.tile_seconds >= 0.08, "tile_seconds",
                f"must be 0 (whole clips), at least one frame (0.08 s) or null, got {self.tile_seconds}")
        require_resources(self)


def load_mimi(config: TokenizeConfig, device: str):
    """Returns (model, identity). Released weights from a local file or the hub; otherwise, only when
    allowed, a seeded random Mimi whose identity says so (never a silent fallback)."""
    import torch
    from moshi.models import loaders

    path, error = config.weights, None
    if path is None:
        try:
            path = hub_file(MIMI_REPO, MIMI_FILE)
        except Exception as exc:  # offline, gated, no network
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if path is not None:
        model = loaders.get_mimi(path, device=device, num_codebooks=config.num_codebooks)
        return model.eval(), {"weights": str(path), "released": True}
    if not config.allow_unreleased:
        raise CodecUnavailable(
            f"Mimi weights not found ({MIMI_REPO}/{MIMI_FILE}: {error}). "
            "Set tokenize.weights to a local copy of the file, or tokenize.allow_unreleased=true "
            "to use a randomly initialised Mimi (codes only fit for testing the plumbing)."
        )
    log.warning(
        "!!! Mimi released weights unavailable (%s): using a RANDOMLY INITIALISED Mimi (seed %d). "
        "The codes are deterministic but meaningless; samples are marked codec.released=false. !!!",
        error, RANDOM_SEED,
    )
    torch.manual_seed(RANDOM_SEED)
    model = loaders.get_mimi(None, device=device, num_codebooks=config.num_codebooks).eval()
    init_codebooks(model, seed=RANDOM_SEED)
    import moshi

    return model, {"weights": f"random-init(seed={RANDOM_SEED}, moshi {moshi.__version__})", "released": False}


def init_codebooks(model, seed: int) -> None:
    """Give an unloaded Mimi codebooks drawn from its own latents, so codes vary with the audio.

    Built without weights, every codebook is uninitialised and every code is 0. We encode a fixed
    calibration signal once, then walk each residual quantizer layer by layer: a layer's codebook is
    drawn from a normal with the per-dimension mean and spread of the residual that layer actually
    receives (what the earlier layers leave over).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    t = torch.arange(CODEC_RATE * 2) / CODEC_RATE  # 25 frames: each worker encodes it at start-up (8 s took 1 s)
    envelope = (torch.sin(2 * math.pi * 3 * t) > 0).float()  # bursts and pauses, speech-like rhythm
    calib = envelope * (0.3 * torch.sin(2 * math.pi * 150 * t * (1 + t / 2)) + 0.1 * torch.randn(t.shape, generator=g))
    device = next(model.parameters()).device
    with torch.no_grad():
        latent = model._encode_to_unquantized_latent(calib[None, None].to(device))
        for rvq in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
            residual = rvq.input_proj(latent)
            for layer in rvq.vq.layers:
                book = layer._codebook
                x = layer.project_in(layer._rearrange_input(residual))  # what the codebook sees
                x = x.reshape(-1, x.shape[-1]).float()
                emb = x.mean(0) + x.std(0) * torch.randn(book.embedding_sum.shape, generator=g).to(device)
                book.embedding_sum.data.copy_(emb)
                book.cluster_usage.data.fill_(1.0)
                book._initialized.data.fill_(1.0)
                book._cached_initialized = False
                book._embedding = None
                residual = residual - layer.decode(layer.encode(residual))


class WholeClipEncoder:
    """Mimi's SEANet encoder run on whole clips, without the streaming machinery.

    moshi's StreamingConv1d gives every conv its causal left padding by concatenating a zero state
    onto the input, even outside streaming: a full copy of every activation, 64 channels at 24 kHz
    in the first layers. Here the convolution pads inside oneDNN (on both sides) and the surplus
    outputs at the tail (at most kernel - stride) are dropped. Same weights, same sums: a whole
    clip's codes are bit-identical to moshi's (a test checks it) and Mimi runs 1.2x faster on one
    CPU thread.

    Clips longer than `tile` samples pass through the first TILED_LAYERS layers (24 kHz down to
    1.2 kHz) in tiles, depth first: a tile goes through those layers while its activations are
    still in cache (a 30 s clip's first layers are 184 MB each), and each conv takes the inputs its
    first outputs need from the tile before. On one CPU thread Mimi encodes 16-32 s clips 1.4x
    faster with 1 s tiles (7.6x -> 10.8x real time). The deeper layers (200 Hz and 25 Hz) take the
    whole clip at once: their activations are small, while their weights are not (the 512 -> 1024
    conv's are 33 MB), and tiled they were read again for every tile, plus a fix-up convolution per
    tile too small for oneDNN that PyTorch's slow path ran in 2-12 ms; 1.12-1.14x faster on speech
    clips of 0.3-30 s. The sums are the same but oneDNN groups them differently at other widths, so
    the latent equals moshi's to float rounding (2.5e-7), not bit for bit: on 12 speech clips of
    6-28 s, 0 of 81600 codes differed with 1 s tiles (31 with 2 s tiles). Tiles are fixed and
    batches are formed the same way every time, so a rerun or a resume still writes the same bytes.
    Installed as the encoder's forward by `use_whole_clip_encoder`; a streaming call goes to moshi's.
    """

    def __init__(self, encoder, tile: int | None = None):
        import torch
        import torch.nn.functional as F
        from moshi.modules.conv import StreamingConv1d
        from moshi.modules.seanet import SEANetResnetBlock
        from torch import nn

        self.encoder, self.moshi_forward, self.tile = encoder, encoder.forward, tile
        self.head, self.tail = encoder.model[:TILED_LAYERS], encoder.model[TILED_LAYERS:]
        self.torch, self.conv1d, self.conv_type, self.block_type, self.nn = torch, F.conv1d, StreamingConv1d, SEANetResnetBlock, nn

    def __call__(self, x):
        if self.encoder._streaming_state is not None:
            return self.moshi_forward(x)
        if not self.tile or x.shape[-1] <= self.tile:
            return self._run(self.encoder.model, x, None)
        states: dict = {}  # conv layer -> the last inputs of the previous tile
        tiles = [self._run(self.head, x[..., i : i + self.tile], states) for i in range(0, x.shape[-1], self.tile)]
        return self._run(self.tail, self.torch.cat(tiles, -1), None)

    def _run(self, layer, x, states):
        nn = self.nn
        if isinstance(layer, nn.Sequential):
            for sub in layer:
                x = self._run(sub, x, states)
            return x
        if isinstance(layer, self.conv_type):
            conv, stride, pad = layer.conv.conv, layer._stride, layer._padding_total
            args = (conv.weight, conv.bias, stride)
            y = self.conv1d(x, *args, pad, conv.dilation, conv.groups)[..., : x.shape[-1] // stride]  # moshi asserts the length is a multiple of the stride
            if states is not None and pad:
                prev = states.get(layer)
                if prev is not None:  # the first outputs see the previous tile, not zero padding
                    first = -(-pad // stride)
                    y[..., :first] = self.conv1d(self.torch.cat([prev, x[..., : first * stride]], -1), *args, 0, conv.dilation, conv.groups)
                states[layer] = (x if prev is None or x.shape[-1] >= pad else self.torch.cat([prev, x], -1))[..., -pad:]
            return y
        if isinstance(layer, self.block_type):
            return self._run(layer.shortcut, x, states) + self._run(layer.block, x, states)
        if isinstance(layer, (nn.ELU, nn.Identity)):
            return layer(x)
        raise TypeError(f"unexpected layer in Mimi's encoder: {type(layer).__name__}")


def encoder_tile_seconds(config: TokenizeConfig, device: str) -> float:
    """The encoder's tile: config.tile_seconds, or by default 1 s on CPU and whole clips (0) on GPU."""
    return (1.0 if device == "cpu" else 0.0) if config.tile_seconds is None else config.tile_seconds


def use_whole_clip_encoder(model, tile_seconds: float | None = None):
    """Put WholeClipEncoder in place of `model.encoder`'s forward (this model instance only), with
    tiles of `tile_seconds` (rounded to whole frames) for longer clips; None or 0: whole clips."""
    from moshi.modules.conv import StreamingConv1d

    if any(isinstance(m, StreamingConv1d) and m.pad_mode != "constant" for m in model.encoder.modules()):
        return model  # replicate padding would need the copy anyway: moshi's own path
    tile = round(tile_seconds * CODEC_RATE / FRAME_SAMPLES) * FRAME_SAMPLES if tile_seconds else None
    model.encoder.forward = WholeClipEncoder(model.encoder, tile or None)
    return model


def encode_batch(model, clips: list[np.ndarray], device: str, bf16: bool = False) -> list[np.ndarray]:
    """Codes int16 [K, ceil(len/1920)] for each 24 kHz mono clip, in one padded forward pass;
    under bf16 autocast when `bf16`."""
    import torch

    longest = max(len(c) for c in clips)
    batch = np.zeros((len(clips), 1, longest), np.float32)
    for i, c in enumerate(clips):
        batch[i, 0, : len(c)] = c
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        codes = model.encode(torch.from_numpy(batch).to(device)).cpu().numpy()
    return [codes[i, :, : math.ceil(len(c) / FRAME_SAMPLES)].astype(np.int16) for i, c in enumerate(clips)]


class TokenizeStage(Stage):
    name = "tokenize"

    def resources(self) -> Resources:
        c = self.config
        return Resources(cpus=c.cpus, gpus=c.gpus, actors=c.actors, memory_gb=c.memory_gb, uses_model=True)

    def preflight(self) -> None:
        c = self.config
        if c.weights is not None:
            if "://" not in c.weights and not os.path.isfile(c.weights):
                raise ConfigError(f"tokenize.weights: {c.weights} is not a file (the Mimi safetensors, {MIMI_FILE})")
        elif not hub_available(MIMI_REPO, MIMI_FILE) and not c.allow_unreleased:
            raise ConfigError(
                f"tokenize.weights: the released Mimi weights ({MIMI_REPO}/{MIMI_FILE}) are not cached "
                "and the hub is unreachable: set tokenize.weights to a local copy of the file, or "
                "tokenize.allow_unreleased=true for a randomly initialised Mimi (codes only fit for testing the plumbing)")

    def setup(self) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model, self.identity = load_mimi(self.config, self.device)
        self.tile_seconds = encoder_tile_seconds(self.config, self.device)
        self.model = use_whole_clip_encoder(model, self.tile_seconds)

    def describe(self) -> dict:
        return {
            "name": "mimi",
            "num_codebooks": self.config.num_codebooks,
            "frame_rate": 12.5,
            "sample_rate": CODEC_RATE,
            **({"bf16": True} if self.config.bf16 else {}),
            **({"tile_seconds": self.tile_seconds} if getattr(self, "tile_seconds", 0) else {}),
            **getattr(self, "identity", {}),
        }

    def process(self, chunk: Chunk) -> Chunk:
        utts = [u for w in chunk.windows for u in w.utterances]
        clips = [chunk.codec_audio(u.start, u.end) for u in utts]
        codes: list[np.ndarray | None] = [None] * len(clips)
        # Similar lengths together keep padding small.
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        seconds = self.config.batch_seconds
        budget = int((seconds if seconds is not None else 120.0 if self.device == "cuda" else 4.0) * CODEC_RATE)
        batch: list[int] = []
        for i in order + [None]:
            if batch and (i is None or len(clips[i]) * (len(batch) + 1) > budget):
                for j, c in zip(batch, encode_batch(self.model, [clips[j] for j in batch], self.device, self.config.bf16)):
                    codes[j] = c
                batch = []
            if i is not None:
                batch.append(i)
        it = iter(codes)
        for w in chunk.windows:
            parts, begin = [], 0
            for u in w.utterances:
                c = next(it)
                u.frames = (begin, begin + c.shape[1])
                begin += c.shape[1]
                parts.append(c)
            w.codes = np.concatenate(parts, axis=1)
        chunk.codec = self.describe()
        return chunk

