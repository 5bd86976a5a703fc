"""`pipeline pack DIR --output PACKED`: a corpus repacked for training, in passes that stream.

    PACKED/train/shard-<window>-<n>.tar ...   WebDataset shards of about --shard-size, samples shuffled
    PACKED/val/shard-<window>-<n>.tar ...     within a window of parts; val holds whole sources
    PACKED/<split>/manifest/part-<window>.parquet   the corpus manifest rows of the packed samples, `shard` renamed
    PACKED/<split>/index/part-<window>.parquet      shard, samples, bytes: readable without opening a tar
    PACKED/duplicates.parquet          samples whose codes equal an earlier sample's (packed once)
    PACKED/speakers/, speaker_map.parquet   the corpus's speaker labellings, copied (the trainer applies them)
    PACKED/pack.json                   what was packed and how, written last: a pack without it is unfinished
    PACKED/.pack/                      the passes' work: settings, code hashes, duplicates, finished windows

Passes, each a set of independent tasks (Ray tasks with `--address`, else in this process), each
resumable because its output is named by its input:
1. per committed part: the sha1 of each sample's codes and its members' byte ranges;
2. per hash bucket (a bounded share of all samples): duplicates, the first key of equal codes kept;
3. per window of parts (about `WINDOW_SHARDS` output shards): its samples in a seeded order, cut
   into shards streamed from byte ranges of the input tars, then its tables, then a done marker.
Memory holds one part, one bucket or one window, never the corpus. Everything is a function of the
corpus, the settings and the seed, so packing twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from typing import Any, Callable

from stages.corpus_format import CODES, CORPUS_MAP, SPEAKERS_DIR, TRAIN_SPLIT, VAL_SPLIT, OutputDir, manifest_schema, table_bytes
from stages.corpus_parts import COMMITS, PartFiles, committed_parts, layout_problem, part_of, read_parts

SPLITS = (TRAIN_SPLIT, VAL_SPLIT)
WORK, DONE = ".pack", "pack.json"
WINDOW_SHARDS = 4  # output shards a window of input parts fills: how far samples shuffle across parts
BUCKET_ROWS = 1_000_000  # samples per duplicate-finding bucket: its memory
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--shard-size: {text!r} is not a size such as 500MB or 1GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _hash(*parts: Any) -> str:
    return hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()


def _schema(name: str):
    import pyarrow as pa

    s, i64 = pa.string(), pa.int64()
    member = pa.struct([("name", s), ("offset", i64), ("size", i64)])
    return {
        "hashes": pa.schema([("key", s), ("source_id", s), ("part", s), ("codes_sha1", s), ("bucket", i64),
                             ("members", pa.list_(member))]),
        "duplicates": pa.schema([(k, s) for k in ("key", "source_id", "duplicate_of", "duplicate_of_source")]),
        "index": pa.schema([("shard", s), ("samples", i64), ("bytes", i64)]),
    }[name]


# ----------------------------------------------------------------------------- the split


class SourceSplit:
    """Held-out sources by hash: a source is in val when sha1(seed, source) falls under the fraction,
    so adding sources never moves one. With two or more sources and a positive fraction, at least
    one is held out and at least one is not (the lowest and highest hashes decide)."""

    def __init__(self, seed: int, fraction: float, forced_val: str | None = None, forced_train: str | None = None):
        self.seed, self.fraction, self.forced_val, self.forced_train = seed, fraction, forced_val, forced_train
        self.sources = {TRAIN_SPLIT: 0, VAL_SPLIT: 0}  # how many sources each split got (SourceSplit.of)

    def score(self, source: str) -> float:
        return int(_hash(self.seed, "split", source)[:15], 16) / 16**15

    def is_val(self, source: str) -> bool:
        if source == self.forced_val:
            return True
        return source != self.forced_train and self.score(source) < self.fraction

    @classmethod
    def of(cls, src: OutputDir, parts: list[str], fraction: float, seed: int) -> SourceSplit:
        """One streaming pass over the commit tables' source ids (chunk 0: one row per source)."""
        import pyarrow.compute as pc

        split = cls(seed, fraction)
        n = held = 0
        low = high = None
        for _, t in read_parts(src, COMMITS, parts, ["source_id", "chunk"]):
            for s in t.filter(pc.equal(t["chunk"], 0))["source_id"].to_pylist():
                score = split.score(s)
                n, held = n + 1, held + (score < fraction)
                low = min(low or (score, s), (score, s))
                high = max(high or (score, s), (score, s))
        if fraction > 0 and n >= 2 and held == 0:
            split.forced_val, held = low[1], 1
        if n >= 2 and held == n:
            split.forced_train, held = high[1], n - 1
        split.sources = {TRAIN_SPLIT: n - held, VAL_SPLIT: held}
        return split


