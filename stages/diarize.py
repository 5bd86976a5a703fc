"""diarize: who spoke when, as `Turn`s in source seconds.

Two ways to get speakers:
- channels: a call recording with one speaker per channel. The channels *are* the speakers, so
  turns come straight from per-channel VAD; detected from how little the channels' speech overlaps
  and how uncorrelated the signals are (a stereo mix of one conversation has both high).
- diarization on the mono mix with pyannote.audio's `SpeakerDiarization`:
  * `pipeline` set (hub id such as `pyannote/speaker-diarization-community-1`, or a local
    directory with `config.yaml`): that pipeline, token from HF_TOKEN / HUGGINGFACE_TOKEN;
  * `pipeline` unset: an offline diarizer (stages/diarizer.py) built from what installs from the package index, the
    pyannote segmentation model shipped in whisperx plus the resemblyzer GE2E speaker encoder,
    wired through pyannote's own public constructor (a `Model` instance as `embedding`) with
    agglomerative clustering.

Labels are "S0", "S1", ... in order of first speech within the chunk. Chunks of one source are
diarized independently (a window never spans two chunks), so labels are consistent within a
chunk; the speaker centroids (`chunk.speaker_embeddings`) and speech seconds go into the chunk's
commit record, from which the driver links the chunks of a source into one labelling
(stages/speakers.py, `link_chunks`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.base import Resources, Stage
from stages.overrides import ConfigError, require, require_between, require_resources
from stages.diarizer import build_offline_pipeline, diarize_waveform, hub_token, load_pretrained_pipeline, pipeline_identity
from stages.records import Chunk, Region, Turn


@dataclass(frozen=True)
class DiarizeConfig:
    # Hub id or local directory of a pyannote pipeline (production: diarizer.COMMUNITY_PIPELINE).
    # None: the offline diarizer (whisperx's pyannote segmentation + resemblyzer).
    pipeline: str | None = None
    # Offline diarizer, tuned with bench/bench_diarize.py on pyannote's sample (telephone, 30 s and
    # repeated to 2 min) and synthetic two-voice conversations (30 s, 2 min). `threshold` is the
    # distance at which centroid linkage stops merging, Euclidean between unit-normalised
    # embeddings (pyannote's AgglomerativeClustering; sqrt(2 x cosine distance) for two single
    # embeddings, so 0.46 is a cosine distance of about 0.11). 0.46-0.48 is right on every set;
    # 0.44 splits a synthetic voice, 0.50 merges the 2-min sample's two telephone voices (0.52 on
    # 30 s). 0.46: longer audio moved the merge edge down, not the split edge.
    threshold: float = 0.46
    segmentation_threshold: float = 0.5  # onset of the multi-label segmentation model
    # In (window, local speaker) embeddings; smaller clusters join the nearest large one. pyannote
    # caps it at 10 % of the embeddings, so on short audio it acts like ~8; 20 (pyannote's maximum)
    # keeps spurious clusters out of longer audio (2-min sample: DER 0.139 with 8, 0.110 with 20).
    min_cluster_size: int = 20
    # Hop of the 5 s segmentation window, as a fraction of it (offline diarizer). 0.2 against 0.1:
    # DER on the seven bench sets equal or lower (sample 0.029/0.027, sample x4 0.095/0.110,
    # synthetic 0.000-0.015 both) at 3.2 instead of 7.4 CPU-s per minute of audio.
    segmentation_step: float = 0.2
    # embed only frames where one local speaker talks: best single point (sample 0.013) but a
    # narrower good range of thresholds, so off
    embedding_exclude_overlap: bool = False
    segmentation_model: str | None = None  # None: whisperx/assets/pytorch_model.bin
    speaker_encoder: str | None = None  # None: resemblyzer/pretrained.pt
    min_duration_off: float = 0.0  # fill gaps shorter than this inside one speaker's turn
    min_speakers: int | None = None
    max_speakers: int | None = None
    batch_size: int = 32
    # Channels: "auto" decides per chunk; True/False force it.
    channels_as_speakers: str | bool = "auto"
    max_channel_overlap: float = 0.3  # speech on >1 channel / speech on any channel
    max_channel_correlation: float = 0.5  # |Pearson| of the channels' samples
    min_channel_speech: float = 1.0  # seconds of speech each of two channels must have
    # One labelling per source (stages/speakers.py): when a source's last chunk commits, its chunks'
    # speakers are linked by their centroids (cosine distance, centroid linkage) up to
    # `link_threshold`, into speakers/<source_id>.parquet. Not `threshold`: a chunk centroid
    # averages many windows, so two voices' centroids sit closer than their windows do (measured on
    # a two-voice conversation in 12 s chunks: one voice 0.02-0.17 apart, two voices 0.34-0.50, and
    # at 0.40 and above the two merge; pyannote's telephone voices are 0.11-0.13 apart, kept apart
    # by the rule below). A hub pipeline's embeddings are another space: tune it.
    link_chunks: bool = True
    link_threshold: float = 0.3
    # A source speaker with less speech than this over the whole source is not a speaker: its
    # turns go to the nearest one that has enough (a stray cluster: a laugh, a cough, a re-encode
    # artefact). Two speakers of one chunk with this much speech each are never linked together.
    # bench_diarize --long, pyannote's sample x8 in 90 s chunks (and its mu-law copy, and with 60 s
    # of leading silence): 5 left one chunk's 6.7-11 s third clusters as speakers (3-4 found,
    # DER 0.043-0.084); 10-30 give 2 speakers and DER 0.014-0.017.
    min_speaker_seconds: float = 10.0
    # ... or this share of the source's speech when that is less: a 15 s call of two people has
    # two speakers with 5 s each.
    min_speaker_share: float = 0.2
    device: str | None = None  # None: cuda when available
    cpus: float = 1.0
    gpus: float = 0.0
    actors: int | None = None  # pool size when unfused; None: grows with the backlog, up to what fits
    memory_gb: float = 0.6  # pyannote + resemblyzer loaded, a chunk's embeddings: 0.6 GB measured

    def __post_init__(self):
        require_between(self, 0.0, 2.0, "threshold")  # Euclidean between unit vectors: at most 2
        require_between(self, 0.0, 1.0, "segmentation_threshold", "max_channel_overlap", "max_channel_correlation")
        require(0 < self.segmentation_step <= 1, "segmentation_step", f"must be in (0, 1], got {self.segmentation_step}")
        require(0.0 < self.link_threshold <= 2.0, "link_threshold", f"must be in (0, 2], got {self.link_threshold}")
        require_between(self, 0.0, 1.0, "min_speaker_share")
        require(self.min_speaker_seconds >= 0, "min_speaker_seconds", f"must be >= 0, got {self.min_speaker_seconds}")
        require(self.min_cluster_size >= 1, "min_cluster_size", f"must be at least 1, got {self.min_cluster_size}")
        require(self.channels_as_speakers in ("auto", True, False), "channels_as_speakers",
                f"must be auto, true or false, got {self.channels_as_speakers!r}")
        require(self.min_speakers is None or self.max_speakers is None or self.min_speakers <= self.max_speakers,
                "min_speakers", f"must not exceed max_speakers ({self.min_speakers} > {self.max_speakers})")
        require_resources(self)


# --- pure helpers -----------------------------------------------------------------------------


def first_speech_names(turns: list[Turn]) -> dict[str, str]:
    """{old label: "S<i>"} with i the speaker's rank by first speech (ties by end, then label)."""
    names: dict[str, str] = {}
    for t in sorted(turns, key=lambda t: (t.start, t.end, t.speaker)):
        names.setdefault(t.speaker, f"S{len(names)}")
    return names


