"""write: a chunk's samples and records, serialized (`ChunkOutput`) and handed to a `PartWriter`,
which gathers many chunks into one part of the corpus (stages/corpus_parts.py): a shard of about
`write.shard_size` bytes, its tables, and last the commit object listing its chunk records.

Under Ray the runner hands the stage a sink that forwards to writer actors (pipeline/ray_runner.py);
run directly, the stage writes through a `PartWriter` of its own (call `close()` at the end).
Sample bytes are a function of the chunk only (tar mtimes 0, JSON keys sorted), so a rerun writes
the same samples under the same keys; which part holds a sample depends on what arrived together.
"""

from __future__ import annotations

import errno
import io
import shutil
import tarfile
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np

from stages.base import Stage
from stages.corpus_format import (AUDIO, CODES, JSON, ChunkRecord, OutputDir, Sample, SampleUtterance, SourceInfo,
                                  chunk_name, commit_schema, error_schema, manifest_row, manifest_schema, parquet_bytes,
                                  rejection_rows, rejection_schema, sample_key, speakers_schema, table_bytes)
from stages.corpus_parts import PartFiles, part_id
from stages.overrides import require
from stages.records import CODEC_RATE, Chunk, Window


@dataclass(frozen=True)
class WriteConfig:
    output: str = ""  # corpus root (local path or URI); set by `pipeline run --output`
    keep_audio: bool = False  # also store each window's 24 kHz audio as KEY.flac
    shard_size: int = 1_000_000_000  # bytes of samples per part (one shard and its tables)
    commit_seconds: float = 600.0  # a part is also written once its first chunk is this old: work a kill can lose

    def __post_init__(self):
        require(self.shard_size >= 1, "shard_size", f"must be at least 1 byte, got {self.shard_size}")
        require(0 < self.commit_seconds < float("inf"), "commit_seconds", f"must be a positive number, got {self.commit_seconds}")


def tar_members(members: list[tuple[str, bytes]]) -> bytes:
    """Tar members (a USTAR header each, data padded to 512 bytes) without the end-of-archive
    blocks, so the members of many chunks concatenate into one shard."""
    out = bytearray()
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        out += info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        out += data + b"\0" * (-len(data) % 512)
    return bytes(out)


END_OF_ARCHIVE = b"\0" * 1024


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _flac_bytes(audio: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1, 1), CODEC_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def window_stats(w: Window) -> dict[str, Any]:
    """Conversation facts of a window, shared by the sample JSON and the manifest."""
    utts = w.utterances
    durations = np.array([u.duration for u in utts])
    gaps = [b.start - a.end for a, b in zip(utts, utts[1:]) if b.speaker != a.speaker]
    return {
        "utterances": len(utts),
        "speakers": len({u.speaker for u in utts}),
        "turns": 1 + sum(b.speaker != a.speaker for a, b in zip(utts, utts[1:])),
        "speech_seconds": float(durations.sum()),
        "overlap_seconds": float(sum(u.overlap for u in utts)),
        "mean_gap": float(np.mean(gaps)) if gaps else 0.0,
        "avg_logprob": float(np.average([u.avg_logprob for u in utts], weights=np.maximum(durations, 1e-3))),
        "no_speech_prob": float(max(u.no_speech_prob for u in utts)),
        "text_chars": sum(len(u.text) for u in utts),
    }


def sample_of(chunk: Chunk, w: Window) -> Sample:
    rec = chunk.recording
    return Sample(
        key=sample_key(rec.id, chunk.index, w.index),
        source=SourceInfo(rec.uri, rec.id, rec.duration, rec.sample_rate, rec.channels),
        chunk=chunk.index,
        start=w.start,
        end=w.end,
        language=w.utterances[0].language,
        utterances=[
            SampleUtterance(
                u.speaker, u.start, u.end, u.text, u.channel, u.frames, u.avg_logprob, u.no_speech_prob, u.overlap,
                [asdict(x) for x in u.words] or None,
            )
            for u in w.utterances
        ],
        codec=chunk.codec,
        diarizer=chunk.diarizer or {"name": "none", "speaker_mode": chunk.speaker_mode or "channel"},
        quality={**window_stats(w), **w.metrics},
    )




@dataclass
class ChunkOutput:
    """Everything one chunk puts in the corpus, serialized; a PartWriter places it in a part."""

    name: str  # chunk_name(source_id, index)
    members: bytes  # tar_members of its samples
    manifest: list[dict[str, Any]]  # `shard` set when the part is written
    rejected: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    record: ChunkRecord  # `shard` likewise


def chunk_output(chunk: Chunk, keep_audio: bool) -> ChunkOutput:
    rows, members = [], []
    for w in chunk.windows if not chunk.failed else []:
        sample = sample_of(chunk, w)
        members += [(f"{sample.key}.{JSON}", sample.to_json()), (f"{sample.key}.{CODES}", _npy_bytes(w.codes))]
        if keep_audio:
            members.append((f"{sample.key}.{AUDIO}", _flac_bytes(chunk.codec_audio(w.start, w.end))))
        rows.append(manifest_row(sample, int(w.codes.shape[1])))
    uri = chunk.recording.uri
    return ChunkOutput(chunk_name(chunk.recording.id, chunk.index), tar_members(members), rows,
                       rejection_rows(chunk.rejected, uri), [asdict(e) for e in chunk.errors + chunk.warnings],
                       ChunkRecord.of(chunk, None, rows))


# A full disk, a quota, no permission, a read-only filesystem: no chunk can be written.
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class SinkLost(Exception):
    """The writer a stage hands its outputs to is gone: the run stops (its work is not committed)."""


