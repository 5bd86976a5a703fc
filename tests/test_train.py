"""Trainer: sample layout, targets, amortization, overfitting, exact resume, config, codec guard."""

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stages.corpus_format import CODES, JSON, Sample
from train import data, loop, loss
from train.cli import train as train_cmd
from train.config import load_config, parse_sets
from train.parallel import Dist
from train.testing import make_sample, make_shards, tiny_tokenizer

N = 32


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: two threads only add contention on a 2-core machine (and the tests run faster).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tiny_tokenizer(root / "tok")
    make_shards(root / "data", n_shards=3, per_shard=6)
    return root


def _cfg(corpus, **over):
    base = {"data": {"tokenizer": str(corpus / "tok"), "allow_unreleased_codec": True}}
    for k, v in parse_sets([f"{k}={v}" for k, v in over.items()]).items():
        base.setdefault(k, {}).update(v)
    return load_config("configs/train/tiny.yaml", base)


def _batch(shards_dir, cfg, n=4, start=0):
    tok = data.load_tokenizer(cfg.data.tokenizer)
    urls, _ = data.list_shards(shards_dir, 0.5)
    samples = data.eval_batches(urls, data.SampleDecoder(tok, cfg.data, cfg.model.num_codebooks), n + start, 1)[0]
    return {k: v[start:] for k, v in samples.items()}


def test_rows_layout_text_audio_end_of_audio(corpus):
    cfg = _cfg(corpus)
    tok = data.load_tokenizer(cfg.data.tokenizer)
    raw = make_sample(np.random.default_rng(5), "k", released=True, utterances=(2, 2), frames=(3, 3))
    sample = Sample.from_json(raw[JSON])
    codes = np.load(io.BytesIO(raw[CODES]))
    tokens, mask = data.build_rows(sample, codes, tok, cfg.data, N)
    u0 = sample.utterances[0]
    ids = [tok.bos_token_id, *tok.encode(f"[0]{u0.text}", add_special_tokens=False), tok.eos_token_id]
    n = len(ids)
    assert tokens[:n, N].tolist() == ids and mask[:n, N].all() and not mask[:n, :N].any()
    np.testing.assert_array_equal(tokens[n : n + 3, :N], codes[:, 0:3].T)
    assert mask[n : n + 4, :N].all() and not mask[n : n + 4, N].any()
    assert (tokens[n + 3, :N] == 0).all()  # end-of-audio frame after each utterance
    assert tokens[n + 4, N] == tok.bos_token_id  # next utterance's text; speaker renumbered to 1
    assert tok.decode(tokens[n + 5 : n + 8, N].tolist()).replace(" ", "").startswith("[1]")
    # Cropping keeps whole utterances.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=n + 4 + 2))
    tokens, _ = data.build_rows(sample, codes, tok, cfg.data, N)
    assert len(tokens) == n + 4


def test_decoder_conditioned_on_previous_backbone_position(corpus):
    cfg = _cfg(corpus)
    tok = data.load_tokenizer(cfg.data.tokenizer)
    model = loop.build_model(cfg, tok).eval()
    batch = loss.prepare(_batch(corpus / "data", cfg), 0.5, 0, 0, N)
    seen = {}
    model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    model.projection.register_forward_hook(lambda m, i, o: seen.__setitem__("dec_in", i[0]))
    with torch.no_grad():
        model(batch["tokens"], batch["mask"], batch["c0_index"], batch["dec_index"])
    b, t = batch["dec_index"]
    assert len(b) > 2
    torch.testing.assert_close(seen["dec_in"][:, 0], seen["h"][b, t - 1])
    assert not torch.allclose(seen["dec_in"][:, 0], seen["h"][b, t])  # the common off-by-one
    # Teacher forcing: decoder positions 1..N-1 carry codebooks 0..N-2 of frame t itself.
    expected = model.audio_embeddings(batch["tokens"][b, t, : N - 1] + model.audio_offsets[: N - 1])
    torch.testing.assert_close(seen["dec_in"][:, 1:], expected)


