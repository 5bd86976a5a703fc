"""Reliability: bad inputs beside good ones, SIGKILL and resume, long files, several nodes, secrets.

The runs here are real pipeline runs (subprocesses where a process must be killed or a separate
cluster joined), on short clips of pyannote's sample so they stay affordable on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from tests.conftest import corpus_files, run_cli, tone

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--set", "tokenize.allow_unreleased=true", "--set", "decode.chunk_seconds=12", "--set", "decode.cut_search_seconds=2"]
EACH = ["--set", "write.shard_size=1"]  # a part per chunk: commits show the progress a kill waits for


def commits(out: Path) -> int:
    return len(list((out / "commits").glob("part-*.parquet")))


def cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def reference(clips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    finish(cli([*map(str, clips), "--output", str(out), *FAST]))
    return out


def test_reference_run_has_several_chunks_per_source(reference):
    chunks = pq.read_table(reference / "commits").to_pylist()
    assert len(chunks) >= 4 and sum(c["samples"] for c in chunks) >= 2
    assert {c["chunk"] for c in chunks} >= {0, 1}


def test_a_pool_per_stage_gives_exactly_the_fused_corpus(reference, clips, tmp_path):
    """The default on CPU runs every stage after decode in one worker per core; on a cluster with
    a GPU, a pool per stage with the models on the GPU. Here the GPU is one Ray only believes in
    (`run.num_gpus=1`): the plan, placement and hand-offs are real, the models still run on CPU,
    so the samples must be the same bytes."""
    fused = json.loads((reference / "run.json").read_text())["operators"]
    assert len(fused) == 1 and fused[0]["stages"][0] == "vad" and fused[0]["stages"][-1] == "write"
    assert fused[0]["actors"] == os.cpu_count()  # a worker per core, one logical CPU left to decode
    out = tmp_path / "corpus"
    finish(cli([*map(str, clips), "--output", str(out), *FAST, "--set", "run.num_gpus=1"]))
    assert corpus_files(out) == corpus_files(reference)
    run = json.loads((out / "run.json").read_text())
    pools = {op["stages"][0]: op for op in run["operators"]}
    assert [op["stages"] for op in run["operators"]] == [[name] for name in fused[0]["stages"]]
    assert {name for name, op in pools.items() if op["gpus"]} == {"diarize", "asr", "tokenize"}
    assert set(run["actors_used"]) == {"vad", "diarize", "asr", "tokenize"}
    assert all(1 <= n <= pools[name]["max_actors"] for name, n in run["actors_used"].items())


@pytest.mark.parametrize("kill_after_chunks", [1, 3])
def test_sigkill_then_resume_gives_exactly_the_uninterrupted_corpus(reference, clips, tmp_path, kill_after_chunks):
    out = tmp_path / "corpus"
    proc = cli([*map(str, clips), "--output", str(out), *FAST, *EACH])
    deadline = time.time() + 600
    while commits(out) < kill_after_chunks and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray workers and raylet: no cleanup at all
    proc.wait()
    partial = corpus_files(out)
    assert 0 < len(partial) and len(partial) <= len(corpus_files(reference))
    finish(cli([*map(str, clips), "--output", str(out), *FAST]))
    assert corpus_files(out) == corpus_files(reference)  # the same samples and rows: none missing, none twice
    assert not list(out.rglob(".tmp-*"))
    parts = {p.stem for p in (out / "commits").glob("*.parquet")}
    assert all(p.stem.split(".")[0] in parts for sub in ("shards", "manifest") for p in (out / sub).iterdir())  # nothing uncommitted


def test_bad_inputs_are_recorded_and_good_files_unchanged(ray_session, clips, reference, tmp_path):
    d = tmp_path / "crawl"
    d.mkdir()
    (d / "empty.wav").write_bytes(b"")
    (d / "random.mp3").write_bytes(np.random.default_rng(1).bytes(20000))
    (d / "notes.mp3").write_text("this is a text file, not audio\n" * 50)
    (d / "folder.wav").mkdir()
    sf.write(d / "silence.wav", np.zeros(16000 * 5, np.float32), 16000)
    sf.write(d / "noise.wav", np.random.default_rng(2).standard_normal(16000 * 5).astype(np.float32) * 0.3, 16000)
    sf.write(d / "blip.wav", tone(0.1, 16000), 16000)
    nan = tone(3.0, 16000)
    nan[1000:2000] = np.nan
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(d / "cut.flac", np.tile(tone(1.0, 16000), 20), 16000)
    data = (d / "cut.flac").read_bytes()
    (d / "cut.flac").write_bytes(data[: len(data) // 2])
    (d / "weird.sph").write_bytes(b"NIST_1A\n   1024\nsample_count -i 99999999\nend_head\n" + b"\0" * 100)
    out = tmp_path / "out"
    # The good file is given by the same path as in the reference run: same source id, so the
    # samples it produces among bad inputs must be the very bytes it produced without them.
    result = run_cli(["run", str(d), str(clips[0]), "--output", str(out), *FAST])
    assert result.exit_code == 0, result.output

    errors = pq.read_table(out / "errors").to_pylist()
    rejected = pq.read_table(out / "rejected").to_pylist() if list((out / "rejected").glob("*.parquet")) else []
    recorded = {Path(e["uri"]).name: e for e in errors}
    for name in ("empty.wav", "random.mp3", "notes.mp3", "nan.wav", "weird.sph"):
        assert recorded[name]["stage"] == "decode" and recorded[name]["message"], name
    assert recorded["cut.flac"]["error_type"] == "TruncatedStream"
    rejected_sources = {r["uri"].rsplit("/", 1)[-1]: r["reason"] for r in rejected}
    for name in ("silence.wav", "blip.wav"):
        assert rejected_sources.get(name) == "no_speech", (name, rejected_sources)
    assert rejected_sources.get("noise.wav") == "no_speech", rejected_sources  # silero hears no speech in white noise
    # The good file: exactly the samples it produces alone (same source path -> same keys and bytes).
    alone = {k: v for k, v in corpus_files(reference).items() if "conv0-" in k}
    mixed = {k: v for k, v in corpus_files(out).items() if "conv0-" in k}
    assert alone and mixed == alone


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_an_error(ray_session, tmp_path):
    p = tmp_path / "locked.wav"
    sf.write(p, tone(1.0, 16000), 16000)
    p.chmod(0)
    out = tmp_path / "out"
    assert run_cli(["run", str(p), "--output", str(out), *FAST]).exit_code == 0
    (err,) = pq.read_table(out / "errors").to_pylist()
    assert err["error_type"] == "PermissionError"


def _peak_rss_decoding(path: Path) -> int:
    code = (
        "import resource, sys; from stages.decode import DecodeConfig, decode_chunks\n"
        "n = sum(c.audio16k.shape[1] for c in decode_chunks(sys.argv[1], DecodeConfig(chunk_seconds=60)))\n"
        "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, check=True)
    samples, kb = map(int, out.stdout.split())
    return samples, kb * 1024


def test_long_file_memory_is_bounded_by_chunk_not_length(tmp_path):
    rate = 16000
    block = (np.random.default_rng(3).standard_normal(rate * 60) * 0.1).astype(np.float32)
    sizes = {}
    for minutes in (10, 60):
        p = tmp_path / f"long{minutes}.flac"
        with sf.SoundFile(p, "w", rate, 1, format="FLAC") as f:
            for _ in range(minutes):
                f.write(block)
        samples, peak = _peak_rss_decoding(p)
        assert samples == minutes * 60 * rate
        sizes[minutes] = peak
    print(f"peak RSS decoding 10 min: {sizes[10] / 2**20:.0f} MiB, 60 min: {sizes[60] / 2**20:.0f} MiB")
    assert sizes[60] < 1.3 * sizes[10]  # 6x the audio, nearly the same memory


def test_hub_token_never_reaches_outputs(ray_session, clips, tmp_path, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "out"
    result = run_cli(["run", str(clips[1]), "--output", str(out), *FAST])
    assert result.exit_code == 0
    assert secret not in result.output
    for p in out.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


def _ray_workers(name: str) -> list[int]:
    """PIDs of Ray worker processes whose title mentions `name` (Ray sets titles like ray::StageWorker.chain)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::") and name in cmd:
                pids.append(int(p.name))
    return pids


