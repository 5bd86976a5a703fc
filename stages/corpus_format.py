"""The corpus on disk, owned here and nowhere else: the directory layout and names, the sample a
shard holds (to_dict / from_dict), the manifest and rejection tables, the error lines and the chunk
commit record. The writer (stages/write.py) makes it; pipeline/ (resume, progress, stats) and
train/ read it through these types. docs/output-format.md says the same in prose.

Nothing here imports a model or a stage: the trainer reads samples with it alone.
"""

from __future__ import annotations

import functools
import io
import json
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from stages.records import Chunk

SUBDIRS = ("shards", "manifest", "rejected", "errors", "chunks", "speakers")
CONFIG_FILE, RUN_FILE = "config.json", "run.json"
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


class ChunkFiles:
    """Where one chunk's outputs go, relative to the corpus root. Names derive from the source id
    and chunk index only, so a rerun writes the same names."""

    def __init__(self, name: str):  # name: chunk_name(source_id, index)
        shard = f"shard-{name}"
        self.shard_file = f"{shard}.tar"  # the manifest's `shard` column
        self.shard, self.manifest = f"shards/{shard}.tar", f"manifest/{shard}.parquet"
        self.rejected, self.errors, self.record = f"rejected/{name}.parquet", f"errors/{name}.parquet", f"chunks/{name}.json"


INCOMPLETE_SUFFIX = "-incomplete.parquet"  # errors/<source id>-incomplete.parquet: a source whose chunks did not all come back


def incomplete_errors(source_id: str) -> str:
    return f"errors/{source_id}{INCOMPLETE_SUFFIX}"


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
    """A sample's manifest row: where it is, and its quality facts as columns."""
    return {
        "key": sample.key, "shard": ChunkFiles(chunk_name(sample.source.id, sample.chunk)).shard_file,
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


def error_table(records: Iterable[Any]) -> bytes:
    """records.ErrorRecord -> an errors/*.parquet part (the same columns in every part)."""
    return parquet_bytes([asdict(e) for e in records], error_schema())


def read_error_table(data: bytes) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data)).to_pylist()


# ----------------------------------------------------------------------------- the commit record


@dataclass(frozen=True)
class ChunkRecord:
    """chunks/<name>.json, written after everything it refers to: its presence commits the chunk.
    A source is complete when its chunks 0..last all have one (resume skips it)."""

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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ChunkRecord:
        d = json.loads(data)
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})  # older records lack `speakers`


def chunk_speakers(chunk: Chunk) -> dict[str, dict[str, Any]]:
    """Each local speaker's speech seconds (its turns, overlap counted for each speaker) with its
    centroid or channel."""
    seconds: dict[str, float] = {}
    for t in chunk.turns:
        seconds[t.speaker] = seconds.get(t.speaker, 0.0) + (t.end - t.start)
    return {lab: {"seconds": round(sec, 3), "embedding": chunk.speaker_embeddings.get(lab),
                  "channel": chunk.channel_speakers.get(lab)} for lab, sec in sorted(seconds.items())}


# ----------------------------------------------------------------------------- speakers (stages/speakers.py links them)

SPEAKERS_DIR = "speakers"  # speakers/<source_id>.parquet: one labelling per source, written when it completes
CORPUS_MAP = "speaker_map.parquet"  # `pipeline link-speakers`: source speakers -> corpus speakers


def speakers_file(source_id: str) -> str:
    return f"{SPEAKERS_DIR}/{source_id}.parquet"


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


def read_speakers(out: OutputDir) -> list[dict[str, Any]]:
    """Every source speaker row of the corpus (none for a corpus made without linking)."""
    return [row for n in out.list(SPEAKERS_DIR, ".parquet") for row in read_rows(out, f"{SPEAKERS_DIR}/{n}")]


def label_map(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int, str], str]:
    """{(source_id, chunk, chunk label): source speaker} from speakers rows."""
    return {(r["source_id"], c["chunk"], c["label"]): r["speaker"] for r in rows for c in r["chunks"]}


class SpeakerLabels:
    """One labelling per source for samples, read lazily from the `speakers/` of the corpus a shard
    is in (`DIR/shards/x.tar`, or a packed `DIR/train/x.tar` -> `DIR/speakers/<source_id>.parquet`).
    A source without a map (made before linking, or not complete yet) keeps its chunk labels.
    Picklable: the cache starts empty."""

    def __init__(self):
        self.cache: dict[tuple[str, str], dict[tuple[int, str], str]] = {}

    def apply(self, sample: Sample, shard_url: str | None) -> Sample:
        root, sid = corpus_root(shard_url), sample.source.id
        if root is None:  # a stream: nothing to map
            return sample
        if (root, sid) not in self.cache:
            rows = read_rows(OutputDir(root), speakers_file(sid))
            self.cache[(root, sid)] = {(c, lab): spk for (_, c, lab), spk in label_map(rows).items()}
        m = self.cache[(root, sid)]
        for u in sample.utterances:
            u.speaker = m.get((sample.chunk, u.speaker), u.speaker)
        return sample


def corpus_root(shard_url: str | None) -> str | None:
    """The corpus root a shard is in (`DIR/shards/x.tar` or a packed `DIR/train/x.tar` -> DIR)."""
    return shard_url.rsplit("/", 2)[0] if shard_url and shard_url.count("/") >= 2 else None


class CorpusSpeakers:
    """The trainer's `data.speaker_ids: corpus`: each utterance's source speaker (the labels
    SpeakerLabels gives) becomes its corpus speaker's number from the corpus-wide map that
    `pipeline link-speakers` writes (`DIR/speaker_map.parquet`, copied by `pipeline pack`), so one
    voice has one id in every file. A missing map, or a speaker the map lacks (a source added or
    relinked since), is an error: a silent fallback would give one voice several ids. Picklable."""

    KEY = "data.speaker_ids=corpus"

    def __init__(self):
        self.cache: dict[str, dict[tuple[str, str], str]] = {}

    def ids(self, root: str) -> dict[tuple[str, str], str]:
        if root not in self.cache:
            out = OutputDir(root)
            if not out.exists(CORPUS_MAP):
                raise FileNotFoundError(
                    f"{self.KEY}: no corpus speaker map {out.path(CORPUS_MAP)}; run `pipeline link-speakers {root}` "
                    "(on the pipeline's output, then pack again), or set data.speaker_ids to index or raw")
            self.cache[root] = {(r["source_id"], r["speaker"]): r["corpus_speaker"].lstrip("C")
                                for r in read_rows(out, CORPUS_MAP)}
        return self.cache[root]

    def apply(self, sample: Sample, shard_url: str | None) -> Sample:
        root = corpus_root(shard_url)
        if root is None:
            raise ValueError(f"{self.KEY}: sample {sample.key} does not come from a corpus directory "
                             f"({shard_url!r}), so there is no speaker_map.parquet to read")
        ids = self.ids(root)
        for u in sample.utterances:
            got = ids.get((sample.source.id, u.speaker))
            if got is None:
                raise KeyError(f"{self.KEY}: source {sample.source.id} speaker {u.speaker} (sample {sample.key}) is not "
                               f"in {OutputDir(root).path(CORPUS_MAP)}: the corpus changed since the map was written "
                               "(or the source was not linked across chunks); run `pipeline link-speakers` again")
            u.speaker = got
        return sample