def relabel_by_first_speech(turns: list[Turn]) -> list[Turn]:
    """Sort turns by time and rename speakers S0, S1, ... in order of first speech (deterministic)."""
    names = first_speech_names(turns)
    return [Turn(t.start, t.end, names[t.speaker]) for t in sorted(turns, key=lambda t: (t.start, t.end, t.speaker))]


def regions_to_turns(channel_speech: list[list[Region]]) -> list[Turn]:
    """Channel c's speech regions become turns of speaker f"ch{c}" (relabelled by the caller)."""
    return [Turn(r.start, r.end, f"ch{c}") for c, regions in enumerate(channel_speech) for r in regions]


def _total(regions: list[tuple[float, float]]) -> float:
    return float(sum(e - s for s, e in regions))


def channel_overlap_ratio(channel_speech: list[list[Region]]) -> float:
    """Time with speech on two or more channels over time with speech on any channel."""
    # (time, +1 start / -1 end); sorting puts ends first at one instant: touching regions don't overlap
    events = sorted([(r.start, 1) for rs in channel_speech for r in rs] + [(r.end, -1) for rs in channel_speech for r in rs])
    active, last, any_time, multi_time = 0, 0.0, 0.0, 0.0
    for t, d in events:
        if active >= 1:
            any_time += t - last
        if active >= 2:
            multi_time += t - last
        active, last = active + d, t
    return multi_time / any_time if any_time > 0 else 0.0


def channel_correlation(audio: np.ndarray) -> float:
    """Largest |Pearson correlation| between any two channels' samples ([channels, samples])."""
    # every 4th sample: the same estimate for a long chunk at a quarter of the memory
    x = audio[:, ::4].astype(np.float64) if audio.shape[1] >= 4000 else audio.astype(np.float64)
    if x.shape[0] < 2 or x.shape[1] < 2:
        return 0.0
    x = x - x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1)
    best = 0.0
    for i in range(x.shape[0]):
        for j in range(i + 1, x.shape[0]):
            if norms[i] > 0 and norms[j] > 0:
                best = max(best, abs(float(x[i] @ x[j]) / (norms[i] * norms[j])))
    return best


