"""write: one WebDataset shard per chunk, then its manifest rows, rejections, errors, and last the
chunk record that marks the chunk as done (see docs/output-format.md).

Every file is written under a temporary name and renamed into place, so a reader (or a resumed
run) never sees a partial file. Names derive from the source id and chunk index only, so reruns
produce the same names and the same bytes (tar mtimes are 0, JSON keys sorted).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stages.base import Stage
from stages.records import CODEC_RATE, Chunk, Window

SUBDIRS = ("shards", "manifest", "rejected", "errors", "chunks")


@dataclass
class WriteConfig:
    output: str = ""  # corpus root (local path or URI); set by `pipeline run --output`
    keep_audio: bool = False  # also store each window's 24 kHz audio as KEY.flac


def chunk_name(source_id: str, index: int) -> str:
    return f"{source_id}-c{index:04d}"


def sample_key(source_id: str, chunk: int, window: int) -> str:
    return f"{chunk_name(source_id, chunk)}-w{window:04d}"


class OutputDir:
    """Atomic writes under a corpus root, local or any pyarrow.fs filesystem."""

    def __init__(self, root: str):
        from pyarrow import fs

        if "://" in root:
            self.fs, self.root = fs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = fs.LocalFileSystem(), os.path.abspath(root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def makedirs(self) -> None:
        for sub in SUBDIRS:
            self.fs.create_dir(self.path(sub), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        head, tail = final.rsplit("/", 1)
        tmp = f"{head}/.tmp-{uuid.uuid4().hex[:8]}-{tail}"  # dot-prefixed: ignored by readers and globs
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def remove_temporaries(self) -> int:
        """Delete `.tmp-*` files a killed run left behind (one writer per corpus at a time)."""
        from pyarrow import fs

        stale = [
            i.path
            for sub in SUBDIRS
            for i in self.fs.get_file_info(fs.FileSelector(self.path(sub), allow_not_found=True))
            if i.base_name.startswith(".tmp-")
        ]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def exists(self, rel: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self.path(rel)).type != fs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def list(self, sub: str, suffix: str) -> list[str]:
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.path(sub), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.base_name.endswith(suffix) and not i.base_name.startswith("."))


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


def sample_json(chunk: Chunk, w: Window) -> dict[str, Any]:
    rec = chunk.recording
    return {
        "key": sample_key(rec.id, chunk.index, w.index),
        "source": {"uri": rec.uri, "id": rec.id, "duration": rec.duration, "sample_rate": rec.sample_rate, "channels": rec.channels},
        "chunk": chunk.index,
        "start": w.start,
        "end": w.end,
        "language": w.utterances[0].language,
        "utterances": [
            {
                "speaker": u.speaker,
                "start": u.start,
                "end": u.end,
                "text": u.text,
                "channel": u.channel,
                "frames": list(u.frames),
                "avg_logprob": u.avg_logprob,
                "no_speech_prob": u.no_speech_prob,
                "overlap": u.overlap,
                **({"words": [asdict(x) for x in u.words]} if u.words else {}),
            }
            for u in w.utterances
        ],
        "codec": chunk.codec,
        "diarizer": chunk.diarizer or {"name": "none", "speaker_mode": chunk.speaker_mode or "channel"},
        "quality": {**window_stats(w), **w.metrics},
    }


class WriteStage(Stage):
    name = "write"
    handles_done = True  # failed and rejected chunks still leave their records

    def setup(self) -> None:
        self.out = OutputDir(self.config.output)

    def process(self, chunk: Chunk) -> Chunk:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sid, name = chunk.recording.id, chunk_name(chunk.recording.id, chunk.index)
        rows, members = [], []
        shard = f"shard-{name}"
        for w in chunk.windows if not chunk.failed else []:
            meta = sample_json(chunk, w)
            key = meta["key"]
            members += [(f"{key}.json", json.dumps(meta, sort_keys=True).encode()), (f"{key}.codes.npy", _npy_bytes(w.codes))]
            if self.config.keep_audio:
                members.append((f"{key}.flac", _flac_bytes(chunk.codec_audio(w.start, w.end))))
            rows.append(
                {
                    "key": key, "shard": f"{shard}.tar", "source_id": sid, "source_uri": chunk.recording.uri,
                    "chunk": chunk.index, "start": w.start, "end": w.end, "duration": w.end - w.start,
                    "frames": int(w.codes.shape[1]), "language": meta["language"],
                    "speaker_labels": sorted({u.speaker for u in w.utterances}), **meta["quality"],
                }
            )
        if rows:
            self.out.write_bytes(f"shards/{shard}.tar", _tar_bytes(members))
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), buf)
            self.out.write_bytes(f"manifest/{shard}.parquet", buf.getvalue())
        if chunk.rejected:
            buf = io.BytesIO()
            table = pa.Table.from_pylist([{**asdict(r), "duration": r.duration, "uri": chunk.recording.uri} for r in chunk.rejected])
            pq.write_table(table, buf)
            self.out.write_bytes(f"rejected/{name}.parquet", buf.getvalue())
        errors = chunk.errors + chunk.warnings
        if errors:
            lines = "".join(json.dumps(asdict(e), sort_keys=True) + "\n" for e in errors)
            self.out.write_bytes(f"errors/{name}.jsonl", lines.encode())
        chunk.written = {
            "source_id": sid, "uri": chunk.recording.uri, "chunk": chunk.index, "last": chunk.last,
            "offset": chunk.offset, "duration": chunk.duration, "source_duration": chunk.recording.duration,
            "shard": f"{shard}.tar" if rows else None, "samples": len(rows),
            "utterances": sum(r["utterances"] for r in rows), "frames": sum(r["frames"] for r in rows),
            "kept_seconds": sum(r["duration"] for r in rows),
            "rejected": len(chunk.rejected), "errors": [e.error_type for e in errors],
            "failed": chunk.failed,
            "codec": chunk.codec or None, "diarizer": chunk.diarizer or None,
        }
        # The chunk record is the commit point: written last, after everything it refers to.
        self.out.write_bytes(f"chunks/{name}.json", json.dumps(chunk.written, sort_keys=True).encode())
        chunk.drop_audio()
        chunk.windows = []
        return chunk

