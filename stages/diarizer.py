"""The diarizer models behind the diarize stage (stages/diarize.py), built from pyannote.audio's
public API: a pretrained pipeline from the hub or a local directory, or the offline one (the
pyannote segmentation model shipped in whisperx plus the resemblyzer GE2E speaker encoder, with
agglomerative clustering). Heavy imports stay inside the functions: only setup() and tests call them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.records import ANALYSIS_RATE, Turn

if TYPE_CHECKING:
    from stages.diarize import DiarizeConfig

COMMUNITY_PIPELINE = "pyannote/speaker-diarization-community-1"
OFFLINE_NAME = "offline-pyannote-segmentation+resemblyzer"


def annotation_to_turns(annotation, offset: float) -> list[Turn]:
    """pyannote Annotation (chunk times) -> turns in source times, original labels."""
    return [
        Turn(offset + float(seg.start), offset + float(seg.end), str(label))
        for seg, _, label in annotation.itertracks(yield_label=True)
    ]


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_TOKEN") or None


def default_segmentation_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("whisperx")
    if spec is None or not spec.origin:
        raise RuntimeError("whisperx is not installed: set diarize.segmentation_model to a pyannote segmentation checkpoint")
    return str(Path(spec.origin).parent / "assets" / "pytorch_model.bin")


def default_encoder_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.origin:
        raise RuntimeError("resemblyzer is not installed: set diarize.speaker_encoder to its pretrained.pt")
    return str(Path(spec.origin).parent / "pretrained.pt")


def resemblyzer_embedding_model(weights: str | None = None):
    """The resemblyzer GE2E encoder as a pyannote `Model`, so `SpeakerDiarization(embedding=...)`
    accepts it through its public constructor (pyannote wraps any Model instance in its
    `PyannoteAudioPretrainedSpeakerEmbedding`, which calls `model(waveforms, weights=masks)`)."""
    import torch
    from pyannote.audio import Model
    from resemblyzer import VoiceEncoder
    from resemblyzer.audio import wav_to_mel_spectrogram
    from resemblyzer.hparams import audio_norm_target_dBFS, partials_n_frames

    class ResemblyzerEmbedding(Model):
        # Masked speech shorter than this gives NaN (pyannote then ignores the pair in clustering).
        MIN_FRAMES = 20  # 0.2 s of 10 ms mel frames
        PARTIAL_STEP = 80  # 50 % overlap between 1.6 s partials (resemblyzer uses ~1.3 per second)

        def __init__(self, weights_fpath: str | None = None):
            super().__init__(sample_rate=ANALYSIS_RATE, num_channels=1)
            self.encoder = VoiceEncoder(device="cpu", verbose=False, weights_fpath=weights_fpath)

        @property
        def dimension(self) -> int:
            return int(self.encoder.linear.out_features)

        def _partials(self, wav: np.ndarray, mask: np.ndarray | None, raw_mel) -> np.ndarray | None:
            """Mel frames of the masked speech cut into 1.6 s partials ([n, 160, 40]) or None.
            `raw_mel()`: the mel spectrogram of `wav` as it is (computed once per window)."""
            if mask is not None:
                # speech samples of this local speaker, for resemblyzer's volume normalisation
                idx = np.minimum((np.arange(len(wav)) * len(mask)) // len(wav), len(mask) - 1)
                sample_mask = mask[idx] > 0.5
            else:
                sample_mask = np.ones(len(wav), bool)
            if sample_mask.sum() < self.MIN_FRAMES * 160:
                return None
            rms = np.sqrt(np.mean(np.square(wav[sample_mask], dtype=np.float64)))
            if rms <= 1e-8:
                return None
            gain = 10 ** (audio_norm_target_dBFS / 20) / rms
            # A power mel spectrogram scales with gain squared: one per window, whichever speaker's gain.
            mel = raw_mel() * np.float32(gain * gain)  # [frames, 40]
            if mask is not None:
                fidx = np.minimum((np.arange(len(mel)) * len(mask)) // len(mel), len(mask) - 1)
                mel = mel[mask[fidx] > 0.5]
            n = len(mel)
            if n < self.MIN_FRAMES:
                return None
            if n < partials_n_frames:  # too short for one partial: repeat the speech
                mel = np.tile(mel, (int(np.ceil(partials_n_frames / n)), 1))[:partials_n_frames]
                n = partials_n_frames
            starts = list(range(0, n - partials_n_frames + 1, self.PARTIAL_STEP))
            if starts[-1] + partials_n_frames < n:  # cover the tail
                starts.append(n - partials_n_frames)
            return np.stack([mel[s : s + partials_n_frames] for s in starts])

        def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
            wavs = waveforms[:, 0].detach().cpu().numpy()
            masks = None if weights is None else weights.detach().cpu().numpy()
            # pyannote sends each window once per local speaker: the mel is computed once per window
            # (106 instead of 181 mel spectrograms on a 120 s chunk).
            window = list(range(len(wavs)))  # row -> the first row holding the same waveform
            for i in range(1, len(wavs)):
                if np.array_equal(wavs[i], wavs[i - 1]):
                    window[i] = window[i - 1]
            mels: dict[int, np.ndarray] = {}

            def raw_mel(i: int) -> np.ndarray:
                if window[i] not in mels:
                    mels[window[i]] = wav_to_mel_spectrogram(wavs[window[i]])
                return mels[window[i]]

            parts = [self._partials(w, None if masks is None else masks[i], lambda i=i: raw_mel(i)) for i, w in enumerate(wavs)]
            out = torch.full((len(wavs), self.dimension), float("nan"), device=waveforms.device)
            if not any(p is not None for p in parts):
                return out
            batch = torch.from_numpy(np.concatenate([p for p in parts if p is not None])).to(waveforms.device)
            partial_embeds = self.encoder(batch)  # [n_partials, 256], L2-normalised
            k = 0
            for i, p in enumerate(parts):
                if p is None:
                    continue
                e = partial_embeds[k : k + len(p)].mean(dim=0)
                out[i] = e / e.norm()
                k += len(p)
            return out

    return ResemblyzerEmbedding(weights)


def build_offline_pipeline(config: DiarizeConfig):
    """pyannote's SpeakerDiarization with whisperx's segmentation model and resemblyzer, built
    only through public arguments (Model instances, a PLDA instance) and `instantiate`."""
    from pyannote.audio import Model
    from pyannote.audio.core.plda import PLDA
    from pyannote.audio.pipelines import SpeakerDiarization

    class NoPLDA(PLDA):
        # The constructor insists on a PLDA (its default is a hub download); only VBx clustering
        # uses it, and we cluster agglomeratively.
        def __init__(self):
            pass

    segmentation = Model.from_pretrained(config.segmentation_model or default_segmentation_path(), strict=False)
    if segmentation is None:
        raise RuntimeError(f"could not load segmentation model {config.segmentation_model!r}: set diarize.segmentation_model")
    pipeline = SpeakerDiarization(
        segmentation=segmentation,
        segmentation_step=config.segmentation_step,
        embedding=resemblyzer_embedding_model(config.speaker_encoder or default_encoder_path()),
        embedding_exclude_overlap=config.embedding_exclude_overlap,
        plda=NoPLDA(),
        clustering="AgglomerativeClustering",
        embedding_batch_size=config.batch_size,
        segmentation_batch_size=config.batch_size,
    )
    params: dict[str, Any] = {
        "clustering": {
            "method": "centroid",
            "min_cluster_size": config.min_cluster_size,
            "threshold": config.threshold,
        },
        "segmentation": {"min_duration_off": config.min_duration_off},
    }
    if not segmentation.specifications.powerset:
        params["segmentation"]["threshold"] = config.segmentation_threshold
    pipeline.instantiate(params)
    return pipeline


class PipelineUnavailable(RuntimeError):
    pass


def load_pretrained_pipeline(pipeline: str, token: str | None = None):
    """A pyannote pipeline from a hub id or a local directory / config.yaml, or a clear error."""
    from pyannote.audio import Pipeline

    hint = (
        f"could not load the diarization pipeline {pipeline!r}. Set diarize.pipeline to a local "
        f"directory holding the pipeline's config.yaml and model folders (e.g. a snapshot of "
        f"{COMMUNITY_PIPELINE}), or make the hub reachable with a token in HF_TOKEN that has "
        f"accepted the model's conditions, or set diarize.pipeline to null for the offline diarizer"
    )
    local = os.path.exists(pipeline)
    try:
        loaded = Pipeline.from_pretrained(pipeline, token=None if local else token)
    except Exception as exc:  # hub errors come in many types (offline, gated, 404)
        # never echo the token; the original error type is enough to debug
        raise PipelineUnavailable(f"{hint} ({type(exc).__name__})") from exc
    if loaded is None:
        raise PipelineUnavailable(hint)
    return loaded


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def pipeline_identity(config: DiarizeConfig) -> dict[str, Any]:
    if config.pipeline:
        return {"name": "pyannote-pipeline", "pipeline": config.pipeline, "pyannote.audio": _version("pyannote.audio")}
    return {
        "name": OFFLINE_NAME,
        "pyannote.audio": _version("pyannote.audio"),
        "whisperx": _version("whisperx"),
        "resemblyzer": _version("resemblyzer"),
        "segmentation_model": config.segmentation_model or "whisperx/assets/pytorch_model.bin",
        "speaker_encoder": config.speaker_encoder or "resemblyzer/pretrained.pt",
        "clustering": "AgglomerativeClustering(centroid)",
        "threshold": config.threshold,
        "segmentation_threshold": config.segmentation_threshold,
        "min_cluster_size": config.min_cluster_size,
        "segmentation_step": config.segmentation_step,
        "embedding_exclude_overlap": config.embedding_exclude_overlap,
    }


def diarize_waveform(pipeline, mono: np.ndarray, offset: float, config: DiarizeConfig, uri: str = "chunk"):
    """Run a pyannote pipeline on an in-memory 16 kHz mono waveform.

    Returns (turns with the pipeline's labels in source times, {label: centroid} or {})."""
    import torch

    waveform = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))[None]
    kwargs = {k: v for k, v in (("min_speakers", config.min_speakers), ("max_speakers", config.max_speakers)) if v}
    out = pipeline({"waveform": waveform, "sample_rate": ANALYSIS_RATE, "uri": uri}, **kwargs)
    annotation = getattr(out, "speaker_diarization", out)  # pyannote 4 output or legacy Annotation
    turns = annotation_to_turns(annotation, offset)
    centroids = {}
    emb = getattr(out, "speaker_embeddings", None)
    if emb is not None:
        centroids = {str(label): np.asarray(emb[i]) for i, label in enumerate(annotation.labels()) if i < len(emb)}
    return turns, centroids