def test_amortization_subset_size_changes_and_end_of_audio_is_target(corpus):
    cfg = _cfg(corpus)
    batch = _batch(corpus / "data", cfg)
    per_sample = batch["mask"][:, 1:, 0].sum(1)
    is_eos = batch["mask"][..., 0] & (batch["tokens"][..., :N] == 0).all(-1)
    eos_per_sample = is_eos[:, 1:].sum(1)
    subsets = []
    for step in range(4):
        p = loss.prepare(batch, 1 / 16, 0, step, N)
        b, t = p["dec_index"]
        counts = torch.bincount(b, minlength=len(per_sample))
        expected = [max(1, round(int(n - e) / 16)) + int(e) for n, e in zip(per_sample, eos_per_sample)]
        assert counts.tolist() == expected
        assert p["dec_count"] == sum(expected) * (N - 1)
        assert batch["mask"][b, t, 0].all()  # audio frames only
        # Every end-of-audio frame is a decoder target, every step: the decoder learns to stop.
        chosen = set(zip(b.tolist(), t.tolist()))
        assert set(zip(*[x.tolist() for x in is_eos.nonzero(as_tuple=True)])) <= chosen
        subsets.append(chosen)
    assert len({frozenset(s) for s in subsets}) > 1  # a new subset each step
    assert loss.decoder_subset_size(3, 1 / 16) == 1 and loss.decoder_subset_size(64, 1 / 16) == 4
    # End-of-audio frames (all 32 codes 0) are codebook-0 targets, target 0.
    p = loss.prepare(batch, 1 / 16, 0, 0, N)
    b, t = p["c0_index"]
    eos = (batch["tokens"][b, t, :N] == 0).all(-1)
    bos = data.load_tokenizer(cfg.data.tokenizer).bos_token_id
    n_utts = int(((batch["tokens"][..., N] == bos) & batch["mask"][..., N]).sum())
    assert int(eos.sum()) == n_utts
    assert p["c0_count"] == int(per_sample.sum())


def test_overfit_few_samples_both_losses_drop(tmp_path, corpus):
    make_shards(tmp_path / "small", n_shards=2, per_shard=2, utterances=(2, 2), frames=(4, 6))
    cfg = _cfg(corpus, **{"train.lr": 5e-3, "train.warmup_steps": 5, "train.min_lr_ratio": 1.0,
                          "train.decoder_fraction": 1.0})
    tok = data.load_tokenizer(cfg.data.tokenizer)
    model = loop.build_model(cfg, tok)
    optimizer, scheduler = loop.build_optimizer(model, cfg.train)
    batch = _batch(tmp_path / "small", cfg, n=2)
    hist = [loop.train_step(model, optimizer, scheduler, [batch], cfg, s, Dist()) for s in range(40)]
    first, last = hist[0], hist[-1]
    assert last["c0_loss"] < first["c0_loss"] / 5, (first, last)
    assert last["decoder_loss"] < first["decoder_loss"] / 5, (first, last)


def test_unreleased_codec_refused_without_flag(tmp_path, corpus):
    cfg = _cfg(corpus, **{"data.allow_unreleased_codec": False})
    urls, _ = data.list_shards(corpus / "data", 0.5)
    with pytest.raises(ValueError, match="allow_unreleased_codec"):
        data.preflight(urls, False, N, 2051)
    with pytest.raises(ValueError, match="released"):  # also per sample, inside the stream
        data.eval_batches(urls, data.SampleDecoder(data.load_tokenizer(cfg.data.tokenizer), cfg.data, N), 2, 1)
    result = CliRunner().invoke(train_cmd, [str(corpus / "data"), "--config", "configs/train/tiny.yaml",
                                            "--output", str(tmp_path / "run"), "--set", f"data.tokenizer={corpus / 'tok'}"])
    assert result.exit_code != 0 and "allow_unreleased_codec" in str(result.exception)
    released = make_shards(tmp_path / "ok", n_shards=2, per_shard=2, released=True)
    data.preflight(data.list_shards(released, 0.5)[0], False, N, 2051)


