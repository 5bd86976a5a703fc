"""Two CPU processes (torchrun, gloo; DDP and FSDP2) train like one process on the same global batch."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.testing import make_shards, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Rank r trains on samples r, r + world, ... of a fixed global batch of 4, one sample per
# micro-batch (so two ranks also exercise gradient accumulation); one process takes all four
# as a single micro-batch. Rank 0 writes the per-step losses and a parameter checksum.
SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from train import data, listen, loop, parallel
from train.config import load_config, parse_sets
shards, tok_dir, out, split, mode = sys.argv[1:6]
cfg = load_config("configs/train/tiny.yaml", parse_sets([
    f"data.tokenizer={tok_dir}", "data.allow_unreleased_codec=true", "train.warmup_steps=1",
    "train.decoder_fraction=0.25", "train.steps=3", f"parallel.mode={mode}"]))
d = parallel.init_distributed()
tok = data.load_tokenizer(cfg.data.tokenizer)
model = loop.build_parallel_model(cfg, tok, d)  # FSDP: built on the meta device, rank 0's weights broadcast
wrapped = {"ddp": hasattr(model, "no_sync"), "fsdp": hasattr(model, "set_requires_gradient_sync")}
assert wrapped.get(mode, False) == (d.world > 1), (mode, type(model))
opt, sch = loop.build_optimizer(model, cfg.train)
urls, _ = data.list_shards(shards, 0.5)
batch = data.eval_batches(urls, data.SampleDecoder(tok, cfg.data, 32), 4, 1)[0]
pick = lambda idx: {"tokens": batch["tokens"][idx], "mask": batch["mask"][idx], "keys": [batch["keys"][i] for i in idx]}
micro = [pick([i]) for i in range(d.rank, 4, d.world)] if split == "split" else [pick([0, 1, 2, 3])]
losses = [loop.train_step(model, opt, sch, micro, cfg, s, d) for s in range(3)]
full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
checksum = sum(float(full(p).double().sum()) for p in model.parameters())
whole = listen.full_model(model, cfg, d)  # what samples are generated with: gathered under FSDP
assert (whole is None) != d.is_main
if d.is_main:
    whole_sum = sum(float(p.double().sum()) for p in whole.parameters())
    json.dump({"losses": losses, "checksum": checksum, "whole": whole_sum}, open(out, "w"))
parallel.shutdown()
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tiny_tokenizer(root / "tok")
    make_shards(root / "data", n_shards=3, per_shard=4)
    (root / "script.py").write_text(SCRIPT)
    return root


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(*args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single(corpus):
    args = [str(corpus / "data"), str(corpus / "tok"), str(corpus / "one.json"), "whole", "none"]
    proc = subprocess.run([sys.executable, str(corpus / "script.py"), *args],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((corpus / "one.json").read_text())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_single_process(corpus, single, mode):
    out = corpus / f"two-{mode}.json"
    _torchrun(str(corpus / "script.py"), str(corpus / "data"), str(corpus / "tok"), str(out), "split", mode)
    one, two = single, json.loads(out.read_text())
    for a, b in zip(one["losses"], two["losses"]):
        for key in ("loss", "c0_loss", "decoder_loss", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a, b)
        assert a["frames"] == b["frames"] and a["decoder_frames"] == b["decoder_frames"]
    assert one["losses"][-1]["loss"] < one["losses"][0]["loss"]  # it trained
    assert math.isclose(one["checksum"], two["checksum"], rel_tol=1e-5)
    assert two["whole"] == two["checksum"] and one["whole"] == one["checksum"]


def test_torchrun_cli_end_to_end(corpus, tmp_path):
    _torchrun("-m", "train", str(corpus / "data"), "--config", "configs/train/tiny.yaml",
              "--output", str(tmp_path / "run"), "--max-steps", "3",
              "--set", f"data.tokenizer={corpus / 'tok'}", "--set", "data.allow_unreleased_codec=true",
              "--set", "train.eval_every=3", "--set", "data.num_workers=1")
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records) and "eval_loss" in records[-1]
    assert (tmp_path / "run" / "checkpoints" / "step-0000003" / "rng-1.pt").exists()


def test_sharded_checkpoint_from_two_processes_resumes_on_one(corpus, tmp_path):
    """FSDP on 2 processes saves sharded (torch.distributed.checkpoint, asynchronously: step 1's write runs
    in the background over its own gloo group while step 2 trains) and full checkpoints of the same
    training; one process loads either into the same weights and optimizer state, and resumes both to the
    same losses; generate/export/evaluate read the sharded one too."""
    import shutil

    import torch

    from train import checkpoint, loop
    from train.config import load_config, parse_sets

    sets = [f"data.tokenizer={corpus / 'tok'}", "data.allow_unreleased_codec=true", "train.eval_every=0",
            "train.sample_every=0", "data.num_workers=0", "train.warmup_steps=1"]
    runs = {}
    for fmt in ("full", "sharded"):
        runs[fmt] = tmp_path / fmt
        extra = ["parallel.mode=fsdp", f"train.checkpoint_format={fmt}", "train.ckpt_every=1",
                 "train.async_checkpoint=true"]
        proc = _torchrun("-m", "train", str(corpus / "data"), "--config", "configs/train/tiny.yaml", "--output",
                         str(runs[fmt]), "--max-steps", "2", *[a for s in sets + extra for a in ("--set", s)])
        mode = "sharded, asynchronous" if fmt == "sharded" else "full (state.pt gathered on rank 0), synchronous"
        assert f"checkpoints: {mode}" in proc.stderr, proc.stderr[-3000:]
    ckpts = runs["sharded"] / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000001", "step-0000002"]
    step2 = ckpts / "step-0000002"
    assert (step2 / "dcp").is_dir() and not (step2 / "state.pt").exists()
    cfg = load_config("configs/train/tiny.yaml", parse_sets(sets))
    states = {}
    for fmt, run in runs.items():
        tok = loop.data.load_tokenizer(cfg.data.tokenizer)
        model = loop.build_model(cfg, tok)
        opt, sch = loop.build_optimizer(model, cfg.train)
        meta = checkpoint.load(checkpoint.latest(run), loop.parallel.Dist(), model, opt, sch)
        assert meta["step"] == 2 and meta["world"] == 2 and sch.last_epoch == 2
        states[fmt] = (model.state_dict(), [s["exp_avg"] for s in opt.state.values()])
    for k, v in states["full"][0].items():
        assert torch.equal(v, states["sharded"][0][k]), k
    assert len(states["full"][1]) == len(states["sharded"][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(states["full"][1], states["sharded"][1]))
    whole, _, _ = checkpoint.load_run_model(runs["sharded"])  # generate, export, evaluate
    assert all(torch.equal(v, states["full"][0][k]) for k, v in whole.state_dict().items())
    resumed = {}
    for fmt, run in runs.items():
        copy = tmp_path / f"{fmt}-resumed"
        shutil.copytree(run, copy)
        one = load_config("configs/train/tiny.yaml", parse_sets(sets + [f"train.checkpoint_format={fmt}"]))
        resumed[fmt] = loop.run(one, str(corpus / "data"), str(copy), max_steps=4, resume=True)
    assert [m["step"] for m in resumed["sharded"]] == [3, 4]
    assert [m["loss"] for m in resumed["sharded"]] == [m["loss"] for m in resumed["full"]]
