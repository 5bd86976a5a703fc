"""The corpus on disk, owned here and nowhere else: the directory layout and names, the sample a
shard holds (to_dict / from_dict), the manifest and rejection tables, the error lines and the chunk
commit record. The writer (stages/write.py) makes it; pipeline/ (resume, progress, stats) and
train/ read it through these types. docs/output-format.md says the same in prose.

Nothing here imports a model or a stage: the trainer reads samples with it alone.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from stages.records import Chunk

SUBDIRS = ("shards", "manifest", "rejected", "errors", "speakers", "commits")
CONFIG_FILE, RUN_FILE = "config.json", "run.json"
# 2: parts (stages/corpus_parts.py), many chunks per shard; 1 (no `layout` in config.json): a shard per chunk.
LAYOUT = 2
# `pipeline pack` output: DIR/train/*.tar, and DIR/val/*.tar holding whole held-out sources.
TRAIN_SPLIT, VAL_SPLIT = "train", "val"
# A sample's tar members are KEY.<suffix>; WebDataset hands them over under the suffix.
JSON, CODES, AUDIO = "json", "codes.npy", "flac"


# ----------------------------------------------------------------------------- names and paths


def chunk_name(source_id: str, index: int) -> str:
    return f"{source_id}-c{index:04d}"


def sample_key(source_id: str, chunk: int, window: int) -> str:
    """Unique per window and stable across runs; no dots (WebDataset splits member names at the first)."""
    return f"{chunk_name(source_id, chunk)}-w{window:04d}"


class OutputDir:
    """Atomic writes under a corpus root, local or any pyarrow.fs filesystem."""

    def __init__(self, root: str):
        from pyarrow import fs

        if "://" in root:
            self.fs, self.root = fs.FileSystem.from_uri(root)
            self.scheme = root.split("://", 1)[0] + "://"
        else:
            self.fs, self.root = fs.LocalFileSystem(), os.path.abspath(root)
            self.scheme = ""

    def uri(self, *parts: str) -> str:
        """`path(...)` as a user names it: with its scheme (s3://...) when it has one."""
        return self.scheme + self.path(*parts)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def makedirs(self) -> None:
        for sub in SUBDIRS:
            self.fs.create_dir(self.path(sub), recursive=True)

    @property
    def local(self) -> bool:
        from pyarrow import fs

        return isinstance(self.fs, fs.LocalFileSystem)

    @contextlib.contextmanager
    def _atomic(self, rel: str):
        """A stream whose object appears whole or not at all: on an object store a PUT already is (a
        rename would be a copy); on a local disk it is written under a dot-prefixed temporary name
        (ignored by readers) and renamed."""
        final = self.path(rel)
        if not self.local:
            with self.fs.open_output_stream(final) as f:
                yield f
            return
        head, tail = final.rsplit("/", 1)
        self.fs.create_dir(head, recursive=True)
        tmp = f"{head}/.tmp-{uuid.uuid4().hex[:8]}-{tail}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                yield f
            self.fs.move(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self._atomic(rel) as f:
            f.write(data)

    def open_output(self, rel: str):
        """A stream to write `rel` in one go (multipart on an object store); not atomic on a local
        disk, so only for objects a later commit makes visible."""
        if self.local:
            self.fs.create_dir(self.path(rel).rsplit("/", 1)[0], recursive=True)
        return self.fs.open_output_stream(self.path(rel))

    def put_file(self, rel: str, local_path: str) -> None:
        """Copy a local file to `rel`, atomically, streamed: for objects too large to hold."""
        import shutil

        with open(local_path, "rb") as src, self._atomic(rel) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def exists(self, rel: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self.path(rel)).type != fs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def list(self, sub: str, suffix: str = "", hidden: bool = False) -> list[str]:
        """File names in `sub` (one paged listing on an object store); dot-files only when `hidden`."""
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.path(sub), allow_not_found=True))
        return sorted(i.base_name for i in infos
                      if i.type == fs.FileType.File and i.base_name.endswith(suffix) and (hidden or not i.base_name.startswith(".")))


# ----------------------------------------------------------------------------- the sample (KEY.json)


@dataclass
class SourceInfo:
    uri: str
    id: str
    duration: float  # seconds, as decoded
    sample_rate: int  # native rate of the file
    channels: int


@dataclass
class SampleUtterance:
    speaker: str
    start: float  # seconds from the source start
    end: float
    text: str
    channel: int
    frames: tuple[int, int]  # [begin, end) into KEY.codes.npy
    avg_logprob: float
    no_speech_prob: float
    overlap: float  # seconds during which another speaker also talks
    words: list[dict[str, Any]] | None = None  # {text, start, end, score}; only with word timestamps


