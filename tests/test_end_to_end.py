"""A Ray run on the embedded corpus, checked against the output contract (docs/output-format.md)."""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

from tests.conftest import run_cli


def _samples(out):
    shards = sorted(glob.glob(str(out / "shards" / "*.tar")))
    assert shards, "no shards written"
    # Plain tar members: bytes in, our own decoding (the trainer never unpickles shard content).
    return shards, list(wds.WebDataset(shards, shardshuffle=False))


def test_every_sample_follows_the_contract(embedded_run):
    shards, samples = _samples(embedded_run)
    assert samples
    for s in samples:
        key = s["__key__"]
        assert "." not in key
        meta = json.loads(s["json"])
        codes = np.load(io.BytesIO(s["codes.npy"]), allow_pickle=False)
        assert meta["key"] == key
        assert set(meta["source"]) >= {"uri", "id", "duration", "sample_rate", "channels"}
        assert meta["source"]["sample_rate"] == 16000 and meta["source"]["channels"] == 1
        assert abs(meta["source"]["duration"] - 30.0) < 0.01
        assert codes.dtype == np.int16 and codes.shape[0] == 32 == meta["codec"]["num_codebooks"]
        assert meta["codec"]["name"] == "mimi" and meta["codec"]["frame_rate"] == 12.5
        assert meta["codec"]["released"] is False  # embedded run: seeded random Mimi, and it says so
        utts = meta["utterances"]
        # Frame ranges tile the codes exactly, in order, one utterance after the other.
        assert utts[0]["frames"][0] == 0 and utts[-1]["frames"][1] == codes.shape[1]
        for a, b in zip(utts, utts[1:]):
            assert a["frames"][1] == b["frames"][0] and a["start"] <= b["start"]
        assert sum(u["frames"][1] - u["frames"][0] for u in utts) == codes.shape[1]
        for u in utts:
            assert u["text"] and u["speaker"]
            assert 0 <= u["start"] < u["end"] <= meta["source"]["duration"] + 1e-6
            assert u["frames"][1] - u["frames"][0] == int(np.ceil(round((u["end"] - u["start"]) * 24000) / 1920))
        assert meta["start"] == utts[0]["start"] and meta["end"] == utts[-1]["end"]
        # keep_audio is on for the embedded run: the window's 24 kHz audio.
        import soundfile as sf

        audio, rate = sf.read(io.BytesIO(s["flac"]))
        assert rate == 24000 and abs(len(audio) / rate - (meta["end"] - meta["start"])) < 0.01
    # The sample conversation has two speakers; the offline diarizer must find more than one.
    assert len({u["speaker"] for s in samples for u in json.loads(s["json"])["utterances"]}) >= 2


def test_manifest_matches_tar_samples_one_to_one(embedded_run):
    shards, samples = _samples(embedded_run)
    rows = pq.read_table(embedded_run / "manifest").to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(s["__key__"] for s in samples)
    by_key = {s["__key__"]: s for s in samples}
    for r in rows:
        s = by_key[r["key"]]
        meta = json.loads(s["json"])
        assert s["__url__"].endswith(r["shard"])
        assert r["frames"] == np.load(io.BytesIO(s["codes.npy"])).shape[1]
        assert r["utterances"] == len(meta["utterances"])
        assert r["speakers"] == len({u["speaker"] for u in meta["utterances"]})
        assert r["text_chars"] == sum(len(u["text"]) for u in meta["utterances"])
        assert abs(r["duration"] - (meta["end"] - meta["start"])) < 1e-9