def test_config_overrides_strict(tmp_path):
    cfg = load_config("configs/train/tiny.yaml", parse_sets(["train.lr=1e-4", "model.rope_scaling=null"]))
    assert cfg.train.lr == 1e-4 and cfg.model.rope_scaling is None and cfg.model.flavour == "tiny"
    with pytest.raises(KeyError, match="train.lrr"):
        load_config(None, parse_sets(["train.lrr=1"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  shuffle_bufer: 3\n")
    with pytest.raises(KeyError, match="data.shuffle_bufer"):
        load_config(str(bad))
    load_config("configs/train/1b.yaml")
    assert load_config("configs/train/csm-1b-finetune.yaml").model.init_from == "sesame/csm-1b"


def test_missing_tokenizer_names_the_config_key(tmp_path):
    with pytest.raises(RuntimeError, match="data.tokenizer"):
        data.load_tokenizer(str(tmp_path / "no-such-tokenizer"))


def _cli(corpus, run_dir, *extra):
    args = [str(corpus / "data"), "--config", "configs/train/tiny.yaml", "--output", str(run_dir),
            "--set", f"data.tokenizer={corpus / 'tok'}", "--set", "data.allow_unreleased_codec=true",
            "--set", "data.epoch_batches=5", "--set", "data.num_workers=2", "--set", "train.steps=8",
            "--set", "train.eval_every=2", "--set", "train.ckpt_every=0", *extra]
    result = CliRunner().invoke(train_cmd, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_resume_at_odd_step_with_two_workers_gives_same_losses(tmp_path, corpus):
    straight = _cli(corpus, tmp_path / "a", "--max-steps", "7")
    _cli(corpus, tmp_path / "b", "--max-steps", "3")  # 3 batches into a 5-batch epoch, 2 workers
    resumed = _cli(corpus, tmp_path / "b", "--max-steps", "7", "--resume")
    assert [r["step"] for r in resumed] == list(range(1, 8))  # appended to the first leg's records
    for a, b in zip(straight[3:], resumed[3:]):  # steps 4..7 cross an epoch boundary
        assert a["loss"] == b["loss"] and a["decoder_loss"] == b["decoder_loss"], (a, b)
    rec = straight[-1]
    for key in ("c0_loss", "decoder_loss", "lr", "frames_per_s", "tokens_per_s", "peak_mem_gb"):
        assert key in rec
    assert os.path.exists(tmp_path / "a" / "checkpoints" / "latest")
    evals = [r for r in straight if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    per_cb = [evals[0][f"eval_cb{k}_loss"] for k in range(N)]  # every codebook scored, on every frame
    assert evals[0]["eval_c0_loss"] == per_cb[0]
    assert abs(evals[0]["eval_decoder_loss"] - sum(per_cb[1:]) / (N - 1)) < 1e-9


def _held_back_async_writes(monkeypatch, last_step: int, events: list):
    """DCP's background writes held until the test sets their gate (returned, by checkpoint id), so a
    checkpoint is still being written while training goes on, deterministically; `events` gets
    "write <dir>" when a write starts. The last step's is not held (the end of the run waits for it)."""
    import threading

    import torch.distributed.checkpoint.state_dict_saver as saver

    from train import checkpoint

    real_async, real_write, gates = checkpoint.dcp.async_save, saver.save, {}

    def async_save(state, **kw):  # the training thread: stages, then hands the write to DCP's thread
        gates[str(kw["checkpoint_id"])] = gate = threading.Event()
        if f"step-{last_step:07d}" in str(kw["checkpoint_id"]):
            gate.set()
        return real_async(state, **kw)

    def write(*args, **kw):  # DCP's background thread (it imports state_dict_saver.save when it runs)
        assert gates[str(kw["checkpoint_id"])].wait(timeout=120), "write never released"
        events.append(f"write {Path(kw['checkpoint_id']).parent.name}")
        return real_write(*args, **kw)

    monkeypatch.setattr(checkpoint.dcp, "async_save", async_save)
    monkeypatch.setattr(saver, "save", write)
    return gates


def test_async_checkpoint_pending_while_training_then_resumes_exactly(tmp_path, corpus, monkeypatch):
    """Sharded + async: each save's write starts only after the next training step has changed the
    weights it was staged from; until it ends its directory is .tmp- and `latest` the previous one;
    resuming an async-saved mid-run checkpoint reproduces the uninterrupted run's losses bit for bit."""
    import shutil

    from train import checkpoint

    sets = {"train.checkpoint_format": "sharded", "train.async_checkpoint": True, "train.ckpt_every": 2,
            "train.keep_checkpoints": 3, "train.eval_every": 0, "train.sample_every": 0, "train.steps": 6}
    cfg = _cfg(corpus, **sets)
    run, events, seen, real_step = tmp_path / "a", [], [], loop.train_step
    gates = _held_back_async_writes(monkeypatch, 6, events)

    def step_then_release(model, optimizer, scheduler, micro, cfg, step, d):
        if step == 4:  # step 5 starts: step 4's save returned (staged) but its write is held back
            seen.append((checkpoint.latest(run).name, sorted(p.name for p in (run / "checkpoints").iterdir())))
        out = real_step(model, optimizer, scheduler, micro, cfg, step, d)
        events.append(f"step {step + 1}")
        for g in gates.values():
            g.set()  # a held write may start now, after a step that changed the weights
        return out

    monkeypatch.setattr(loop, "train_step", step_then_release)
    straight = loop.run(cfg, str(corpus / "data"), str(run))
    assert seen == [("step-0000002", [".tmp-step-0000004", "latest", "step-0000002"])]
    assert events.index("write .tmp-step-0000002") > events.index("step 3")
    assert events.index("write .tmp-step-0000004") > events.index("step 5")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000002", "step-0000004", "step-0000006"]
    assert checkpoint.latest(run).name == "step-0000006"  # the last save waited for at the end of the run
    monkeypatch.undo()  # the real train_step and DCP
    shutil.copytree(run, tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-0000004")
    resumed = loop.run(cfg, str(corpus / "data"), str(tmp_path / "b"), resume=True)
    assert [m["step"] for m in resumed] == [5, 6]
    for a, b in zip(straight[4:], resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)


def test_async_checkpoint_failed_write_never_becomes_latest(tmp_path, corpus, monkeypatch):
    """A write that fails in the background raises at wait() (here: at the end of the `saving` block)
    and leaves `latest` on the last complete checkpoint; a full-format run says it saves synchronously."""
    import concurrent.futures

    from train import checkpoint

    cfg = _cfg(corpus)
    tok = data.load_tokenizer(cfg.data.tokenizer)
    model = loop.build_model(cfg, tok)
    opt, sch = loop.build_optimizer(model, cfg.train)
    save = lambda step: checkpoint.save(tmp_path, Dist(), model, opt, sch, step, {"consumed": 0},  # noqa: E731
                                        cfg.to_dict(), 2, sharded=True, asynchronous=True)
    save(1)
    assert checkpoint.latest(tmp_path) is None and (tmp_path / "checkpoints" / ".tmp-step-0000001").is_dir()
    assert checkpoint.wait().name == "step-0000001" and checkpoint.latest(tmp_path).name == "step-0000001"

    def failing(*args, **kw):
        f = concurrent.futures.Future()
        f.set_exception(OSError("disk full"))
        return f

    monkeypatch.setattr(checkpoint.dcp, "async_save", failing)
    with pytest.raises(OSError, match="disk full"), checkpoint.saving():
        save(2)
    assert checkpoint.latest(tmp_path).name == "step-0000001" and checkpoint.wait() is None
    assert not (tmp_path / "checkpoints" / "step-0000002").exists()
    full = checkpoint.async_mode(False, True)
    assert full[0] is False and "synchronous" in full[1]
    monkeypatch.delattr(checkpoint.dcp, "async_save")
    old_torch = checkpoint.async_mode(True, True)
    assert old_torch[0] is False and "SYNCHRONOUS" in old_torch[1] and "async_save" in old_torch[1]


def test_eval_in_decoder_chunks_equals_one_pass(corpus, monkeypatch):
    cfg = _cfg(corpus)
    model = loop.build_model(cfg, data.load_tokenizer(cfg.data.tokenizer))
    batches = [_batch(corpus / "data", cfg, n=2)]
    whole = loop.evaluate(model, batches, cfg, Dist())
    monkeypatch.setattr(loop, "EVAL_DECODER_FRAMES", 7)
    chunked = loop.evaluate(model, batches, cfg, Dist())
    assert whole.keys() == chunked.keys() and len([k for k in whole if k.startswith("eval_cb")]) == N
    for k in whole:
        assert abs(whole[k] - chunked[k]) < 1e-5, k


@pytest.mark.parametrize("start", [1, 3, 4])
def test_batch_stream_resumes_at_any_position_with_two_workers(corpus, start):
    cfg = _cfg(corpus, **{"data.epoch_batches": 5, "data.micro_batch_size": 1})
    tok = data.load_tokenizer(cfg.data.tokenizer)
    urls, _ = data.list_shards(corpus / "data", 0.0)

    def keys(consumed, n):
        stream = data.ShardStream(urls, data.SampleDecoder(tok, cfg.data, N), cfg.data, 7, 1)
        it = data.BatchStream(stream, 2, consumed)
        return [next(it)["keys"][0] for _ in range(n)]

    straight = keys(0, 8)
    assert keys(start, 8 - start) == straight[start:]


def test_eval_sources_are_held_out_whole(tmp_path):
    root = make_shards(tmp_path / "many", n_shards=20, per_shard=2)
    train, held = data.list_shards(root, 0.2)
    assert held and train
    # A pipeline corpus's shards mix sources: both splits read them and keep their own sources' samples.
    cfg = load_config("configs/train/tiny.yaml")
    read = [[Sample.from_json(s[JSON]).source.id
             for s in data.wds.DataPipeline(data.wds.SimpleShardList(list(urls)), data.wds.tarfile_to_samples(),
                                            data.wds.select(urls.admits))]
            for urls in (train, held)]
    sources = [set(r) for r in read]
    assert not sources[0] & sources[1] and len(sources[0] | sources[1]) == 20 and len(read[0] + read[1]) == 40
    assert 0 < len(sources[1]) < 10 and cfg.data.eval_fraction > 0
    assert data.list_shards(root, 0.2) == (train, held) and data.list_shards(root, 0.2)[1].sources == held.sources  # stable
    everything, none = data.list_shards(root, 0.0)
    assert everything == train and everything.sources is None and none == []
    # A `pipeline pack` output brings its own split (val/ holds whole sources), once it has finished.
    for split, urls in (("train", train[:15]), ("val", train[15:])):
        (tmp_path / "packed" / split).mkdir(parents=True)
        for u in urls:
            os.symlink(u, tmp_path / "packed" / split / os.path.basename(u))
    with pytest.raises(FileNotFoundError, match="did not finish"):
        data.list_shards(tmp_path / "packed", 0.05)
    (tmp_path / "packed" / "pack.json").write_text("{}")
    packed = data.list_shards(tmp_path / "packed", 0.05)
    assert [[os.path.basename(u) for u in urls] for urls in packed] == [[os.path.basename(u) for u in urls]
                                                                      for urls in (train[:15], train[15:])]


def test_activation_checkpointing_same_gradients(corpus):
    cfg = _cfg(corpus)
    tok = data.load_tokenizer(cfg.data.tokenizer)
    batch = loss.prepare(_batch(corpus / "data", cfg, n=2), 0.25, 0, 0, N)
    grads = []
    for ac in (False, True):
        model = loop.build_model(cfg, tok)
        model.backbone.activation_checkpointing = model.decoder.activation_checkpointing = ac
        sum(loss.loss_sums(model, batch, N)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_byte_tokenizer_round_trips_text_offline():
    from train.data import load_tokenizer

    tok = load_tokenizer("bytes")
    text = "[S0]Héllo, wörld!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode()) and max(ids) < 258
    assert tok.decode(ids) == text
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.bos_token_id != tok.eos_token_id