def decide_channel_mode(
    audio: np.ndarray, channel_speech: list[list[Region]], config: DiarizeConfig
) -> tuple[bool, dict[str, Any]]:
    """Whether the channels are the speakers, with the measurements behind the decision."""
    forced = config.channels_as_speakers
    info: dict[str, Any] = {"channels": int(audio.shape[0])}
    if audio.shape[0] < 2:
        return False, {**info, "reason": "mono"}
    if forced is True or forced is False:
        return bool(forced), {**info, "reason": "forced by config"}
    if forced != "auto":
        raise ValueError(f"diarize.channels_as_speakers must be 'auto', true or false, not {forced!r}")
    if len(channel_speech) != audio.shape[0]:
        return False, {**info, "reason": "no per-channel speech regions"}
    speech = [_total([(r.start, r.end) for r in rs]) for rs in channel_speech]
    info["channel_speech_s"] = [round(s, 2) for s in speech]
    if sum(s >= config.min_channel_speech for s in speech) < 2:
        return False, {**info, "reason": "fewer than two channels with speech"}
    info["overlap"] = round(channel_overlap_ratio(channel_speech), 4)
    info["correlation"] = round(channel_correlation(audio), 4)
    if info["correlation"] > config.max_channel_correlation:
        return False, {**info, "reason": "channels carry the same signal"}
    if info["overlap"] > config.max_channel_overlap:
        return False, {**info, "reason": "channels' speech overlaps"}
    return True, {**info, "reason": "one speaker per channel"}


# --- the stage --------------------------------------------------------------------------------


class DiarizeStage(Stage):
    name = "diarize"

    def __init__(self, config: DiarizeConfig | None = None):
        super().__init__(config or DiarizeConfig())
        self.pipeline = None
        self.device = "cpu"

    def resources(self) -> Resources:
        c = self.config
        return Resources(cpus=c.cpus, gpus=c.gpus, actors=c.actors, memory_gb=c.memory_gb, uses_model=True)

    def preflight(self) -> None:
        from huggingface_hub import try_to_load_from_cache

        from stages.hub import hub_reachable

        c = self.config
        if c.pipeline and not os.path.exists(c.pipeline) and not isinstance(try_to_load_from_cache(c.pipeline, "config.yaml"), str):
            if not hub_reachable():
                raise ConfigError(f"diarize.pipeline: {c.pipeline!r} is not cached and the hub is unreachable: give a local "
                                  "directory holding the pipeline's config.yaml, or null for the offline diarizer")
            if not hub_token():
                raise ConfigError(f"diarize.pipeline: {c.pipeline!r} is gated on the hub: set HF_TOKEN to a token "
                                  "that has accepted its conditions, or give a local directory")
        for key in ("segmentation_model", "speaker_encoder"):
            path = getattr(c, key)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"diarize.{key}: {path} does not exist")

    def setup(self) -> None:
        import torch

        self.device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.config.pipeline:
            self.pipeline = load_pretrained_pipeline(self.config.pipeline, hub_token())
        else:
            self.pipeline = build_offline_pipeline(self.config)
        self.pipeline.to(torch.device(self.device))

    def describe(self) -> dict[str, Any]:
        ident = {**pipeline_identity(self.config), "device": self.device}
        if self.config.pipeline and self.pipeline is not None:
            # the loaded pipeline's own hyper-parameters (clustering threshold, ...)
            ident["params"] = self.pipeline.parameters(instantiated=True)
        return ident

    def process(self, chunk: Chunk) -> Chunk:
        audio = chunk.audio16k
        by_channel, info = decide_channel_mode(audio, chunk.channel_speech, self.config)
        chunk.custom["channel_check"] = info
        if by_channel:
            raw = regions_to_turns(chunk.channel_speech)
            names = first_speech_names(raw)
            chunk.speaker_mode = "channels"
            chunk.diarizer = {"name": "channels", "channels": int(audio.shape[0])}
            # {label: channel}, so per-channel ASR segments can be named
            chunk.channel_speakers = {new: int(old[2:]) for old, new in names.items()}
            chunk.turns = relabel_by_first_speech(raw)
            return chunk

        chunk.speaker_mode = "diarization"
        chunk.diarizer = self.describe()
        if not chunk.speech:  # nothing to attribute; VAD already says so
            chunk.turns = []
            return chunk
        raw, centroids = diarize_waveform(self.pipeline, chunk.mono16k, chunk.offset, self.config, chunk.recording.id)
        mapping = first_speech_names(raw)
        chunk.turns = relabel_by_first_speech(raw)
        chunk.speaker_embeddings = {
            mapping[k]: [round(float(x), 5) for x in v] for k, v in centroids.items() if k in mapping and np.all(np.isfinite(v))
        }
        self.counters["speakers"] += len(mapping)
        return chunk
