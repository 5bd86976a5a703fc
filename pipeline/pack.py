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
from typing import Any, Callable, Iterator

from stages.corpus_format import CODES, CORPUS_MAP, SPEAKERS_DIR, TRAIN_SPLIT, VAL_SPLIT, OutputDir, read_rows, table_bytes
from stages.corpus_parts import COMMITS, PartFiles, committed_parts, layout_problem, part_of, read_parts
from stages.write import END_OF_ARCHIVE

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
    return {
        "hashes": pa.schema([("key", s), ("source_id", s), ("part", s), ("codes_sha1", s), ("bucket", i64),
                             ("start", i64), ("end", i64)]),
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


def tar_samples(f) -> Iterator[tuple[str, int, int, bytes]]:
    """(key, first byte, end byte, codes bytes) of each sample of a USTAR shard read from `f` in
    order: its members are adjacent (the writer puts them so), so a sample is one byte range that
    copies into another shard as it is. Headers parsed here: tarfile's object per member cost more
    than the rest of the pass."""
    pos, key, start, codes = 0, None, 0, b""
    while True:
        header = f.read(512)
        if len(header) < 512 or header == b"\0" * 512:
            break
        name = header[:100].split(b"\0", 1)[0].decode()
        if header[257:262] == b"ustar" and header[345]:
            name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        data = f.read(size + -size % 512)[:size]
        k, _, suffix = name.partition(".")
        if k != key:
            if key is not None:
                yield key, start, pos, codes
            key, start, codes = k, pos, b""
        if suffix == CODES:
            codes = data
        pos += 512 + size + -size % 512
    if key is not None:
        yield key, start, pos, codes


def hash_part(corpus: str, output: str, part: str, buckets: int) -> int:
    """The sha1 of each sample's codes in one part's shard, and its byte range."""
    src, dst = OutputDir(corpus), OutputDir(output)
    rel = f"{WORK}/hashes/{part}.parquet"
    if dst.exists(rel):
        return 0
    rows = []
    with src.fs.open_input_stream(src.path(PartFiles(part).shard)) as f:
        for key, start, end, codes in tar_samples(f):
            digest = hashlib.sha1(codes).hexdigest()
            rows.append({"key": key, "source_id": key.rsplit("-c", 1)[0], "part": part, "codes_sha1": digest,
                         "bucket": int(digest[:8], 16) % buckets, "start": start, "end": end})
    dst.write_bytes(rel, table_bytes(rows, _schema("hashes")))
    return len(rows)


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
    """Pack one window of input parts into shards of both splits; returns its counts per split.
    Columns stay in Arrow: a sample's manifest row is taken, not rebuilt."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    src, dst = OutputDir(corpus), OutputDir(output)
    marker = f"{WORK}/windows/{window:06d}.json"
    if dst.exists(marker):
        return json.loads(dst.read_bytes(marker))
    hashes = pa.concat_tables([pq.read_table(dst.path(WORK, "hashes", f"{p}.parquet"), filesystem=dst.fs) for p in parts])
    manifest = pa.concat_tables([t for _, t in read_parts(src, "manifest", parts)], promote_options="permissive")
    dropped = _dropped(dst, hashes["key"])
    listed = pc.is_in(hashes["key"], value_set=manifest["key"])  # a sample the manifest lists
    hashes = hashes.filter(pc.and_(listed, pc.invert(pc.is_in(hashes["key"], value_set=dropped))))
    sources = hashes["source_id"].to_pylist()
    val = {s: split.is_val(s) for s in set(sources)}
    keys = hashes["key"].to_pylist()
    counts: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        mine = [i for i, s in enumerate(sources) if val[s] == (name == VAL_SPLIT)]
        order = sorted(mine, key=lambda i: _hash(seed, "order", keys[i]))
        part = hashes.take(pa.array(order, pa.int64()))
        rows = manifest.take(pc.index_in(part["key"], value_set=manifest["key"]))
        index, shard_of = [], []
        for n, (a, b) in enumerate(_cut(np.asarray(part["end"]) - np.asarray(part["start"]), shard_size)):
            shard_name = f"shard-{window:06d}-{n:04d}.tar"
            nbytes = _write_shard(src, dst, f"{name}/{shard_name}", part.slice(a, b - a))
            index.append({"shard": shard_name, "samples": b - a, "bytes": nbytes})
            shard_of += [shard_name] * (b - a)
        if index:
            rows = rows.append_column("source_shard", rows["shard"]).set_column(
                rows.schema.get_field_index("shard"), "shard", pa.array(shard_of, pa.string()))
            dst.write_bytes(f"{name}/index/part-{window:06d}.parquet", table_bytes(index, _schema("index")))
            dst.write_bytes(f"{name}/manifest/part-{window:06d}.parquet", _table_bytes(rows))
        counts[name] = {"shards": len(index), "samples": len(order), "bytes": sum(i["bytes"] for i in index)}
    dst.write_bytes(marker, json.dumps(counts, sort_keys=True).encode())  # the window is done
    return counts


def _dropped(dst: OutputDir, keys):
    """The duplicate keys among `keys` (a window's), as an Arrow array."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    found = [t["key"] for name in dst.list(f"{WORK}/duplicates", ".parquet")
             for t in [pq.read_table(dst.path(WORK, "duplicates", name), filesystem=dst.fs, columns=["key"])]]
    every = pa.chunked_array(found, pa.string()) if found else pa.chunked_array([], pa.string())
    return every.filter(pc.is_in(every, value_set=keys)).combine_chunks()


def _table_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _cut(sizes, target: int) -> list[tuple[int, int]]:
    """[a, b) runs of consecutive samples of about `target` bytes each."""
    runs, a, size = [], 0, 0
    for i, n in enumerate(sizes):
        if i > a and size + n > target:
            runs.append((a, i))
            a, size = i, 0
        size += int(n)
    if len(sizes):
        runs.append((a, len(sizes)))
    return runs


def _write_shard(src: OutputDir, dst: OutputDir, rel: str, samples) -> int:
    """Copy each sample's byte range from its input tar into the tar `rel` of `dst`; its size."""
    files: dict[str, Any] = {}
    n = 0
    try:
        with dst.open_output(rel) as out:
            for part, a, b in zip(*(samples[c].to_pylist() for c in ("part", "start", "end"))):
                if part not in files:
                    files[part] = src.fs.open_input_file(src.path(PartFiles(part).shard))
                files[part].seek(a)
                out.write(files[part].read(b - a))
                n += b - a
            out.write(END_OF_ARCHIVE)
    finally:
        for f in files.values():
            f.close()
    return n + len(END_OF_ARCHIVE)


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
    dups = [r for name in dst.list(f"{WORK}/duplicates", ".parquet") for r in read_rows(dst, f"{WORK}/duplicates/{name}")]
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
