"""The corpus in parts (stages/corpus_parts.py, stages/write.py: PartWriter): objects grow with
bytes, a part is in the corpus once its commit object is, resume reads commit columns, one writer
at a time. No models, no Ray."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from pipeline.config import ConfigError
from pipeline.corpus import Lease, committed_state, not_done
from stages.corpus_format import ChunkRecord, OutputDir, chunk_name
from stages.corpus_parts import PartFiles, committed_parts, layout_problem, part_id, remove_uncommitted
from stages.speakers import link_source
from stages.write import ChunkOutput, PartWriter, tar_members


def output(source: str, chunk: int, last: bool, samples: int = 1, size: int = 1000) -> ChunkOutput:
    members = [(f"{source}-c{chunk:04d}-w{w:04d}.codes.npy", bytes([chunk % 256]) * size) for w in range(samples)]
    rows = [{"key": f"{source}-c{chunk:04d}-w{w:04d}", "source_id": source, "chunk": chunk, "start": 0.0, "end": 1.0,
             "duration": 1.0} for w in range(samples)]
    speakers = {"S0": {"seconds": 20.0, "embedding": [1.0, 0.0, 0.0], "channel": None}}
    record = ChunkRecord(source, f"/in/{source}.wav", chunk, last, 10.0 * chunk, 10.0, 30.0, None, samples, 0, 0, 1.0 * samples,
                         0, [], False, None, None, speakers)
    return ChunkOutput(chunk_name(source, chunk), tar_members(members), rows, [], [], record)


def writer(out: OutputDir, shard_size: int = 1 << 30) -> PartWriter:
    return PartWriter(out, shard_size, float("inf"), functools.partial(link_source, threshold=0.3, min_seconds=5.0))


def test_parts_hold_many_chunks_and_grow_with_bytes(tmp_path):
    out = OutputDir(str(tmp_path))
    out.makedirs()
    w = writer(out, shard_size=50_000)
    for s in range(30):  # thirty one-chunk sources of about 4 KB of samples each
        w.add(output(f"call{s:02d}", 0, True, samples=4))
    w.close()
    parts = committed_parts(out)
    assert 2 <= len(parts) <= 4  # by bytes, not by chunk or source
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 6 * len(parts)
    commits = pd.read_parquet(tmp_path / "commits")
    manifest = pd.read_parquet(tmp_path / "manifest")
    assert len(commits) == 30 and len(manifest) == 120 and set(manifest.shard) == {f"part-{p}.tar" for p in parts}
    # a commit's rows name the shard of their part; the part id is a function of its chunk names
    for p in parts:
        rows = pq.read_table(tmp_path / "commits" / f"part-{p}.parquet").to_pylist()
        assert part_id(chunk_name(r["source_id"], r["chunk"]) for r in rows) == p
        assert {r["shard"] for r in rows} == {f"part-{p}.tar"}
    # each source's speaker labelling is committed with its last chunk
    assert len(pd.read_parquet(tmp_path / "speakers")) == 30


def test_only_committed_parts_are_in_the_corpus_and_resume_reads_the_commit_columns(tmp_path):
    out = OutputDir(str(tmp_path))
    out.makedirs()
    w = writer(out)
    w.add(output("long", 0, False))
    w.add(output("long", 1, False))
    w.add(output("long", 1, False))  # a retried chunk: written once
    w.add(output("short", 0, True))
    w.close()
    # a run killed before its commit: the shard is there, the commit object is not
    files = PartFiles(part_id(["long-c0002"]))
    with out.open_output(files.shard) as f:
        f.write(b"half a part")
    (tmp_path / "manifest" / ".tmp-1234-part-x.parquet").write_bytes(b"temp")
    done, prior = committed_state(out)
    assert done.to_pylist() == ["/in/short.wav"]
    assert not_done(["/in/short.wav", "/in/long.wav", "/in/new.wav"], done) == [False, True, True]
    assert sorted(r.chunk for r in prior["long"]) == [0, 1]
    assert remove_uncommitted(out) == 2
    assert not (tmp_path / files.shard).exists() and len(committed_parts(out)) == 1
    # the rest of the source in a later run: its speakers are linked from both runs' records
    w = PartWriter(out, 1 << 30, float("inf"), functools.partial(link_source, threshold=0.3, min_seconds=5.0), prior)
    w.add(output("long", 2, True))
    w.close()
    done, prior = committed_state(out)
    assert sorted(done.to_pylist()) == ["/in/long.wav", "/in/short.wav"] and prior == {}
    speakers = pd.read_parquet(tmp_path / "speakers")
    assert sorted(c["chunk"] for c in speakers[speakers.source_id == "long"].chunks.iloc[0]) == [0, 1, 2]
    assert len(pd.read_parquet(tmp_path / "commits")) == 4  # every chunk once


def test_a_second_writer_is_refused_at_once_and_a_dead_ones_lease_is_taken_over(tmp_path):
    out = OutputDir(str(tmp_path))
    first = Lease(out).acquire()
    with pytest.raises(ConfigError, match=f"being written by another run .*pid {os.getpid()}"):
        Lease(out).acquire()
    first.release()
    assert not (tmp_path / "lease.json").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    held = json.loads(json.dumps({"token": "x", "host": os.uname().nodename, "pid": int(dead), "started": 0, "renewed": 9e12}))
    (tmp_path / "lease.json").write_text(json.dumps(held))  # a killed run's lease on this host
    with Lease(out):
        assert json.loads((tmp_path / "lease.json").read_text())["pid"] == os.getpid()


def test_a_corpus_of_the_older_layout_is_refused_with_one_line(sample_wav, tmp_path):
    (tmp_path / "chunks").mkdir()
    (tmp_path / "chunks" / "a-c0000.json").write_text("{}")
    assert "layout 1" in layout_problem(OutputDir(str(tmp_path)))
    for args in (["stats", str(tmp_path)], ["pack", str(tmp_path), "-o", str(tmp_path / "p")],
                 ["run", str(sample_wav), "--output", str(tmp_path), "--set", "tokenize.allow_unreleased=true"]):
        result = run_cli(args)
        assert result.exit_code == 2 and "layout 1" in result.output, (args, result.output)


def test_stats_on_a_directory_that_is_not_a_corpus_is_an_error(tmp_path):
    result = run_cli(["stats", str(tmp_path)])
    assert result.exit_code == 2 and "not a corpus" in result.output
