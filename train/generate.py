"""Speech from a trained CSM: prompt rows, KV-cached frame-by-frame sampling, Mimi decoding to 24 kHz.

Per frame, as Sesame's generator and transformers' `CsmForConditionalGeneration.generate` do: the
backbone's last state predicts codebook 0; the decoder, started from that state and codebook 0,
predicts codebooks 1..N-1 one at a time; the frame goes back into the backbone. Generation stops at
the all-zero (end-of-audio) frame or at the length limit. Greedy (temperature 0) frames equal
transformers' frame for frame (tests/test_train_generate.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from train.config import GenerateConfig
from train.data import MIMI_CODES, segment_rows  # segment_rows: the CLI builds context turns with it
from train.model import CSM, KVCache

log = logging.getLogger(__name__)
SAMPLE_RATE, FRAME_RATE = 24000, 12.5


@dataclass
class Loaded:
    model: CSM
    tokenizer: object
    info: dict  # what was loaded, for the output's sidecar and the log
    allow_unreleased_codec: bool = False  # the run itself trained on the seeded random Mimi's codes
    generate: GenerateConfig = field(default_factory=GenerateConfig)  # the model's own sampling defaults


def load(spec: str, step: int | None = None, tokenizer: str | None = None) -> Loaded:
    """A run directory (its latest or `step` checkpoint), a transformers-format directory or a hub id."""
    from train import checkpoint, data, hf

    if (Path(spec) / "checkpoints").is_dir():
        model, cfg, path = checkpoint.load_run_model(Path(spec), step)
        tok = data.load_tokenizer(tokenizer or cfg.data.tokenizer)
        info = {"model": str(path), "kind": "run", "init_from": cfg.model.init_from, "tokenizer": tokenizer or cfg.data.tokenizer}
        return Loaded(model, tok, info, cfg.data.allow_unreleased_codec, cfg.generate)
    path = hf.resolve(spec, "MODEL")
    name = tokenizer or (str(path) if (path / "tokenizer_config.json").exists() else None)
    if name is None:
        raise ValueError(f"{spec} has no tokenizer files: pass --tokenizer (e.g. meta-llama/Llama-3.2-1B)")
    return Loaded(hf.load_hf_model(path).eval(), data.load_tokenizer(name),
                  {"model": spec, "kind": "transformers", "tokenizer": name}, generate=_hf_sampling(path))


def _hf_sampling(path: Path) -> GenerateConfig:
    """Sampling defaults from a transformers directory's generation_config.json, when it has one."""
    g, file = GenerateConfig(), path / "generation_config.json"
    if not file.exists():
        return g
    saved = json.loads(file.read_text())
    temperature = saved.get("temperature", g.temperature) if saved.get("do_sample") else 0.0
    return dataclasses.replace(g, temperature=temperature, top_k=saved.get("top_k", g.top_k))


def sample_context(shards_dir: str | Path, key: str, tokenizer, num_codebooks: int):
    """Rows of a corpus sample (all its turns, audio and end-of-audio frames), found by its key in a
    corpus or packed corpus directory."""
    from stages.corpus_format import CODES, JSON, Sample
    from train.config import DataConfig
    from train.data import build_rows

    for shard in sorted(Path(shards_dir).rglob("*.tar"), key=lambda p: key.rsplit("-w", 1)[0] not in p.name):
        with tarfile.open(shard) as tar:
            names = set(tar.getnames())
            if f"{key}.{JSON}" in names:
                sample = Sample.from_json(tar.extractfile(f"{key}.{JSON}").read())
                codes = np.load(io.BytesIO(tar.extractfile(f"{key}.{CODES}").read()), allow_pickle=False)
                return build_rows(sample, codes, tokenizer, DataConfig(seq_len=10**9), num_codebooks)
    raise FileNotFoundError(f"context sample {key}: not in any shard under {shards_dir}")


