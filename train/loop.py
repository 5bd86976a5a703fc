"""The training loop: build, (resume), step, log, evaluate, checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import resource
import time
from pathlib import Path

import torch

from train import checkpoint, data, flops, hf, listen, loss, parallel
from train.config import Config, ModelConfig, TrainConfig
from train.model import CSM

log = logging.getLogger("train")


def model_config(cfg: ModelConfig, tokenizer=None) -> ModelConfig:
    """`cfg` resolved: with init_from, the checkpoint's architecture (its config.json); text_vocab_size
    unset, the tokenizer's size rounded up to 64."""
    where = "model.text_vocab_size"
    if cfg.init_from:
        cfg = hf.model_config_from_hf(cfg, hf.resolve(cfg.init_from))
        where = f"model.init_from {cfg.init_from}: text_vocab_size"
    if cfg.text_vocab_size is None:
        return dataclasses.replace(cfg, text_vocab_size=math.ceil(len(tokenizer) / 64) * 64)
    if tokenizer is not None and len(tokenizer) > cfg.text_vocab_size:
        raise ValueError(f"data.tokenizer has {len(tokenizer)} tokens > {where}={cfg.text_vocab_size}")
    return cfg


def build_model(cfg: Config, tokenizer=None) -> CSM:
    """Random init (seeded), or the weights of model.init_from; says loudly which."""
    torch.manual_seed(cfg.train.seed)  # same init on every rank
    mc = model_config(cfg.model, tokenizer)
    model = CSM(mc)
    if mc.init_from:
        hf.load_hf_weights(model, hf.resolve(mc.init_from))
        log.warning("model: weights from %s (backbone %s, decoder %s)", mc.init_from, mc.backbone, mc.decoder)
    else:
        log.warning("model: RANDOMLY INITIALISED %s (seed %d), no model.init_from", mc.flavour, cfg.train.seed)
    freeze(model, cfg.train.freeze)
    return model


