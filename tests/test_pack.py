"""`pipeline pack`: a corpus of per-chunk shards repacked into sized, shuffled train/val shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.pack import pack, parse_size
from stages.corpus_format import (CODES, JSON, ChunkFiles, OutputDir, Sample, chunk_name, manifest_row, manifest_schema,
                                  parquet_bytes, sample_key)
from train.testing import make_sample


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_corpus(root: Path, sources: int = 6, chunks: int = 2, per_chunk: int = 5) -> dict[str, bytes]:
    """A corpus laid out as `pipeline run` writes it; the last source is a re-upload of the first
    (same codes under other keys). Returns key -> codes bytes."""
    out = OutputDir(str(root))
    out.makedirs()
    rng = np.random.default_rng(0)
    codes: dict[str, bytes] = {}
    first: list[dict] = []
    for s in range(sources):
        sid = f"talk{s}-{s:010x}"
        for c in range(chunks):
            members, rows = [], []
            for w in range(per_chunk):
                key = sample_key(sid, c, w)
                raw = make_sample(rng, key, released=True)
                if s == sources - 1:  # the duplicate source: the first source's codes again
                    raw = {**raw, CODES: first[c * per_chunk + w][CODES]}
                elif s == 0:
                    first.append(raw)
                sample = Sample.from_json(raw[JSON])
                sample.source.id, sample.source.uri, sample.chunk = sid, f"file:///{sid}.wav", c
                members += [(f"{key}.{JSON}", sample.to_json()), (f"{key}.{CODES}", raw[CODES])]
                rows.append(manifest_row(sample, frames=int(sample.utterances[-1].frames[1])))
                codes[key] = raw[CODES]
            files = ChunkFiles(chunk_name(sid, c))
            out.write_bytes(files.shard, _tar(members))
            out.write_bytes(files.manifest, parquet_bytes(rows, manifest_schema()))
    return codes


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sizes_parse_and_bad_ones_name_the_option():
    assert parse_size("1GB") == 10**9 and parse_size("500 MiB") == 500 * 2**20 and parse_size("2048") == 2048
    with pytest.raises(ValueError, match="--shard-size"):
        parse_size("big")


def test_pack_splits_by_source_sizes_shards_and_drops_re_uploads(tmp_path):
    import webdataset as wds

    codes = make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "speakers" / "talk0-0000000000.parquet").write_bytes(b"a speaker map")
    summary = pack(str(tmp_path / "corpus"), str(tmp_path / "packed"), shard_size=40_000, val_fraction=0.2, seed=1)
    packed = tmp_path / "packed"
    dups = pd.read_parquet(packed / "duplicates.parquet")
    assert len(dups) == 10 and set(dups.source_id) == {"talk5-0000000005"}  # the re-upload, listed
    assert set(dups.duplicate_of_source) == {"talk0-0000000000"}
    seen: dict[str, set[str]] = {}
    for split in ("train", "val"):
        index = pd.read_parquet(packed / split / "index.parquet")
        manifest = pd.read_parquet(packed / split / "manifest.parquet")
        keys = []
        for row in index.itertuples():
            path = packed / split / row.shard
            assert path.stat().st_size == row.bytes
            got = list(wds.WebDataset(str(path), shardshuffle=False))
            assert len(got) == row.samples
            for s in got:  # member bytes unchanged
                assert s["codes.npy"] == codes[s["__key__"]]
                assert Sample.from_json(s["json"]).key == s["__key__"]
            keys += [s["__key__"] for s in got]
        assert sorted(keys) == sorted(manifest.key) and len(set(keys)) == len(keys)
        # about the target size: only the last shard of a split may be small
        assert all(b <= 40_000 + 6_000 for b in index.bytes) and all(b > 20_000 for b in index.bytes[:-1])
        seen[split] = set(manifest.source_id)
        assert keys != sorted(keys)  # shuffled, not in corpus order
    assert not seen["train"] & seen["val"] and seen["val"]  # no source in both, and val is not empty
    assert summary["splits"]["train"]["samples"] + summary["splits"]["val"]["samples"] == len(codes) - 10
    assert (packed / "speakers" / "talk0-0000000000.parquet").read_bytes() == b"a speaker map"  # the trainer applies it


def test_packing_twice_or_after_an_interruption_gives_the_same_bytes(tmp_path):
    make_corpus(tmp_path / "corpus", sources=4, chunks=1)
    args = dict(shard_size=30_000, val_fraction=0.25, seed=7)
    pack(str(tmp_path / "corpus"), str(tmp_path / "a"), **args)
    pack(str(tmp_path / "corpus"), str(tmp_path / "b"), **args)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    # an interrupted pack: a truncated shard, a leftover temporary, no pack.json
    first = next((tmp_path / "b" / "train").glob("*.tar"))
    first.write_bytes(first.read_bytes()[:1000])
    (tmp_path / "b" / "train" / ".tmp-shard-000009.tar").write_bytes(b"partial")
    (tmp_path / "b" / "pack.json").unlink()
    pack(str(tmp_path / "corpus"), str(tmp_path / "b"), **args)
    (tmp_path / "b" / "train" / ".tmp-shard-000009.tar").unlink()  # not ours to know; readers skip dot files
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    # another seed shuffles differently
    pack(str(tmp_path / "corpus"), str(tmp_path / "c"), **{**args, "seed": 8})
    assert _tree(tmp_path / "a") != _tree(tmp_path / "c")


def test_pack_of_a_directory_without_a_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no samples"):
        pack(str(tmp_path), str(tmp_path / "out"), 10**6, 0.0, 0)


def test_pack_command(tmp_path):
    from conftest import run_cli

    make_corpus(tmp_path / "corpus", sources=3, chunks=1)
    result = run_cli(["pack", str(tmp_path / "corpus"), "--output", str(tmp_path / "packed"), "--shard-size", "20KB",
                      "--val-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    assert "duplicate samples dropped" in result.output and (tmp_path / "packed" / "pack.json").exists()
    assert len(list((tmp_path / "packed" / "train").glob("*.tar"))) >= 2
    bad = run_cli(["pack", str(tmp_path / "corpus"), "--output", str(tmp_path / "x"), "--shard-size", "huge"])
    assert bad.exit_code != 0 and "--shard-size" in bad.output