def prompt_rows(tokenizer, text: str, contexts: list[tuple[np.ndarray, np.ndarray]], num_codebooks: int,
                room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Context rows (oldest first), then the text rows of `text` ("[speaker]words"). The oldest
    context turns are dropped until the prompt leaves `room` positions."""
    target = segment_rows(tokenizer, text, None, num_codebooks)
    parts = list(contexts)
    while parts and sum(len(t) for t, _ in parts) + len(target[0]) > room:
        log.warning("context too long for the model's max_seq_len: dropping its oldest part")
        parts.pop(0)
    if len(target[0]) > room:
        raise ValueError(f"text of {len(target[0])} rows does not fit the {room} positions left")
    parts.append(target)
    return torch.from_numpy(np.concatenate([t for t, _ in parts])), torch.from_numpy(np.concatenate([m for _, m in parts]))


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _decode_frame(model: CSM, h: torch.Tensor, cache: KVCache, temperature, top_k, generator) -> torch.Tensor:
    """Codebooks 0..N-1 of one frame from the backbone state h [1, D]."""
    cache.reset()
    code = _pick(model.codebook0_head(h), temperature, top_k, generator)
    codes = [code]
    x = torch.stack([h, model.audio_embeddings(code + model.audio_offsets[0])], dim=1)
    for k in range(1, model.N):
        out = model.decoder(model.projection(x), cache)[:, -1]
        code = _pick(out @ model.audio_head[k - 1], temperature, top_k, generator)
        codes.append(code)
        x = model.audio_embeddings(code + model.audio_offsets[k])[:, None]
    return torch.cat(codes)


@torch.no_grad()
def generate_frames(model: CSM, tokens: torch.Tensor, mask: torch.Tensor, max_frames: int,
                    temperature: float = 0.0, top_k: int = 0, seed: int | None = None) -> tuple[torch.Tensor, bool]:
    """Frames [F, N] after the prompt rows (tokens/mask [T, N+1]), the end-of-audio frame included when
    generation stopped on it; returns (frames, stopped on end-of-audio)."""
    N, device = model.N, tokens.device
    T = len(tokens)
    if T + max_frames > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {T} rows + {max_frames} frames > model max_seq_len {model.cfg.max_seq_len}")
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    dtype = model.codebook0_head.weight.dtype
    backbone = KVCache(model.backbone.args, 1, T + max_frames, dtype, device)
    decoder = KVCache(model.decoder.args, 1, N, dtype, device)
    h = model.backbone(model.embed(tokens[None], mask[None]), backbone)[:, -1]
    row_mask = torch.zeros(1, 1, N + 1, dtype=torch.bool, device=device)
    row_mask[..., :N] = True
    frames = []
    while len(frames) < max_frames:
        frame = _decode_frame(model, h, decoder, temperature, top_k, generator)
        frames.append(frame)
        if not frame.any():
            return torch.stack(frames), True
        row = torch.zeros(1, 1, N + 1, dtype=torch.long, device=device)
        row[0, 0, :N] = frame
        h = model.backbone(model.embed(row, row_mask), backbone)[:, -1]
    return torch.stack(frames), False


def load_codec(num_codebooks: int, allow_unreleased: bool, weights: str | None = None):
    """The pipeline's Mimi (stages.tokenize.load_mimi): released weights, or the seeded random one
    only when allowed (it warns loudly); returns (model, identity)."""
    from stages.tokenize import TokenizeConfig, load_mimi, use_whole_clip_encoder

    from stages.tokenize import CodecUnavailable

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with torch.random.fork_rng(devices=[]):  # load_mimi seeds the global RNG for the random Mimi
            model, identity = load_mimi(TokenizeConfig(weights=weights, num_codebooks=num_codebooks,
                                                       allow_unreleased=allow_unreleased), device)
    except CodecUnavailable as e:
        raise RuntimeError(f"{e} Here: `pipeline generate --mimi FILE` or generate.mimi (trainer), or "
                           "--allow-unreleased-codec for the seeded random Mimi.") from e
    return use_whole_clip_encoder(model), identity


@torch.no_grad()
def decode_audio(codec, frames: torch.Tensor) -> np.ndarray:
    """Frames [F, N] (no end-of-audio frame) -> 24 kHz mono float32."""
    if len(frames) == 0:
        return np.zeros(0, np.float32)
    device = next(codec.parameters()).device
    special = frames >= MIMI_CODES  # the model's vocabulary has 3 codes past Mimi's; they decode as 0
    if special.any():
        log.warning("%d generated codes are specials (>= %d) Mimi cannot decode: decoded as 0", int(special.sum()), MIMI_CODES)
    audio = codec.decode(frames.masked_fill(special, 0).T[None].long().to(device))
    return audio[0, 0].float().cpu().numpy()


def encode_wav(codec, path: str) -> np.ndarray:
    """A wav file (any rate, mixed to mono) -> codes [N, frames]."""
    import soundfile as sf
    from scipy.signal import resample_poly

    from stages.tokenize import encode_batch

    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(1)
    if rate != SAMPLE_RATE:
        g = np.gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return encode_batch(codec, [audio], str(next(codec.parameters()).device))[0].astype(np.int64)


def synthesize(loaded: Loaded, text: str, contexts: list[tuple[np.ndarray, np.ndarray]], g: GenerateConfig,
               codec=None) -> dict:
    """Frames and (with a codec) audio for `text` after `contexts`; timings included."""
    model = loaded.model
    max_frames = max(1, round(g.max_seconds * FRAME_RATE))
    tokens, mask = prompt_rows(loaded.tokenizer, text, contexts, model.N, model.cfg.max_seq_len - max_frames)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    frames, stopped = generate_frames(model, tokens.to(device), mask.to(device), max_frames, g.temperature, g.top_k, g.seed)
    dt = time.perf_counter() - t0
    audio_frames = frames[:-1] if stopped else frames
    out = {"text": text, "frames": frames.cpu(), "stopped": "end-of-audio" if stopped else "length limit",
           "prompt_rows": len(tokens), "seconds": len(audio_frames) / FRAME_RATE,
           "frames_per_s": len(frames) / dt if dt > 0 else float("inf")}
    if codec is not None:
        out["audio"] = decode_audio(codec, audio_frames)
    return out


def write_wav(path: str | Path, result: dict, meta: dict) -> Path:
    """The wav (16-bit, 24 kHz) and a sidecar PATH.json saying what made it."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), result["audio"], SAMPLE_RATE, subtype="PCM_16")
    keep = {k: v for k, v in result.items() if k not in ("audio", "frames")}
    path.with_suffix(path.suffix + ".json").write_text(json.dumps({**keep, **meta, "sample_rate": SAMPLE_RATE,
                                                                  "num_frames": len(result["frames"])}, indent=1))
    return path