RECENT_SOURCES = 100_000  # completed sources remembered, so a chunk retried after its source completed is dropped


@dataclass
class _Source:
    records: dict[int, ChunkRecord] = field(default_factory=dict)
    last: int | None = None

    @property
    def complete(self) -> bool:
        return self.last is not None and len(self.records) == self.last + 1


class PartWriter:
    """Gathers chunk outputs into parts and writes each part, its commit object last.

    Samples go to a local spool file, not memory. A source is complete when its chunks 0..last
    have all arrived (with `prior` records of chunks committed by an earlier run); its speaker
    labelling (`link(records)`, stages/speakers.py) is written in the part that completes it, so it
    is committed with its last chunk. A chunk that arrives twice (a worker retried after handing it
    over) is written once. Memory: the records of sources still in flight."""

    def __init__(self, out: OutputDir, shard_size: int, commit_seconds: float,
                 link: Callable[[list[ChunkRecord]], list[dict[str, Any]]] | None = None,
                 prior: dict[str, list[ChunkRecord]] | None = None):
        self.out, self.shard_size, self.commit_seconds, self.link = out, shard_size, commit_seconds, link
        self.sources: dict[str, _Source] = {}
        for sid, records in (prior or {}).items():
            self.sources[sid] = _Source({r.chunk: r for r in records}, next((r.chunk for r in records if r.last), None))
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.spool = None
        self.pending: list[ChunkOutput] = []
        self.speakers: list[dict[str, Any]] = []
        self.opened = 0.0
        self.parts = self.chunks = 0

    def add(self, output: ChunkOutput) -> None:
        r = output.record
        state = self.sources.setdefault(r.source_id, _Source()) if r.source_id not in self.recent else None
        if state is None or r.chunk in state.records:
            return  # already here or committed: a retried chunk
        if self.spool is None:
            self.spool, self.opened = tempfile.TemporaryFile(prefix="csm-part-"), time.monotonic()
        self.spool.write(output.members)
        self.pending.append(replace(output, members=b""))
        state.records[r.chunk] = r
        if r.last:
            state.last = r.chunk
        if state.complete:
            if self.link:
                self.speakers += self.link(sorted(state.records.values(), key=lambda x: x.chunk))
            del self.sources[r.source_id]
            self.recent[r.source_id] = None
            if len(self.recent) > RECENT_SOURCES:
                self.recent.popitem(last=False)
        if self.spool.tell() >= self.shard_size or time.monotonic() - self.opened >= self.commit_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the part: shard, manifest, rejections, errors, speakers, then the commit object."""
        if not self.pending:
            return
        outputs = sorted(self.pending, key=lambda o: o.name)
        files = PartFiles(part_id(o.name for o in outputs))
        manifest = sorted(({**row, "shard": files.shard_file} for o in outputs for row in o.manifest), key=lambda r: r["key"])
        if manifest:
            self.spool.seek(0)
            with self.out.open_output(files.shard) as f:  # multipart on an object store
                shutil.copyfileobj(self.spool, f, 8 << 20)
                f.write(END_OF_ARCHIVE)
            self.out.write_bytes(files.manifest, parquet_bytes(manifest, manifest_schema()))
        rejected = [row for o in outputs for row in o.rejected]
        if rejected:
            self.out.write_bytes(files.rejected, parquet_bytes(rejected, rejection_schema()))
        errors = [row for o in outputs for row in o.errors]
        if errors:
            self.out.write_bytes(files.errors, parquet_bytes(errors, error_schema()))
        if self.speakers:
            self.out.write_bytes(files.speakers, table_bytes(self.speakers, speakers_schema()))
        records = [replace(o.record, shard=files.shard_file if o.manifest else None).to_row() for o in outputs]
        self.out.write_bytes(files.commit, table_bytes(records, commit_schema()))  # the commit point
        self.parts, self.chunks = self.parts + 1, self.chunks + len(outputs)
        self.spool.close()
        self.spool, self.pending, self.speakers = None, [], []

    def close(self) -> dict[str, int]:
        self.flush()
        return {"parts": self.parts, "chunks": self.chunks}


class WriteStage(Stage):
    name = "write"
    handles_done = True  # failed and rejected chunks still leave their records

    def __init__(self, config: WriteConfig):
        super().__init__(config)
        # Where outputs go: set by the runner (writer actors), else a PartWriter of this stage's own.
        self.sink: Any = None

    def setup(self) -> None:
        if self.sink is None:
            c = self.config
            self.sink = PartWriter(OutputDir(c.output), c.shard_size, c.commit_seconds)

    def process(self, chunk: Chunk) -> Chunk:
        try:
            return self.write(chunk)
        except OSError as exc:
            if exc.errno in FATAL_ERRNOS:  # the next chunk would fail the same way: stop the run
                chunk.fatal = f"cannot write to {self.config.output}: {exc.strerror or exc}"
                return chunk
            raise
        except SinkLost as exc:
            chunk.fatal = f"the corpus writer stopped: {exc}"
            return chunk

    def write(self, chunk: Chunk) -> Chunk:
        output = chunk_output(chunk, self.config.keep_audio)
        self.sink.add(output)
        chunk.committed = output.record  # handed over: committed with its part
        chunk.drop_audio()
        chunk.windows = []
        return chunk

    def close(self) -> None:
        """Write what this stage's own PartWriter holds (run directly, without the runner)."""
        if isinstance(self.sink, PartWriter):
            self.sink.close()