def test_stats_json_equals_the_manifest(embedded_run):
    result = run_cli(["stats", str(embedded_run), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    rows = pq.read_table(embedded_run / "manifest").to_pylist()
    assert stats["samples"] == len(rows)
    assert stats["shards"] == len({r["shard"] for r in rows}) == len(glob.glob(str(embedded_run / "shards/*.tar")))
    assert stats["utterances"] == sum(r["utterances"] for r in rows)
    assert stats["frames"] == sum(r["frames"] for r in rows)
    assert abs(stats["audio_hours"] - sum(r["duration"] for r in rows) / 3600) < 1e-9
    assert abs(stats["input_hours"] - 30.0 / 3600) < 1e-6
    assert stats["errors"] == 0
    text = run_cli(["stats", str(embedded_run)]).output
    assert f"samples        {len(rows)}" in text


def test_run_json_records_config_versions_models_and_counts(embedded_run):
    run = json.loads((embedded_run / "run.json").read_text())
    assert run["embedded_default"] is True
    assert run["config"]["tokenize"]["allow_unreleased"] is True
    assert run["versions"]["moshi"] == "0.2.13" and run["versions"]["ray"].startswith("2.")
    assert run["models"]["codec"]["released"] is False and "random-init" in run["models"]["codec"]["weights"]
    assert run["models"]["asr"]["name"] == "whisperx"
    assert run["counts"]["samples"] == len(pq.read_table(embedded_run / "manifest"))
    assert abs(run["audio_hours"] * 3600 - 30.0) < 0.01
    assert set(run["stage_seconds"]) >= {"vad", "diarize", "asr", "tokenize", "write"}


def test_rerun_skips_finished_sources_and_keeps_bytes(embedded_run):
    before = {p: open(p, "rb").read() for p in glob.glob(str(embedded_run / "shards/*.tar"))}
    result = run_cli(["run", "--output", str(embedded_run)])
    assert result.exit_code == 0, result.output
    assert "(1 already done)" in result.output
    after = {p: open(p, "rb").read() for p in glob.glob(str(embedded_run / "shards/*.tar"))}
    assert after == before


def test_changed_config_on_existing_output_is_refused(embedded_run):
    result = run_cli(["run", "--output", str(embedded_run), "--set", "vad.threshold=0.7"])
    assert result.exit_code != 0 and "vad.threshold" in result.output
    # Pool sizes, memory declarations and Mimi's batching change nothing written: a resume may use others.
    result = run_cli(["run", "--output", str(embedded_run), "--set", "asr.actors=2", "--set", "tokenize.memory_gb=3",
                      "--set", "tokenize.batch_seconds=60"])
    assert result.exit_code == 0 and "(1 already done)" in result.output, result.output


def plan(cluster: dict[str, float], *sets: str) -> dict[str, "Operator"]:  # noqa: F821
    from pipeline.config import load_config
    from pipeline.ray_runner import plan_operators
    from stages.chain import build_stages

    config = load_config([], list(sets))
    return {"+".join(s.name for s in op.stages): op for op in plan_operators(build_stages(config), config, cluster)}


def test_operator_plan_fuses_on_cpu_and_sizes_pools_to_the_cluster():
    import pytest

    from pipeline.config import ConfigError
    from pipeline.ray_runner import worker_memory
    from stages.base import WORKER_BASE_GB

    # No GPU: one pool runs every stage after decode, a worker per CPU less the one left to decode,
    # each as wide as the widest stage.
    ((name, fused),) = plan({"CPU": 3.0}, "asr.cpus=2").items()
    assert name.startswith("vad+diarize+asr") and name.endswith("tokenize+write")
    assert fused.res.cpus == 2 and fused.min_actors == fused.max_actors == 1
    ((_, fused),) = plan({"CPU": 17.0}).items()
    assert fused.min_actors == fused.max_actors == 16
    # A fused worker holds every model at once; memory caps the workers a big CPU node gets.
    ((_, fused),) = plan({"CPU": 65.0, "memory": 40 * 2**30}, "tokenize.memory_gb=2.5").items()
    # vad 0.1 + diarize 0.6 + asr 0.5 + DNSMOS (filter_windows) 0.1 + tokenize 2.5
    assert worker_memory(fused.res) == int((WORKER_BASE_GB + 0.1 + 0.6 + 0.5 + 0.1 + 2.5) * 2**30)
    assert fused.max_actors == int(40 // (WORKER_BASE_GB + 3.8))
    ((_, fused),) = plan({"CPU": 96.0, "GPU": 2.0}, "run.fuse_stages=true", "asr.gpus=0.5").items()
    assert fused.max_actors == 4  # fused on GPUs: as many workers as the GPUs hold

    # GPUs: a pool per model stage, from one actor up to as many as the cluster holds for it.
    ops = plan({"CPU": 96.0, "GPU": 8.0}, "asr.gpus=0.25", "tokenize.gpus=0.5", "diarize.actors=3")
    assert (ops["asr"].min_actors, ops["asr"].max_actors) == (1, 32)
    assert (ops["tokenize"].min_actors, ops["tokenize"].max_actors) == (1, 16)
    assert (ops["vad"].min_actors, ops["vad"].max_actors) == (1, 190)  # CPU only: (96 - 1) / 0.5
    assert (ops["diarize"].min_actors, ops["diarize"].max_actors) == (3, 3)  # a size given is kept
    assert ops["write"].describe()["actors"] is None  # no model: plain tasks

    with pytest.raises(ConfigError, match="run.fuse_stages"):  # pools that cannot all start would wait forever
        plan({"CPU": 3.0}, "run.fuse_stages=false", "tokenize.cpus=4")
    with pytest.raises(ConfigError, match="asr.gpus"):  # as would a GPU stage on a cluster without one
        plan({"CPU": 8.0}, "run.fuse_stages=false", "asr.gpus=0.5")


def test_the_runs_workers_start_with_the_malloc_settings_unless_turned_off():
    """run.tune_malloc reaches the processes Ray starts (glibc reads it as a process starts), and only
    those: Ray started the way `pipeline run` starts it, in a fresh process (the suite shares one Ray)."""
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.ray_runner import MALLOC_ENV

    code = """
import json, os, ray
from pipeline.config import load_config
from pipeline.ray_runner import MALLOC_ENV, connected

@ray.remote
class Probe:
    def env(self):
        return {k: os.environ.get(k) for k in MALLOC_ENV}

seen = {}
for tune in ("true", "false"):
    with connected(None, load_config([], ["run.tune_malloc=" + tune], {})):
        seen[tune] = ray.get(Probe.remote().env.remote())
print(json.dumps({"seen": seen, "driver": {k: os.environ.get(k) for k in MALLOC_ENV}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["seen"]["true"] == MALLOC_ENV
    assert result["seen"]["false"] == {k: None for k in MALLOC_ENV}
    assert result["driver"] == {k: None for k in MALLOC_ENV}  # the driver's own environment is left alone


def test_a_backlogged_pool_grows_and_every_chunk_comes_back_once(ray_session):
    """The autoscaled pools on a real Ray: a slow stage with a queue gets more actors (up to its
    bound), and no chunk is lost or repeated on the way."""
    import time

    from pipeline.ray_runner import Operator, _dumps, _loads, apply_operator
    from stages.base import Resources, Stage
    from stages.records import Chunk, Recording

    class Slow(Stage):
        name = "slow"

        def resources(self) -> Resources:
            return Resources(cpus=0.5, actors=None, uses_model=True)

        def process(self, chunk: Chunk) -> Chunk:
            time.sleep(1.0)
            return chunk

    rec = Recording("src", "file:///src.wav", 12.0, 16000, 1)
    chunks = [Chunk(rec, i, float(i), i == 11, audio16k=np.zeros((1, 160), np.float32)) for i in range(12)]
    ds = ray_session.data.from_items([{"chunk": b} for b in _dumps(chunks)["chunk"]], override_num_blocks=12)
    ds = apply_operator(ds, Operator([Slow(None)], Slow(None).resources(), 1, 3), max_retries=0)
    out = _loads({"chunk": [row["chunk"] for row in ds.iter_rows()]})
    assert sorted(c.index for c in out) == list(range(12))
    actors = {c.placement["slow"]["actor"] for c in out}
    assert 2 <= len(actors) <= 3


def test_the_fused_chain_hands_out_every_chunk_once_and_gives_its_workers_back(ray_session):
    """The fused runner on Ray's task API: streamed decode tasks, one chunk at a time per actor.
    Sources of several chunks each come back chunk by chunk, each once, spread over both actors;
    a stage may write into a chunk's arrays (they are not read-only views of the object store);
    and once done, every CPU the actors held is free again for whatever runs next."""
    import time

    from pipeline.ray_runner import Operator, fused_summaries
    from stages.base import Resources, Stage
    from stages.records import Chunk, Recording

    class Source(Stage):
        name = "decode"

        def chunks(self, uri: str):
            rec = Recording(uri.rsplit("/", 1)[-1], uri, 4.0, 16000, 1)
            for i in range(4):
                yield Chunk(rec, i, float(i), i == 3, audio16k=np.zeros((1, 160), np.float32))

    class Scale(Stage):
        name = "scale"

        def resources(self) -> Resources:
            return Resources(cpus=1.0, uses_model=True)

        def process(self, chunk: Chunk) -> Chunk:
            chunk.audio16k *= 0.5  # in place: raises on a read-only array
            time.sleep(0.2)
            return chunk

    op = Operator([Scale(None)], Scale(None).resources(), 2, 2)
    uris = [f"file:///src{i}.wav" for i in range(3)]
    out = list(fused_summaries(uris, Source(None), op, max_retries=0))
    assert sorted((s.record.uri, s.record.chunk) for s in out) == [(u, i) for u in uris for i in range(4)]
    assert not any(s.record.errors for s in out)
    assert len({s.placement["scale"]["actor"] for s in out}) == 2
    total, deadline = ray_session.cluster_resources()["CPU"], time.time() + 30
    while ray_session.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == total


def test_one_long_recording_is_spread_over_every_worker(ray_session, sample_wav, tmp_path):
    """A single file of several chunks keeps both workers busy (issue: long recordings left cores
    idle; Ray Data once packed a decode task's chunks into one block, and a block goes to one
    worker). The session's Ray has a worker per core, here 2."""
    import os

    import soundfile as sf

    audio, rate = sf.read(sample_wav, dtype="float32")
    wav = tmp_path / "long.wav"
    sf.write(wav, np.concatenate([audio, audio[: 15 * rate]]), rate)  # 45 s: five 9 s chunks
    out = tmp_path / "corpus"
    result = run_cli(["run", str(wav), "--output", str(out), "--set", "tokenize.allow_unreleased=true",
                      "--set", "decode.chunk_seconds=9", "--set", "decode.cut_search_seconds=2"])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["chunks"] >= 4
    assert run["actors_used"]["tokenize"] == min(2, os.cpu_count() or 1)