def build_parallel_model(cfg: Config, tokenizer, d: parallel.Dist):
    """The model on d.device, wrapped for cfg.parallel. Under FSDP only rank 0 builds the full model (host
    memory for one copy, not one per rank); every rank builds it on the meta device, shards it, allocates
    only its shards, and rank 0's weights (random or init_from) are broadcast into them."""
    if parallel.mode_of(cfg, d) != "fsdp":
        return parallel.parallelize(build_model(cfg, tokenizer).to(d.device), cfg, d)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = build_model(cfg, tokenizer) if d.is_main else None
    with torch.device("meta"):
        model = CSM(model_config(cfg.model, tokenizer))
    freeze(model, cfg.train.freeze)  # before wrapping
    model = parallel.parallelize(model, cfg, d)
    model.to_empty(device=d.device)
    model.init_buffers(d.device)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _prefix_of(name: str, prefixes) -> str | None:
    """The longest of `prefixes` that `name` is under (whole dotted components)."""
    hits = [p for p in prefixes if name == p or name.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def _check_prefixes(model, prefixes, key: str) -> None:
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(_prefix_of(n, [p]) for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"train.{key}: '{p}' matches no parameter (top level: {', '.join(top)})")


def freeze(model, prefixes) -> None:
    """train.freeze: parameters under these prefixes get no gradient (before DDP/FSDP wrapping)."""
    _check_prefixes(model, prefixes, "freeze")
    for name, p in model.named_parameters():
        if _prefix_of(name, prefixes):
            p.requires_grad_(False)
    if prefixes:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.warning("model: %s frozen; %.1fM parameters trained", ", ".join(prefixes), n / 1e6)


def build_optimizer(model, t: TrainConfig):
    # nanoGPT rule: decay matrices and embeddings, not norms; per train.lr_scale prefix its own lr.
    named = [(n, p) for n, p in parallel.unwrap(model).named_parameters() if p.requires_grad]
    _check_prefixes(parallel.unwrap(model), t.lr_scale, "lr_scale")
    groups: dict[tuple, list] = {}
    for name, p in named:
        scale = t.lr_scale.get(_prefix_of(name, t.lr_scale), 1.0)
        groups.setdefault((scale, t.weight_decay if p.ndim >= 2 else 0.0), []).append(p)
    param_groups = [{"params": ps, "lr": t.lr * scale, "lr_scale": scale, "weight_decay": wd}
                    for (scale, wd), ps in groups.items()]
    fused = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(param_groups, lr=t.lr, betas=tuple(t.betas), fused=fused)

    def schedule(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def autocast(cfg: Config, device: torch.device):
    if device.type == "cuda" and cfg.train.dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: dict, device: torch.device) -> dict:
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        return tuple(move(x) for x in v) if isinstance(v, tuple) else v

    return {k: move(v) for k, v in batch.items()}


def train_step(model, optimizer, scheduler, micro_batches, cfg: Config, step: int, d: parallel.Dist) -> dict:
    """One optimizer step over `micro_batches` (this rank's share of the global batch).

    Each part of the loss is a mean over its targets in the global batch: the sums are divided by
    the global counts, and multiplied by the world size because DDP/FSDP average gradients."""
    t, N = cfg.train, cfg.model.num_codebooks
    prepared = [loss.prepare(b, t.decoder_fraction, t.seed, step, N) for b in micro_batches]
    rows = sum(int(b["mask"].any(-1).sum()) for b in prepared)
    model_flops = sum(flops.batch_flops(cfg.model, *b["tokens"].shape[:2], b["c0_count"], b["dec_count"] // (N - 1))
                      for b in prepared)
    c0_total, dec_total, rows, model_flops = parallel.all_reduce_sum(
        [sum(b["c0_count"] for b in prepared), sum(b["dec_count"] for b in prepared), rows, model_flops], d.device
    )
    c0_total, dec_total = max(1, c0_total), max(1, dec_total)  # a batch without audio: zero loss, not NaN
    c0_sum = dec_sum = torch.zeros((), device=d.device)  # accumulated on device: no sync per micro-batch
    for i, b in enumerate(prepared):
        with parallel.grad_sync(model, i == len(prepared) - 1):
            with autocast(cfg, d.device):
                c0, dec = loss.loss_sums(model, _to(b, d.device), N)
            (d.world * (t.c0_weight * c0 / c0_total + t.decoder_weight * dec / dec_total)).backward()
        c0_sum, dec_sum = c0_sum + c0.detach(), dec_sum + dec.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
    lr = scheduler.get_last_lr()[0] / optimizer.param_groups[0].get("lr_scale", 1.0)  # train.lr, scheduled
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    c0_sum, dec_sum = parallel.all_reduce_sum([c0_sum.item(), dec_sum.item()], d.device)
    c0_loss, dec_loss = c0_sum / c0_total, dec_sum / dec_total
    return {
        "loss": t.c0_weight * c0_loss + t.decoder_weight * dec_loss,
        "c0_loss": c0_loss,
        "decoder_loss": dec_loss,
        "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
        "lr": lr,
        "frames": int(c0_total),
        "decoder_frames": int(dec_total) // (N - 1),
        "tokens": int(rows),
        "model_flops": model_flops,  # all ranks (train/flops.py)
    }


EVAL_DECODER_FRAMES = 1024  # decoder frames per eval forward: all frames of a batch at once can take GBs


@torch.no_grad()
def evaluate(model, batches: list[dict], cfg: Config, d: parallel.Dist) -> dict:
    """Same held-out batches on every rank (so FSDP's collectives line up); the decoder on every
    audio frame, so the figure does not depend on a draw; loss per codebook (eval_cb<k>_loss)."""
    model.eval()
    N = cfg.model.num_codebooks
    sums, frames = torch.zeros(N, dtype=torch.float64), 0
    for b in batches:
        b = loss.prepare(b, 1.0, cfg.train.seed, 0, N)
        (dec_b, dec_t), none = b["dec_index"], (b["c0_index"][0][:0], b["c0_index"][1][:0])
        # Same number of forwards on every rank (same batches): codebook 0 in the first only.
        for i, start in enumerate(range(0, max(1, len(dec_b)), EVAL_DECODER_FRAMES)):
            end = start + EVAL_DECODER_FRAMES
            part = {**b, "c0_index": b["c0_index"] if i == 0 else none, "dec_index": (dec_b[start:end], dec_t[start:end])}
            with autocast(cfg, d.device):
                sums += loss.codebook_loss_sums(model, _to(part, d.device), N).double().cpu()
        frames += b["c0_count"]
    model.train()
    per_cb = (sums / max(1, frames)).tolist()
    c0_loss, dec_loss = per_cb[0], sum(per_cb[1:]) / max(1, N - 1)
    return {"eval_c0_loss": c0_loss, "eval_decoder_loss": dec_loss,
            "eval_loss": cfg.train.c0_weight * c0_loss + cfg.train.decoder_weight * dec_loss,
            **{f"eval_cb{k}_loss": v for k, v in enumerate(per_cb)}}


class Metrics:
    """JSONL on rank 0 (one record per logged step), TensorBoard too when it is installed."""

    def __init__(self, run_dir: Path, d: parallel.Dist):
        self.enabled = d.is_main
        self.file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        self.tb = None
        if self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def run(cfg: Config, shards_dir: str, run_dir: str, max_steps: int | None = None, resume: bool = False) -> list[dict]:
    d = parallel.init_distributed()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    cfg = dataclasses.replace(cfg, model=model_config(cfg.model, tokenizer))  # what config.json and checkpoints record
    train_urls, eval_urls = data.list_shards(shards_dir, cfg.data.eval_fraction)
    data.preflight(train_urls + eval_urls, cfg.data.allow_unreleased_codec, cfg.model.num_codebooks,
                   cfg.model.audio_vocab_size, cfg.data.speaker_ids)

    model = build_parallel_model(cfg, tokenizer, d)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    step, consumed = 0, 0
    if resume:
        path = checkpoint.latest(run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}")
        meta = checkpoint.load(path, d, model, optimizer, scheduler)
        step, consumed = meta["step"], meta["data"]["consumed"]
        log.info("resumed from %s at step %d", path, step)
    if d.is_main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    decoder = data.SampleDecoder(tokenizer, cfg.data, cfg.model.num_codebooks)
    stream = data.ShardStream(train_urls, decoder, cfg.data, cfg.train.seed, cfg.data.micro_batch_size)
    batches = data.BatchStream(stream, cfg.data.num_workers, consumed)
    held_out = []
    if eval_urls and cfg.train.eval_every > 0:
        held_out = data.eval_batches(eval_urls, decoder, cfg.data.micro_batch_size, cfg.train.eval_batches)

    metrics, history = Metrics(run_dir, d), []
    listener = listen.Listener(cfg, run_dir, tokenizer) if d.is_main and cfg.train.sample_every > 0 else None
    last = max_steps if max_steps is not None else cfg.train.steps  # --max-steps stops early, same schedule
    peak = flops.peak_tflops(cfg.train.peak_tflops, d.device, cfg.train.dtype)
    if d.is_main and peak is None:
        log.info("no MFU in the metrics: peak TFLOP/s of %s unknown (set train.peak_tflops)", d.device)
    sharded = cfg.train.checkpoint_format == "sharded"
    asynchronous, how = checkpoint.async_mode(sharded, cfg.train.async_checkpoint)
    if d.is_main:  # a fallback from an asynchronous save that was asked for is a warning
        fallback = sharded and cfg.train.async_checkpoint and not asynchronous
        log.log(logging.WARNING if fallback else logging.INFO, "checkpoints: %s", how)
    model.train()
    with checkpoint.saving():  # the last (asynchronous) checkpoint complete before the run returns
        while step < last:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            m = train_step(model, optimizer, scheduler, micro, cfg, step, d)
            step += 1
            dt = time.perf_counter() - t0
            m.update(step=step, step_time=dt, frames_per_s=m["frames"] / dt, tokens_per_s=m["tokens"] / dt,
                     peak_mem_gb=peak_memory_gb(d.device), tflops_per_s=m["model_flops"] / dt / 1e12)
            if peak:
                m["mfu"] = m["tflops_per_s"] / (peak * d.world)
            if held_out and step % cfg.train.eval_every == 0:
                m.update(evaluate(model, held_out, cfg, d))
            if cfg.train.sample_every > 0 and step % cfg.train.sample_every == 0:
                whole = listen.full_model(model, cfg, d)
                if listener is not None:
                    m.update(listener(whole, step))
            history.append(m)
            if step % cfg.train.log_every == 0 or "eval_loss" in m or "sample_seconds" in m:
                metrics.write(m)
                if d.is_main:
                    log.info("step %d loss %.4f (c0 %.4f, dec %.4f) lr %.2e %.0f frames/s", step, m["loss"],
                             m["c0_loss"], m["decoder_loss"], m["lr"], m["frames_per_s"])
            if (cfg.train.ckpt_every > 0 and step % cfg.train.ckpt_every == 0) or step == last:
                checkpoint.save(run_dir, d, model, optimizer, scheduler, step,
                                {"consumed": batches.consumed, "seed": cfg.train.seed}, cfg.to_dict(),
                                cfg.train.keep_checkpoints, sharded=sharded, asynchronous=asynchronous)
    metrics.close()
    parallel.shutdown()
    return history