# ----------------------------------------------------------------------------- pass 1: hashes


def hash_part(corpus: str, output: str, part: str, buckets: int) -> int:
    """The sha1 of each sample's codes in one part's shard, and its members' byte ranges."""
    src, dst = OutputDir(corpus), OutputDir(output)
    rel = f"{WORK}/hashes/{part}.parquet"
    if dst.exists(rel):
        return 0
    samples: dict[str, dict[str, Any]] = {}
    with src.fs.open_input_file(src.path(PartFiles(part).shard)) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            key, _, suffix = m.name.partition(".")
            sid = key.rsplit("-c", 1)[0]
            row = samples.setdefault(key, {"key": key, "source_id": sid, "part": part, "codes_sha1": "", "bucket": 0, "members": []})
            row["members"].append({"name": m.name, "offset": m.offset_data, "size": m.size})
            if suffix == CODES:
                digest = hashlib.sha1(tar.extractfile(m).read()).hexdigest()
                row["codes_sha1"], row["bucket"] = digest, int(digest[:8], 16) % buckets
    dst.write_bytes(rel, table_bytes(list(samples.values()), _schema("hashes")))
    return len(samples)


# ----------------------------------------------------------------------------- pass 2: duplicates


def find_duplicates(output: str, bucket: int) -> int:
    """Duplicates among the samples whose codes hash to `bucket`: all but the first key of equal codes."""
    import pyarrow.parquet as pq

    dst = OutputDir(output)
    rel = f"{WORK}/duplicates/{bucket:05d}.parquet"
    if dst.exists(rel):
        return 0
    rows = []
    for name in dst.list(f"{WORK}/hashes", ".parquet"):
        t = pq.read_table(dst.path(WORK, "hashes", name), filesystem=dst.fs, columns=["key", "source_id", "codes_sha1", "bucket"],
                          filters=[("bucket", "=", bucket)])
        rows += t.to_pylist()
    first: dict[str, dict[str, Any]] = {}
    dups = []
    for r in sorted(rows, key=lambda r: r["key"]):
        if r["codes_sha1"] in first:
            f = first[r["codes_sha1"]]
            dups.append({"key": r["key"], "source_id": r["source_id"], "duplicate_of": f["key"], "duplicate_of_source": f["source_id"]})
        else:
            first[r["codes_sha1"]] = r
    dst.write_bytes(rel, table_bytes(dups, _schema("duplicates")))
    return len(dups)


# ----------------------------------------------------------------------------- pass 3: windows