@dataclass
class Sample:
    """KEY.json: one training window of consecutive utterances; its codes are KEY.codes.npy."""

    key: str
    source: SourceInfo
    chunk: int
    start: float
    end: float
    language: str
    utterances: list[SampleUtterance]
    codec: dict[str, Any]  # identity of the codec (name, weights, released, ...)
    diarizer: dict[str, Any]  # identity of what attributed the speakers
    quality: dict[str, Any]  # conversation facts and filter metrics (also manifest columns)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for u in d["utterances"]:
            u["frames"] = list(u["frames"])
            if u["words"] is None:
                del u["words"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        utts = [SampleUtterance(**{**u, "frames": tuple(u["frames"])}) for u in d["utterances"]]
        return cls(**{**d, "source": SourceInfo(**d["source"]), "utterances": utts})

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Sample:
        return cls.from_dict(json.loads(data))


# ----------------------------------------------------------------------------- tables

# Declared column types: a part where a column happens to be all null (a chunk whose rejections
# carry no metric) must still read back as that type next to the other parts (pyarrow and pandas
# refuse a directory whose parts disagree). Columns not declared here (the filters' metrics) keep
# the type their values have.


@functools.cache
def manifest_schema():
    import pyarrow as pa

    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    return pa.schema([
        ("key", s), ("shard", s), ("source_id", s), ("source_uri", s), ("chunk", i64), ("start", f64), ("end", f64),
        ("duration", f64), ("frames", i64), ("language", s), ("speaker_labels", pa.list_(s)),
        ("utterances", i64), ("speakers", i64), ("turns", i64), ("speech_seconds", f64), ("overlap_seconds", f64),
        ("mean_gap", f64), ("avg_logprob", f64), ("no_speech_prob", f64), ("text_chars", i64),
    ])


@functools.cache
def rejection_schema():
    import pyarrow as pa

    f64, s = pa.float64(), pa.string()
    return pa.schema([
        ("source_id", s), ("stage", s), ("reason", s), ("start", f64), ("end", f64), ("metric", f64), ("key", s),
        ("level", s), ("duration", f64), ("uri", s),
    ])


def manifest_row(sample: Sample, frames: int) -> dict[str, Any]:
    """A sample's manifest row: its quality facts as columns, and where it is (`shard`, set when its
    part is written)."""
    return {
        "key": sample.key, "shard": None,
        "source_id": sample.source.id, "source_uri": sample.source.uri, "chunk": sample.chunk,
        "start": sample.start, "end": sample.end, "duration": sample.end - sample.start, "frames": frames,
        "language": sample.language, "speaker_labels": sorted({u.speaker for u in sample.utterances}),
        **sample.quality,
    }


def rejection_rows(rejections: Iterable[Any], uri: str) -> list[dict[str, Any]]:
    """records.Rejection -> rows of rejected/*.parquet."""
    return [{**asdict(r), "duration": r.duration, "uri": uri} for r in rejections]


def parquet_bytes(rows: list[dict[str, Any]], schema) -> bytes:
    """Rows as a parquet file, the declared columns cast to their declared types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    declared = {f.name: f for f in schema}
    table = table.cast(pa.schema([declared.get(f.name, f) for f in table.schema]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@functools.cache
def error_schema():
    import pyarrow as pa

    s = pa.string()
    return pa.schema([("uri", s), ("source_id", s), ("stage", s), ("error_type", s), ("message", s), ("chunk", pa.int64()),
                      ("traceback", s)])


# ----------------------------------------------------------------------------- the commit record


@dataclass(frozen=True)
class ChunkRecord:
    """A row of commits/<part>.parquet, written after everything of its part: its presence commits the
    chunk. A source is complete when its chunks 0..last all have one (resume skips it)."""

    source_id: str
    uri: str
    chunk: int
    last: bool  # the source's final chunk
    offset: float  # seconds from the source start
    duration: float  # decoded seconds in this chunk (the funnel's input)
    source_duration: float
    shard: str | None  # shard file name, None when no sample was kept
    samples: int
    utterances: int
    frames: int
    kept_seconds: float  # window seconds in the shard
    rejected: int  # rejection records
    errors: list[str]  # error types, warnings included
    failed: bool
    codec: dict[str, Any] | None
    diarizer: dict[str, Any] | None
    # {local label: {seconds, embedding (diarizer centroid or null), channel (or null)}}: what
    # linking a source's chunk labels into one labelling needs (stages/speakers.py)
    speakers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, chunk: Chunk, shard: str | None = None, rows: list[dict[str, Any]] = ()) -> ChunkRecord:
        """The record of `chunk` whose manifest `rows` went to `shard` (none: nothing written)."""
        return cls(
            source_id=chunk.recording.id, uri=chunk.recording.uri, chunk=chunk.index, last=chunk.last,
            offset=chunk.offset, duration=chunk.duration, source_duration=chunk.recording.duration,
            shard=shard, samples=len(rows), utterances=sum(r["utterances"] for r in rows),
            frames=sum(r["frames"] for r in rows), kept_seconds=sum(r["duration"] for r in rows),
            rejected=len(chunk.rejected), errors=[e.error_type for e in chunk.errors + chunk.warnings],
            failed=chunk.failed, codec=chunk.codec or None, diarizer=chunk.diarizer or None,
            speakers=chunk_speakers(chunk),
        )

    def to_row(self) -> dict[str, Any]:
        """A row of commits/*.parquet (commit_schema): identities as JSON text, speakers as a list."""
        d = asdict(self)
        for k in ("codec", "diarizer"):
            d[k] = None if d[k] is None else json.dumps(d[k], sort_keys=True)
        d["speakers"] = [{"label": lab, **v} for lab, v in sorted(self.speakers.items())]
        return d

    @classmethod
    def from_row(cls, d: dict[str, Any]) -> ChunkRecord:
        d = dict(d)
        for k in ("codec", "diarizer"):
            d[k] = None if d.get(k) is None else json.loads(d[k])
        d["speakers"] = {s["label"]: {k: v for k, v in s.items() if k != "label"} for s in d.get("speakers") or ()}
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@functools.cache
def commit_schema():
    import pyarrow as pa

    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    speaker = pa.struct([("label", s), ("seconds", f64), ("embedding", pa.list_(pa.float32())), ("channel", i64)])
    return pa.schema([
        ("source_id", s), ("uri", s), ("chunk", i64), ("last", pa.bool_()), ("offset", f64), ("duration", f64),
        ("source_duration", f64), ("shard", s), ("samples", i64), ("utterances", i64), ("frames", i64),
        ("kept_seconds", f64), ("rejected", i64), ("errors", pa.list_(s)), ("failed", pa.bool_()), ("codec", s),
        ("diarizer", s), ("speakers", pa.list_(speaker)),
    ])


def chunk_speakers(chunk: Chunk) -> dict[str, dict[str, Any]]:
    """Each local speaker's speech seconds (its turns, overlap counted for each speaker) with its
    centroid or channel."""
    seconds: dict[str, float] = {}
    for t in chunk.turns:
        seconds[t.speaker] = seconds.get(t.speaker, 0.0) + (t.end - t.start)
    return {lab: {"seconds": round(sec, 3), "embedding": chunk.speaker_embeddings.get(lab),
                  "channel": chunk.channel_speakers.get(lab)} for lab, sec in sorted(seconds.items())}


# ----------------------------------------------------------------------------- speakers (stages/speakers.py links them)

SPEAKERS_DIR = "speakers"  # speakers/<part>.parquet: the labelling of each source that completed in that part
CORPUS_MAP = "speaker_map.parquet"  # `pipeline link-speakers`: source speakers -> corpus speakers

@functools.cache
def speakers_schema():
    import pyarrow as pa

    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    member = pa.struct([("chunk", i64), ("label", s), ("seconds", f64), ("distance", f64), ("folded", pa.bool_())])
    return pa.schema([
        ("source_id", s), ("source_uri", s), ("source_dir", s), ("speaker", s), ("seconds", f64),
        ("embedding", pa.list_(pa.float32())), ("chunks", pa.list_(member)),
    ])


@functools.cache
def corpus_map_schema():
    import pyarrow as pa

    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    return pa.schema([
        ("group", s), ("source_id", s), ("speaker", s), ("corpus_speaker", s), ("seconds", f64), ("members", i64),
        ("distance", f64), ("nearest_other", f64), ("confidence", s),
    ])


def table_bytes(rows: list[dict[str, Any]], schema) -> bytes:
    """Rows as parquet with exactly `schema` (nested columns included), even with no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def read_rows(out: OutputDir, rel: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(out.read_bytes(rel))).to_pylist() if out.exists(rel) else []


def label_map(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int, str], str]:
    """{(source_id, chunk, chunk label): source speaker} from speakers rows."""
    return {(r["source_id"], c["chunk"], c["label"]): r["speaker"] for r in rows for c in r["chunks"]}