def test_worker_killed_mid_run_is_retried_and_loses_nothing(reference, clips, tmp_path):
    out = tmp_path / "corpus"
    proc = cli([*map(str, clips), "--output", str(out), *FAST, *EACH])
    deadline, killed = time.time() + 600, []
    # Kill the actors (model workers) as soon as the first chunk is through, while work remains.
    while not killed and proc.poll() is None:
        assert time.time() < deadline
        if commits(out):
            killed = _ray_workers("StageWorker")
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    assert killed, "no worker to kill: the run finished too fast"
    finish(proc)
    assert corpus_files(out) == corpus_files(reference)


def test_several_nodes_give_the_same_samples(reference, clips, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        out = tmp_path / "corpus"
        log = finish(cli([*map(str, clips), "--output", str(out), "--address", cluster.address, *FAST]))
        assert corpus_files(out) == corpus_files(reference), log[-2000:]
        assert json.loads((out / "run.json").read_text())["nodes_used"] == 2  # the work really spread
    finally:
        cluster.shutdown()


def test_input_that_keeps_killing_workers_is_recorded_then_retried_on_resume(reference, clips, tmp_path):
    out = tmp_path / "corpus"
    args = [*map(str, clips), "--output", str(out), *FAST]
    proc = cli([*args, *EACH, "--set", "run.max_task_retries=1"])
    start, kills = time.time(), 0
    while proc.poll() is None:
        assert time.time() - start < 600, "run hung"
        if commits(out):  # once work flows, every model worker dies on sight
            for pid in _ray_workers("StageWorker"):
                os.kill(pid, signal.SIGKILL)
                kills += 1
        time.sleep(0.5)
    log = proc.stdout.read().decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    crashed = pq.read_table(out / "incomplete.parquet").to_pylist()
    assert kills and crashed and all(c["error_type"] == "WorkerCrashed" for c in crashed)
    # The crashed sources are not marked done: a rerun retries them and ends with the full corpus.
    finish(cli(args))
    assert corpus_files(out) == corpus_files(reference)
    assert not (out / "incomplete.parquet").exists()


def test_adding_inputs_processes_only_the_new_ones(reference, clips, tmp_path):
    import shutil

    out = tmp_path / "corpus"
    shutil.copytree(reference, out)
    before = corpus_files(out)
    audio, rate = sf.read(clips[0], dtype="float32")
    new = tmp_path / "new.wav"
    sf.write(new, audio[: rate * 8], rate)
    log = finish(cli([*map(str, clips), str(new), "--output", str(out), *FAST]))
    assert "3 inputs (2 already done)" in log
    after = corpus_files(out)
    assert {k: v for k, v in after.items() if k in before} == before  # finished work untouched
    added = set(after) - set(before)
    assert added and all("new-" in k for k in added)