def pack_window(corpus: str, output: str, window: int, parts: list[str], shard_size: int, split: SourceSplit,
                seed: int) -> dict[str, dict[str, int]]:
    """Pack one window of input parts into shards of both splits; returns its counts per split."""
    import pyarrow.parquet as pq

    src, dst = OutputDir(corpus), OutputDir(output)
    marker = f"{WORK}/windows/{window:06d}.json"
    if dst.exists(marker):
        return json.loads(dst.read_bytes(marker))
    hashes = [r for p in parts for r in pq.read_table(dst.path(WORK, "hashes", f"{p}.parquet"), filesystem=dst.fs).to_pylist()]
    manifest = {r["key"]: r for _, t in read_parts(src, "manifest", parts) for r in t.to_pylist()}
    dropped = _dropped(dst, {r["key"] for r in hashes})
    counts: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        samples = sorted((r for r in hashes if r["key"] in manifest and r["key"] not in dropped
                          and split.is_val(r["source_id"]) == (name == VAL_SPLIT)), key=lambda r: _hash(seed, "order", r["key"]))
        index, rows = [], []
        for n, shard in enumerate(_cut(samples, shard_size)):
            shard_name = f"shard-{window:06d}-{n:04d}.tar"
            nbytes = _write_shard(src, dst, f"{name}/{shard_name}", shard)
            index.append({"shard": shard_name, "samples": len(shard), "bytes": nbytes})
            rows += [{**manifest[r["key"]], "shard": shard_name, "source_shard": manifest[r["key"]]["shard"]} for r in shard]
        if index:
            dst.write_bytes(f"{name}/index/part-{window:06d}.parquet", table_bytes(index, _schema("index")))
            dst.write_bytes(f"{name}/manifest/part-{window:06d}.parquet", _manifest_bytes(rows))
        counts[name] = {"shards": len(index), "samples": len(rows), "bytes": sum(i["bytes"] for i in index),
                        "sources": len({r["source_id"] for r in rows})}
    dst.write_bytes(marker, json.dumps(counts, sort_keys=True).encode())  # the window is done
    return counts


def _dropped(dst: OutputDir, keys: set[str]) -> set[str]:
    """The duplicate keys among `keys` (a window's)."""
    import pyarrow.parquet as pq

    out: set[str] = set()
    for name in dst.list(f"{WORK}/duplicates", ".parquet"):
        out.update(k for k in pq.read_table(dst.path(WORK, "duplicates", name), filesystem=dst.fs, columns=["key"])["key"].to_pylist()
                   if k in keys)
    return out


def _manifest_bytes(rows: list[dict[str, Any]]) -> bytes:
    from stages.corpus_format import parquet_bytes

    return parquet_bytes(rows, manifest_schema())


