"""write: one WebDataset shard per chunk, then its manifest rows, rejections, errors, and last the
chunk record that marks the chunk as done. What those files hold and where they go is
stages/corpus_format.py's; this stage turns the records into them.

Every file is written under a temporary name and renamed into place, so a reader (or a resumed
run) never sees a partial file. Names derive from the source id and chunk index only, so reruns
produce the same names and the same bytes (tar mtimes are 0, JSON keys sorted).
"""

from __future__ import annotations

import errno

import io
import tarfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stages.base import Stage
from stages.corpus_format import (
    AUDIO,
    CODES,
    JSON,
    ChunkFiles,
    ChunkRecord,
    OutputDir,
    Sample,
    SampleUtterance,
    SourceInfo,
    chunk_name,
    error_table,
    manifest_row,
    manifest_schema,
    parquet_bytes,
    rejection_rows,
    rejection_schema,
    sample_key,
)
from stages.records import CODEC_RATE, Chunk, Window


@dataclass(frozen=True)
class WriteConfig:
    output: str = ""  # corpus root (local path or URI); set by `pipeline run --output`
    keep_audio: bool = False  # also store each window's 24 kHz audio as KEY.flac


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


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


# A full disk, a quota, no permission, a read-only filesystem: no chunk can be written.
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class WriteStage(Stage):
    name = "write"
    handles_done = True  # failed and rejected chunks still leave their records

    def setup(self) -> None:
        self.out = OutputDir(self.config.output)

    def process(self, chunk: Chunk) -> Chunk:
        try:
            return self.write(chunk)
        except OSError as exc:
            if exc.errno in FATAL_ERRNOS:  # the next chunk would fail the same way: stop the run
                chunk.fatal = f"cannot write to {self.config.output}: {exc.strerror or exc}"
                return chunk
            raise

    def write(self, chunk: Chunk) -> Chunk:
        files = ChunkFiles(chunk_name(chunk.recording.id, chunk.index))
        rows, members = [], []
        for w in chunk.windows if not chunk.failed else []:
            sample = sample_of(chunk, w)
            members += [(f"{sample.key}.{JSON}", sample.to_json()), (f"{sample.key}.{CODES}", _npy_bytes(w.codes))]
            if self.config.keep_audio:
                members.append((f"{sample.key}.{AUDIO}", _flac_bytes(chunk.codec_audio(w.start, w.end))))
            rows.append(manifest_row(sample, int(w.codes.shape[1])))
        if rows:
            self.out.write_bytes(files.shard, _tar_bytes(members))
            self.out.write_bytes(files.manifest, parquet_bytes(rows, manifest_schema()))
        if chunk.rejected:
            self.out.write_bytes(files.rejected, parquet_bytes(rejection_rows(chunk.rejected, chunk.recording.uri), rejection_schema()))
        if chunk.errors or chunk.warnings:
            self.out.write_bytes(files.errors, error_table(chunk.errors + chunk.warnings))
        record = ChunkRecord.of(chunk, files.shard_file if rows else None, rows)
        # The chunk record is the commit point: written last, after everything it refers to.
        self.out.write_bytes(files.record, record.to_json())
        chunk.committed = record
        chunk.drop_audio()
        chunk.windows = []
        return chunk
