"""`pipeline pack DIR --output PACKED`: a corpus's per-chunk shards repacked for training.

`pipeline run` writes one shard per decoded chunk (at most 10 minutes of a source, about half a
megabyte of codes): a million hours would be six million tiny tars. Packing makes

    PACKED/train/shard-000000.tar ...   WebDataset shards of about --shard-size, samples shuffled
    PACKED/val/shard-000000.tar ...     across sources; val holds whole sources (none is in both)
    PACKED/<split>/manifest.parquet     the corpus manifest rows of the packed samples, `shard` renamed
    PACKED/<split>/index.parquet        shard, samples, bytes: readable without opening a tar
    PACKED/duplicates.parquet           samples whose codes equal an earlier sample's (packed once)
    PACKED/speakers/, speaker_map.parquet  the corpus's speaker maps, copied (the trainer applies them)
    PACKED/pack.json                    what was packed and how, written last

Samples keep their keys and member bytes. Everything is a function of the corpus and the seed
(shard assignment by hash, tar mtimes 0), so packing twice gives the same bytes, and a pack that was
interrupted is simply run again: every file is written under a temporary name and renamed.
Memory stays bounded: one pass reads tar headers and hashes each sample's codes, then each output
shard is streamed from byte ranges of the input tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

from stages.corpus_format import (CODES, CORPUS_MAP, SPEAKERS_DIR, TRAIN_SPLIT, VAL_SPLIT, OutputDir, manifest_schema,
                                  parquet_bytes)

SPLITS = (TRAIN_SPLIT, VAL_SPLIT)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--shard-size: {text!r} is not a size such as 500MB or 1GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _hash(*parts: Any) -> str:
    return hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()


@dataclass
class Packed:
    """One sample as found in the corpus: its members' byte ranges in their input tar."""

    key: str
    source_id: str
    shard: str  # input shard file (shards/<shard>)
    members: list[tuple[str, int, int]] = field(default_factory=list)  # (name, data offset, size)
    codes_sha1: str = ""

    @property
    def nbytes(self) -> int:  # in a tar: a 512-byte header per member, data padded to 512
        return sum(512 + -(-size // 512) * 512 for _, _, size in self.members)


def scan_shard(out: OutputDir, shard: str) -> list[Packed]:
    """The samples of one input tar, in order, with byte ranges and the sha1 of their codes."""
    samples: dict[str, Packed] = {}
    with out.fs.open_input_file(out.path("shards", shard)) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            key, _, suffix = m.name.partition(".")
            p = samples.setdefault(key, Packed(key, "", shard))
            p.members.append((m.name, m.offset_data, m.size))
            if suffix == CODES:
                p.codes_sha1 = hashlib.sha1(tar.extractfile(m).read()).hexdigest()
    return list(samples.values())


def split_sources(sources: list[str], val_fraction: float, seed: int) -> set[str]:
    """Held-out sources: the ones with the lowest hash, round(fraction x count) of them, at least
    one when there are two or more sources and the fraction is above zero."""
    if val_fraction <= 0 or len(sources) < 2:
        return set()
    n = min(len(sources) - 1, max(1, round(val_fraction * len(sources))))
    return set(sorted(sources, key=lambda s: _hash(seed, "split", s))[:n])


def plan_shards(samples: list[Packed], target: int, seed: int) -> list[list[Packed]]:
    """Samples in a seeded hash order (shuffled across sources), cut into shards of about `target` bytes."""
    shards: list[list[Packed]] = [[]]
    size = 0
    for p in sorted(samples, key=lambda p: _hash(seed, "order", p.key)):
        if shards[-1] and size + p.nbytes > target:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return [s for s in shards if s]


def write_shard(src: OutputDir, dst: OutputDir, rel: str, samples: list[Packed]) -> int:
    """Stream `samples` into the tar `rel` of `dst` (temporary name, then renamed); its size in bytes."""
    final = dst.path(rel)
    head, tail = final.rsplit("/", 1)
    tmp = f"{head}/.tmp-{tail}"
    files: dict[str, Any] = {}
    try:
        with dst.fs.open_output_stream(tmp) as raw:
            counter = _Counting(raw)
            with tarfile.open(fileobj=counter, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for p in samples:
                    if p.shard not in files:
                        files[p.shard] = src.fs.open_input_file(src.path("shards", p.shard))
                    f = files[p.shard]
                    for name, offset, size in p.members:
                        f.seek(offset)
                        info = tarfile.TarInfo(name)
                        info.size, info.mtime, info.mode = size, 0, 0o444
                        tar.addfile(info, io.BytesIO(f.read(size)))
    finally:
        for f in files.values():
            f.close()
    dst.fs.move(tmp, final)
    return counter.n


class _Counting:
    """A write-only stream that counts what passes through (tarfile's stream mode needs only write)."""

    def __init__(self, raw):
        self.raw, self.n = raw, 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        self.raw.write(data)
        return len(data)


def read_manifest(out: OutputDir) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for name in out.list("manifest", ".parquet"):
        rows += pq.read_table(io.BytesIO(out.read_bytes(f"manifest/{name}"))).to_pylist()
    return rows


def pack(corpus: str, output: str, shard_size: int, val_fraction: float, seed: int) -> dict[str, Any]:
    """Pack the corpus at `corpus` into `output`; returns what pack.json records."""
    import pyarrow as pa

    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    src, dst = OutputDir(corpus), OutputDir(output)
    rows = read_manifest(src)
    if not rows:
        raise FileNotFoundError(f"no samples in {src.path('manifest')}: is {corpus} a corpus made by `pipeline run`?")
    by_key = {r["key"]: r for r in rows}
    samples: list[Packed] = []
    for shard in sorted({r["shard"] for r in rows}):
        for p in scan_shard(src, shard):
            if p.key in by_key:  # a sample the manifest lists (it is written after its shard)
                p.source_id = by_key[p.key]["source_id"]
                samples.append(p)
    first: dict[str, Packed] = {}
    duplicates = []
    for p in sorted(samples, key=lambda p: p.key):
        if p.codes_sha1 in first:
            duplicates.append({"key": p.key, "source_id": p.source_id, "duplicate_of": first[p.codes_sha1].key,
                               "duplicate_of_source": first[p.codes_sha1].source_id})
        else:
            first[p.codes_sha1] = p
    kept = sorted(first.values(), key=lambda p: p.key)
    held = split_sources(sorted({p.source_id for p in kept}), val_fraction, seed)
    dst.fs.create_dir(dst.root, recursive=True)
    summary: dict[str, Any] = {"corpus": src.root, "shard_size": shard_size, "val_fraction": val_fraction, "seed": seed,
                               "duplicates": len(duplicates), "splits": {}}
    for split in SPLITS:
        dst.fs.create_dir(dst.path(split), recursive=True)
        part = [p for p in kept if (p.source_id in held) == (split == VAL_SPLIT)]
        index, manifest = [], []
        for i, shard in enumerate(plan_shards(part, shard_size, seed)):
            name = f"shard-{i:06d}.tar"
            nbytes = write_shard(src, dst, f"{split}/{name}", shard)
            index.append({"shard": name, "samples": len(shard), "bytes": nbytes})
            manifest += [{**by_key[p.key], "shard": name, "source_shard": by_key[p.key]["shard"]} for p in shard]
        schema = pa.schema([("shard", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64())])
        dst.write_bytes(f"{split}/index.parquet", parquet_bytes(index, schema) if index else _empty(schema))
        mschema = manifest_schema()
        dst.write_bytes(f"{split}/manifest.parquet", parquet_bytes(manifest, mschema) if manifest else _empty(mschema))
        summary["splits"][split] = {"shards": len(index), "samples": len(manifest), "bytes": sum(r["bytes"] for r in index),
                                    "sources": len({p.source_id for p in part})}
    dst.fs.create_dir(dst.path(SPEAKERS_DIR), recursive=True)
    for rel in [f"{SPEAKERS_DIR}/{n}" for n in src.list(SPEAKERS_DIR, ".parquet")] + [CORPUS_MAP] * src.exists(CORPUS_MAP):
        dst.write_bytes(rel, src.read_bytes(rel))
    dschema = pa.schema([(k, pa.string()) for k in ("key", "source_id", "duplicate_of", "duplicate_of_source")])
    dst.write_bytes("duplicates.parquet", parquet_bytes(duplicates, dschema) if duplicates else _empty(dschema))
    dst.write_bytes("pack.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def _empty(schema) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([], schema=schema), buf)
    return buf.getvalue()