def _cut(samples: list[dict[str, Any]], target: int) -> list[list[dict[str, Any]]]:
    """Consecutive runs of about `target` bytes (a tar header per member, data padded to 512)."""
    shards: list[list[dict[str, Any]]] = [[]]
    size = 0
    for r in samples:
        nbytes = sum(512 + -(-m["size"] // 512) * 512 for m in r["members"])
        if shards[-1] and size + nbytes > target:
            shards.append([])
            size = 0
        shards[-1].append(r)
        size += nbytes
    return [s for s in shards if s]


def _write_shard(src: OutputDir, dst: OutputDir, rel: str, samples: list[dict[str, Any]]) -> int:
    """Stream `samples` into the tar `rel` of `dst` from byte ranges of their input tars; its size."""
    files: dict[str, Any] = {}
    try:
        with dst.open_output(rel) as raw:
            counter = _Counting(raw)
            with tarfile.open(fileobj=counter, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for r in samples:
                    if r["part"] not in files:
                        files[r["part"]] = src.fs.open_input_file(src.path(PartFiles(r["part"]).shard))
                    f = files[r["part"]]
                    for m in r["members"]:
                        f.seek(m["offset"])
                        info = tarfile.TarInfo(m["name"])
                        info.size, info.mtime, info.mode = m["size"], 0, 0o444
                        tar.addfile(info, io.BytesIO(f.read(m["size"])))
    finally:
        for f in files.values():
            f.close()
    return counter.n


class _Counting:
    """A write-only stream that counts what passes through (tarfile's stream mode needs only write)."""

    def __init__(self, raw):
        self.raw, self.n = raw, 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        self.raw.write(data)
        return len(data)


# ----------------------------------------------------------------------------- the whole


def _windows(src: OutputDir, parts: list[str], shard_size: int) -> list[list[str]]:
    """Parts with samples grouped, in name order, until their shards reach WINDOW_SHARDS x shard_size."""
    from pyarrow import fs

    sizes = {i.base_name: i.size for i in src.fs.get_file_info(fs.FileSelector(src.path("shards"), allow_not_found=True))}
    windows: list[list[str]] = [[]]
    total = 0
    for p in parts:
        size = sizes.get(PartFiles(p).shard_file)
        if size is None:
            continue
        if windows[-1] and total + size > WINDOW_SHARDS * shard_size:
            windows.append([])
            total = 0
        windows[-1].append(p)
        total += size
    return [w for w in windows if w]


def _claim(dst: OutputDir, settings: dict[str, Any]) -> None:
    """Pack only into an empty output or one this pack owns with the same settings (to resume)."""
    rel = f"{WORK}/settings.json"
    if dst.exists(rel):
        if json.loads(dst.read_bytes(rel)) != settings:
            raise ValueError(f"{dst.root} holds a pack made with other settings; use an empty --output")
        return
    if dst.list("", hidden=False) or any(dst.list(d) for d in (*SPLITS, SPEAKERS_DIR)):
        raise ValueError(f"{dst.root} is not empty and not a pack; use an empty --output")
    dst.write_bytes(rel, json.dumps(settings, sort_keys=True).encode())


def pack(corpus: str, output: str, shard_size: int, val_fraction: float, seed: int,
         map_tasks: Callable | None = None) -> dict[str, Any]:
    """Pack the corpus at `corpus` into `output`; returns what pack.json records. `map_tasks(fn,
    argument tuples)` runs a pass's tasks (Ray with --address); by default, one after another here."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    src, dst = OutputDir(corpus), OutputDir(output)
    if problem := layout_problem(src):
        raise ValueError(problem)
    parts = committed_parts(src)
    windows = _windows(src, parts, shard_size)
    if not windows:
        raise FileNotFoundError(f"no samples in {src.path('shards')}: is {corpus} a corpus made by `pipeline run`?")
    run = map_tasks or (lambda fn, args: [fn(*a) for a in args])
    settings = {"corpus": src.root, "shard_size": shard_size, "val_fraction": val_fraction, "seed": seed}
    dst.fs.create_dir(dst.root, recursive=True)
    _claim(dst, settings)
    with_samples = [p for w in windows for p in w]
    buckets = max(1, -(-_count_rows(src, with_samples) // BUCKET_ROWS))
    run(hash_part, [(corpus, output, p, buckets) for p in with_samples])
    run(find_duplicates, [(output, b) for b in range(buckets)])
    split = SourceSplit.of(src, parts, val_fraction, seed)
    counts = run(pack_window, [(corpus, output, i, w, shard_size, split, seed) for i, w in enumerate(windows)])
    dst.fs.create_dir(dst.path(SPEAKERS_DIR), recursive=True)
    committed = set(parts)
    for name in src.list(SPEAKERS_DIR, ".parquet"):
        if part_of(name) in committed:
            dst.write_bytes(f"{SPEAKERS_DIR}/{name}", src.read_bytes(f"{SPEAKERS_DIR}/{name}"))
    if src.exists(CORPUS_MAP):
        dst.write_bytes(CORPUS_MAP, src.read_bytes(CORPUS_MAP))
    dups = [r for name in dst.list(f"{WORK}/duplicates", ".parquet") for r in _read(dst, f"{WORK}/duplicates/{name}")]
    dst.write_bytes("duplicates.parquet", table_bytes(sorted(dups, key=lambda r: r["key"]), _schema("duplicates")))
    summary: dict[str, Any] = {**settings, "duplicates": len(dups), "windows": len(windows), "splits": {}}
    for name in SPLITS:
        summary["splits"][name] = {k: sum(c[name][k] for c in counts) for k in ("shards", "samples", "bytes")}
        summary["splits"][name]["sources"] = split.sources[name]
    dst.write_bytes(DONE, json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def _count_rows(src: OutputDir, parts: list[str]) -> int:
    """Manifest rows of `parts`, from the parquet footers."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(src.path(PartFiles(p).manifest), filesystem=src.fs).metadata.num_rows for p in parts)


def _read(out: OutputDir, rel: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(out.path(rel), filesystem=out.fs).to_pylist()
