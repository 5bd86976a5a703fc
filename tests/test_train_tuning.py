"""Trainer: per-codebook losses against the loss function, torch.compile, freezing and per-group learning rates."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from train import data, loop, loss, parallel
from train.parallel import Dist
from test_train import N, _batch, _cfg, corpus, one_thread  # noqa: F401 (fixtures)


def _model(cfg):
    return loop.build_model(cfg, data.load_tokenizer(cfg.data.tokenizer))


def test_per_codebook_eval_losses_agree_with_the_training_loss(corpus):
    cfg = _cfg(corpus, **{"train.decoder_fraction": 1.0, "train.lr": 0.0, "train.warmup_steps": 1})
    model = _model(cfg)
    batch = _batch(corpus / "data", cfg, n=3)
    evals = loop.evaluate(model, [batch], cfg, Dist())
    # By hand: -log p(target) from the model's logits, per codebook, over every audio frame.
    b = loss.prepare(batch, 1.0, 0, 0, N)
    with torch.no_grad():
        c0_logits, dec_logits = model(b["tokens"], b["mask"], b["c0_index"], b["dec_index"])
    tokens = b["tokens"]
    nll0 = -F.log_softmax(c0_logits, -1).gather(-1, tokens[b["c0_index"]][:, :1]).squeeze(-1)
    assert evals["eval_cb0_loss"] == pytest.approx(nll0.mean().item(), rel=1e-5)
    targets = tokens[b["dec_index"]][:, 1:N]
    for k in range(1, N):
        nll = -F.log_softmax(dec_logits[:, k - 1], -1).gather(-1, targets[:, k - 1 : k]).squeeze(-1)
        assert evals[f"eval_cb{k}_loss"] == pytest.approx(nll.mean().item(), rel=1e-5), k
    # The training step's two parts (decoder on every frame, lr 0 so the weights stay) are the same means.
    optimizer, scheduler = loop.build_optimizer(model, cfg.train)
    m = loop.train_step(model, optimizer, scheduler, [batch], cfg, 0, Dist())
    assert m["c0_loss"] == pytest.approx(evals["eval_c0_loss"], rel=1e-5)
    assert m["decoder_loss"] == pytest.approx(evals["eval_decoder_loss"], rel=1e-5)
    assert m["loss"] == pytest.approx(evals["eval_loss"], rel=1e-5)


def test_compiled_tiny_model_gives_the_same_loss_and_gradients(corpus):
    cfg = _cfg(corpus, **{"train.decoder_fraction": 0.5})
    eager = _model(cfg)
    compiled = parallel.parallelize(copy.deepcopy(eager), dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, compile=True)), Dist())
    b = loss.prepare(_batch(corpus / "data", cfg, n=2), 0.5, 0, 0, N)
    results = []
    for model in (eager, compiled):
        c0, dec = loss.loss_sums(model, b, N)
        (c0 / b["c0_count"] + dec / b["dec_count"]).backward()
        results.append((c0.item(), dec.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (c0_e, dec_e, grads_e), (c0_c, dec_c, grads_c) = results
    assert any(getattr(block, "_compiled_call_impl", None) for block in compiled.backbone.layers)
    assert c0_c == pytest.approx(c0_e, rel=1e-4) and dec_c == pytest.approx(dec_e, rel=1e-4)
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)


def test_freeze_and_per_group_learning_rates(corpus):
    cfg = _cfg(corpus, **{"train.freeze": "[backbone, text_embeddings]", "train.lr_scale": "{decoder: 10, audio_head: 0.5}",
                          "train.warmup_steps": 1, "train.decoder_fraction": 0.5})
    model = _model(cfg)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.", "text_embeddings.")) for n in frozen)
    assert not any(n.startswith(("backbone.", "text_embeddings.")) for n, p in model.named_parameters() if p.requires_grad)
    optimizer, scheduler = loop.build_optimizer(model, cfg.train)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert all(lr_of[id(p)] == pytest.approx(10 * cfg.train.lr) for n, p in named.items() if n.startswith("decoder."))
    assert lr_of[id(named["audio_head"])] == pytest.approx(0.5 * cfg.train.lr)
    assert lr_of[id(named["codebook0_head.weight"])] == pytest.approx(cfg.train.lr)
    assert not any(id(named[n]) in lr_of for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = loop.train_step(model, optimizer, scheduler, [_batch(corpus / "data", cfg, n=2)], cfg, 0, Dist())
    assert m["lr"] == pytest.approx(cfg.train.lr)  # the base lr, whatever the first group's scale
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


@pytest.mark.parametrize("key,value", [("train.freeze", "[backbon]"), ("train.lr_scale", "{decoderr: 2}")])
def test_a_prefix_that_matches_nothing_is_an_error(corpus, key, value):
    cfg = _cfg(corpus, **{key: value})
    with pytest.raises(ValueError, match=rf"{key}: '\w+' matches no parameter"):
        model = _model(cfg)
        loop.build_optimizer(model, cfg.train)


def test_lr_scale_must_be_positive(corpus):
    with pytest.raises(ValueError, match="lr_scale"):
        _cfg(corpus, **{"train.lr_scale": "{decoder: 0}"})


def test_model_flops_equal_the_flop_counter_and_mfu_is_logged(corpus, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    from train import flops

    cfg = _cfg(corpus)
    model = _model(cfg)
    b = loss.prepare(_batch(corpus / "data", cfg, n=3), 0.25, 0, 0, N)
    with FlopCounterMode(display=False) as counter:
        c0, dec = loss.loss_sums(model, b, N)
        (c0 + dec).backward()
    expected = flops.batch_flops(model.cfg, *b["tokens"].shape[:2], b["c0_count"], b["dec_count"] // (N - 1))
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)
    history = loop.run(_cfg(corpus, **{"train.peak_tflops": 2.0, "train.eval_every": 0, "train.sample_every": 0,
                                       "data.num_workers": 0}), str(corpus / "data"), str(tmp_path / "run"), max_steps=1)
    m = history[0]
    assert m["tflops_per_s"] == pytest.approx(m["model_flops"] / m["step_time"] / 1e12)
    assert m["mfu"] == pytest.approx(m["tflops_per_s"] / 2.0) and "peak_mem_gb" in m and "tokens_per_s" in m
    assert flops.peak_tflops(None, torch.device("cpu"), "bf16") is None  # no made-up peak on a CPU
