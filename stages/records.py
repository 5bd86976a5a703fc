"""Plain typed records that flow between stages (lhotse-style: times in seconds, `custom` for extras).

All times are seconds from the start of the *source* recording, never from the start of a chunk;
`Chunk.offset` converts between the two when slicing the chunk's arrays.
"""

from __future__ import annotations

import hashlib
import re
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stages.corpus_format import ChunkRecord

ANALYSIS_RATE = 16_000  # VAD, ASR, diarization
CODEC_RATE = 24_000  # Mimi


def source_id(uri: str) -> str:
    """Deterministic, path-safe id for a source: readable stem plus a hash of the full URI.

    Only [A-Za-z0-9_-]: safe as a file name, a WebDataset key (no dots) and a join key.
    """
    stem = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:40] or "source"
    return f"{slug}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}"


@dataclass
class Recording:
    id: str
    uri: str
    duration: float  # seconds, measured by decoding (container metadata is not trusted)
    sample_rate: int  # native rate of the file
    channels: int
    custom: dict[str, Any] = field(default_factory=dict)


@dataclass
class Region:
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Word:
    text: str
    start: float
    end: float
    score: float | None = None


@dataclass
class AsrSegment:
    start: float
    end: float
    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    channel: int = 0
    words: list[Word] = field(default_factory=list)
    language_prob: float | None = None


@dataclass
class Turn:
    """Who spoke when, from diarization or from channel identity."""

    start: float
    end: float
    speaker: str


@dataclass
class Utterance:
    speaker: str
    start: float
    end: float
    text: str
    channel: int = 0
    language: str = "en"
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    words: list[Word] = field(default_factory=list)
    overlap: float = 0.0  # seconds of this utterance during which another speaker also talks
    language_prob: float | None = None  # ASR's language probability; None: the language was fixed
    frames: tuple[int, int] | None = None  # [begin, end) into the window's codes, set by tokenize
    metrics: dict[str, float] = field(default_factory=dict)  # quality measures, set by the filters
    custom: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Window:
    """A training sample: consecutive utterances of one source."""

    index: int  # position among the source's windows (deterministic)
    utterances: list[Utterance]
    codes: np.ndarray | None = None  # int16 [num_codebooks, frames], filled by tokenize
    metrics: dict[str, Any] = field(default_factory=dict)  # quality measures (manifest columns), set by the filters
    custom: dict[str, Any] = field(default_factory=dict)

    @property
    def start(self) -> float:
        return self.utterances[0].start

    @property
    def end(self) -> float:
        return self.utterances[-1].end


@dataclass
class ErrorRecord:
    uri: str
    source_id: str
    stage: str
    error_type: str
    message: str
    chunk: int | None = None
    traceback: str = ""


@dataclass
class Rejection:
    """Something that was dropped on purpose, with the reason and the measured value."""

    source_id: str
    stage: str
    reason: str
    start: float
    end: float
    metric: float | None = None
    key: str | None = None
    level: str = "window"  # "source" | "chunk" | "utterance" | "window"

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Chunk:
    """A bounded piece of one source: the unit every stage processes.

    Long recordings are split by the decoder into chunks of at most `decode.chunk_seconds`, so
    memory is bounded by the chunk size and not by the file length.
    """

    recording: Recording
    index: int
    offset: float  # seconds from the source start
    last: bool  # True on the source's final chunk: lets the driver know a source is complete
    audio16k: np.ndarray | None = None  # float32 [channels, samples]
    audio24k: np.ndarray | None = None  # float32 [samples], mono
    speech: list[Region] = field(default_factory=list)  # on the mono mix
    channel_speech: list[list[Region]] = field(default_factory=list)  # per channel when >1 channel
    segments: list[AsrSegment] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    utterances: list[Utterance] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    warnings: list[ErrorRecord] = field(default_factory=list)  # recorded with the errors, do not fail the chunk
    # Speakers: "diarization" (turns from the diarizer) or "channels" (one speaker per channel,
    # `channel_speakers` maps label -> channel); set by diarize.
    speaker_mode: str | None = None
    channel_speakers: dict[str, int] = field(default_factory=dict)
    speaker_embeddings: dict[str, list[float]] = field(default_factory=dict)  # label -> centroid
    diarizer: dict[str, Any] = field(default_factory=dict)  # identity of what attributed the speakers
    codec: dict[str, Any] = field(default_factory=dict)  # identity of the codec that made the codes
    skipped: bool = False  # rejected as a whole: later stages pass it through
    # A failure that ends the run rather than this chunk (a model that cannot load, a full disk):
    # nothing more is done or written for the chunk, and the driver stops with this reason.
    fatal: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    cpu_times: dict[str, float] = field(default_factory=dict)  # stage -> process CPU seconds
    placement: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> {node, actor}
    committed: ChunkRecord | None = None  # the commit record, once the writer has written the chunk
    custom: dict[str, Any] = field(default_factory=dict)
    _duration: float | None = None  # kept when the audio is dropped

    @property
    def duration(self) -> float:
        if self.audio16k is None:
            return self._duration or 0.0
        return self.audio16k.shape[-1] / ANALYSIS_RATE

    @property
    def end(self) -> float:
        return self.offset + self.duration

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    @property
    def mono16k(self) -> np.ndarray:
        a = self.audio16k
        return a[0] if a.shape[0] == 1 else a.mean(axis=0)

    def codec_audio(self, start: float, end: float) -> np.ndarray:
        """The 24 kHz mono samples between two source times."""
        lo = max(0, round((start - self.offset) * CODEC_RATE))
        hi = min(len(self.audio24k), round((end - self.offset) * CODEC_RATE))
        return self.audio24k[lo:hi]

    def fail(self, stage: str, exc: BaseException) -> None:
        self.errors.append(
            ErrorRecord(
                uri=self.recording.uri,
                source_id=self.recording.id,
                stage=stage,
                error_type=type(exc).__name__,
                message=str(exc)[:2000],
                chunk=self.index,
                traceback="".join(traceback.format_exception(exc))[-4000:],
            )
        )
        self.drop_audio()

    def reject(self, stage: str, reason: str, metric: float | None = None) -> None:
        """Reject the whole chunk (e.g. no speech): recorded, then passed through without audio."""
        self.rejected.append(
            Rejection(self.recording.id, stage, reason, self.offset, self.end, metric, level="chunk")
        )
        self.skipped = True
        self.drop_audio()

    def drop_audio(self) -> None:
        # Keep the duration for accounting, free the samples.
        if self._duration is None:
            self._duration = self.duration
        self.audio16k = self.audio24k = None

    @property
    def done(self) -> bool:
        """Nothing left for later stages to do."""
        return self.failed or self.skipped

    def summary(self) -> ChunkSummary:
        """What the driver receives once the chain is done with this chunk, instead of the chunk."""
        from stages.corpus_format import ChunkRecord  # the format is built on these records, not under them

        return ChunkSummary(self.committed or ChunkRecord.of(self), self.committed is not None,
                            self.timings, self.cpu_times, self.placement, self.fatal)


@dataclass
class ChunkSummary:
    """A chunk at the end of the chain, as the driver sees it: its commit record (when the writer
    could not commit it, the record it would have had, with nothing written) and where its time went."""

    record: ChunkRecord
    committed: bool
    timings: dict[str, float]  # stage -> wall seconds
    cpu_times: dict[str, float]  # stage -> process CPU seconds
    placement: dict[str, dict[str, Any]]  # stage -> {node, actor}
    fatal: str | None = None  # the run must stop (Chunk.fatal)
