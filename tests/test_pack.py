"""`pipeline pack`: a corpus of per-chunk shards repacked into sized, shuffled train/val shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.pack import pack, parse_size
from stages.corpus_format import CODES, JSON, OutputDir, Sample, sample_key
from stages.corpus_parts import committed_parts
from train.testing import make_sample, write_corpus


def make_corpus(root: Path, sources: int = 6, chunks: int = 2, per_chunk: int = 5) -> dict[str, bytes]:
    """A corpus laid out as `pipeline run` writes it (a part per chunk); the last source is a
    re-upload of the first (same codes under other keys). Returns key -> codes bytes."""
    rng = np.random.default_rng(0)
    codes: dict[str, bytes] = {}
    first: list[dict] = []
    todo = []
    for s in range(sources):
        sid = f"talk{s}-{s:010x}"
        for c in range(chunks):
            raws = []
            for w in range(per_chunk):
                key = sample_key(sid, c, w)
                raw = make_sample(rng, key, released=True, source=sid)
                if s == sources - 1:  # the duplicate source: the first source's codes again
                    raw = {**raw, CODES: first[c * per_chunk + w][CODES]}
                elif s == 0:
                    first.append(raw)
                sample = Sample.from_json(raw[JSON])
                sample.chunk = c
                raws.append({**raw, JSON: sample.to_json()})
                codes[key] = raw[CODES]
            todo.append((sid, c, c == chunks - 1, raws))
    write_corpus(root, todo)
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
    part = committed_parts(OutputDir(str(tmp_path / "corpus")))[0]
    (tmp_path / "corpus" / "speakers" / f"part-{part}.parquet").write_bytes(b"a speaker map")
    summary = pack(str(tmp_path / "corpus"), str(tmp_path / "packed"), shard_size=40_000, val_fraction=0.2, seed=1)
    packed = tmp_path / "packed"
    dups = pd.read_parquet(packed / "duplicates.parquet")
    assert len(dups) == 10 and set(dups.source_id) == {"talk5-0000000005"}  # the re-upload, listed
    assert set(dups.duplicate_of_source) == {"talk0-0000000000"}
    seen: dict[str, set[str]] = {}
    for split in ("train", "val"):
        index = pd.read_parquet(packed / split / "index")
        manifest = pd.read_parquet(packed / split / "manifest")
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
    assert (packed / "speakers" / f"part-{part}.parquet").read_bytes() == b"a speaker map"  # the trainer applies it


def test_packing_twice_or_after_an_interruption_gives_the_same_bytes(tmp_path):
    make_corpus(tmp_path / "corpus", sources=4, chunks=1)
    args = dict(shard_size=30_000, val_fraction=0.25, seed=7)
    pack(str(tmp_path / "corpus"), str(tmp_path / "a"), **args)
    pack(str(tmp_path / "corpus"), str(tmp_path / "b"), **args)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    # interrupted in its last window: a truncated shard, no window marker, no pack.json
    last = sorted((tmp_path / "b" / ".pack" / "windows").glob("*.json"))[-1]
    shard = sorted((tmp_path / "b" / "train").glob(f"shard-{last.stem}-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    last.unlink()
    (tmp_path / "b" / "pack.json").unlink()
    pack(str(tmp_path / "corpus"), str(tmp_path / "b"), **args)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    with pytest.raises(ValueError, match="other settings"):  # never mixed with another pack's shards
        pack(str(tmp_path / "corpus"), str(tmp_path / "b"), **{**args, "shard_size": 20_000})
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


def test_pack_as_ray_tasks_gives_the_same_bytes(ray_session, tmp_path):
    """`pipeline pack --address`: each pass's tasks run on the cluster, the output is the same."""
    from pipeline.ray_runner import task_mapper

    make_corpus(tmp_path / "corpus", sources=4, chunks=2)
    args = dict(shard_size=30_000, val_fraction=0.25, seed=3)
    pack(str(tmp_path / "corpus"), str(tmp_path / "here"), **args)
    with task_mapper(ray_session.get_runtime_context().gcs_address) as map_tasks:
        pack(str(tmp_path / "corpus"), str(tmp_path / "tasks"), **args, map_tasks=map_tasks)
    assert _tree(tmp_path / "here") == _tree(tmp_path / "tasks")
