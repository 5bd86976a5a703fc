"""Training throughput with compute amortization (decoder on 1/16 of frames) vs the decoder on every frame.

    python bench/bench_train.py                 # tiny on CPU; also 1B/100M when CUDA is available
    python bench/bench_train.py --flavour 1B --device cuda --seq-len 2048 --batch 4
    python bench/bench_train.py --one --flavour tiny --device cpu --seq-len 512 --batch 4 --steps 3 --fraction 0.0625 --save
        # one setting as JSON, with save_sync_s / save_async_block_s: what a checkpoint blocks training for

Each setting runs in its own process so peak memory (RSS on CPU) is per setting. Batches are
synthetic rows shaped like the corpus (text rows, ~5 s utterances of audio, end-of-audio frames).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def synthetic_batch(batch: int, seq_len: int, N: int, text_vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, seq_len, N + 1, dtype=torch.long)
    mask = torch.zeros(batch, seq_len, N + 1, dtype=torch.bool)
    for b in range(batch):
        t = 0
        while t < seq_len:
            n_text, n_audio = 20, 62 + 1  # ~5 s of audio at 12.5 Hz, plus the end-of-audio frame
            e = min(seq_len, t + n_text)
            tokens[b, t:e, N] = torch.randint(0, text_vocab, (e - t,), generator=g)
            mask[b, t:e, N] = True
            t, e = e, min(seq_len, e + n_audio)
            tokens[b, t:e, :N] = torch.randint(0, 2048, (e - t, N), generator=g)
            tokens[b, e - 1, :N] = 0
            mask[b, t:e, :N] = True
            t = e
    return {"tokens": tokens, "mask": mask, "keys": [f"s{seed}-{b}" for b in range(batch)]}


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads) if args.device == "cpu" else None
    from train import flops, loop, parallel
    from train.config import load_config

    cfg = load_config(None, {
        "model": {"flavour": args.flavour, "max_seq_len": args.seq_len, "text_vocab_size": args.text_vocab},
        "data": {"seq_len": args.seq_len, "micro_batch_size": args.batch},
        "train": {"decoder_fraction": args.fraction, "warmup_steps": 1, "activation_checkpointing": args.ac,
                  "compile": args.compile},
    })
    d = parallel.Dist(device=torch.device(args.device))
    model = loop.build_model(cfg).to(d.device)
    model = parallel.parallelize(model, cfg, d)
    optimizer, scheduler = loop.build_optimizer(model, cfg.train)
    batches = [synthetic_batch(args.batch, args.seq_len, 32, args.text_vocab, s) for s in range(args.steps + 2)]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for s in range(2):  # warm-up (allocator, compile)
        loop.train_step(model, optimizer, scheduler, [batches[s]], cfg, s, d)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0, frames, rows, model_flops = time.perf_counter(), 0, 0, 0.0
    for s in range(2, args.steps + 2):
        m = loop.train_step(model, optimizer, scheduler, [batches[s]], cfg, s, d)
        frames, rows, model_flops = frames + m["frames"], rows + m["tokens"], model_flops + m["model_flops"]
    sync()
    dt = time.perf_counter() - t0
    out = {"flavour": args.flavour, "device": args.device, "fraction": args.fraction, "seq_len": args.seq_len,
           "batch": args.batch, "steps": args.steps, "step_s": dt / args.steps, "frames_per_s": frames / dt,
           "tokens_per_s": rows / dt, "peak_mem_gb": loop.peak_memory_gb(d.device),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if args.device == "cuda":  # model FLOPs and peak as the trainer counts them (train/flops.py)
        out.update(gpu=torch.cuda.get_device_name(), tflops=model_flops / dt / 1e12)
        peak = flops.peak_tflops(cfg.train.peak_tflops, d.device, cfg.train.dtype)
        if peak:
            out["mfu"] = out["tflops"] / peak
    if args.save:
        out.update(save_times(model, optimizer, scheduler, cfg, d, args.steps + 2))
    return out


def save_times(model, optimizer, scheduler, cfg, d, step: int) -> dict:
    """A sharded checkpoint of this model and optimizer, saved synchronously, then asynchronously
    (train/checkpoint.py): what each blocks the training loop for, and when the async write ended."""
    import shutil
    import tempfile

    import torch
    import torch.distributed.checkpoint as dcp

    from train import checkpoint

    out = {}
    root = Path(tempfile.mkdtemp(prefix="bench-save-"))
    try:
        dcp.save({"x": torch.zeros(1)}, checkpoint_id=str(root / "warm-up"))  # DCP's first-call costs, untimed
        for name, asynchronous in (("sync", False), ("async", True)):
            t = time.perf_counter()
            checkpoint.save(root / name, d, model, optimizer, scheduler, step, {"consumed": 0}, cfg.to_dict(), 1,
                            sharded=True, asynchronous=asynchronous)
            out[f"save_{name}_block_s" if asynchronous else "save_sync_s"] = time.perf_counter() - t
            checkpoint.wait()
            if asynchronous:
                out["save_async_total_s"] = time.perf_counter() - t
            out["save_gb"] = sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file()) / 1e9
            shutil.rmtree(root / name)  # one checkpoint on disk at a time (1B + AdamW: ~20 GB)
    except Exception as exc:  # the step timings stand without it
        out["save_error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--flavour", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--fraction", type=float, default=None, help="only this decoder fraction")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text-vocab", type=int, default=128256, help="Llama-3.2's; smaller for a quick CPU rehearsal")
    p.add_argument("--ac", action="store_true", help="activation checkpointing")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--save", action="store_true", help="also time a sharded checkpoint save, sync vs async (--one)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    import torch

    settings = [("tiny", "cpu", 512, 4, 5)]
    if torch.cuda.is_available():
        settings.append(("1B", "cuda", 2048, 4, 10))
    if args.flavour:
        settings = [(args.flavour, args.device or "cpu", args.seq_len or 2048, args.batch or 4, args.steps or 10)]
    fractions = [args.fraction] if args.fraction else [1 / 16, 1.0]
    print(f"{'flavour':8} {'device':6} {'decoder on':>10} {'step s':>8} {'frames/s':>10} {'tokens/s':>10} "
          f"{'peak GB':>8} {'TFLOP/s':>8} {'MFU':>6}")
    for flavour, device, seq_len, batch, steps in settings:
        for fraction in fractions:
            cmd = [sys.executable, __file__, "--one", "--flavour", flavour, "--device", device, "--seq-len",
                   str(args.seq_len or seq_len), "--batch", str(args.batch or batch), "--steps",
                   str(args.steps or steps), "--fraction", str(fraction), "--threads", str(args.threads)]
            cmd += ["--ac"] * args.ac + ["--compile"] * args.compile
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{flavour:8} {device:6} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            label = "1/16" if abs(fraction - 1 / 16) < 1e-9 else f"{fraction:g}"
            tf = f"{r['tflops']:8.1f}" if "tflops" in r else f"{'-':>8}"
            mfu = f"{r['mfu']:6.1%}" if "mfu" in r else f"{'-':>6}"
            print(f"{flavour:8} {device:6} {label:>10} {r['step_s']:8.3f} {r['frames_per_s']:10.0f} "
                  f"{r['tokens_per_s']:10.0f} {r['peak_mem_gb']:8.2f} {tf} {mfu}", flush=True)


if __name__ == "__main__":
    main()
