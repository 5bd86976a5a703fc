"""Frames per second of `train.generate.generate_frames` (KV-cached backbone, decoder frame by frame)
on a randomly initialised model of a flavour: what `pipeline generate` costs before Mimi decoding.

    python bench/bench_generate.py                      # tiny, CPU, one thread
    python bench/bench_generate.py --flavour 1B --frames 8
    python bench/bench_generate.py --flavour 1B --device cuda --dtype bf16 --frames 100
"""

import argparse
import time

import torch

from train.config import ModelConfig
from train.generate import FRAME_RATE, generate_frames
from train.model import CSM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--flavour", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frames", type=int, default=25)
    p.add_argument("--prompt", type=int, default=40, help="text rows before the frames")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(flavour=a.flavour, text_vocab_size=128256 if a.flavour != "tiny" else 64)
    model = CSM(cfg).eval().to(a.device, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    N = cfg.num_codebooks
    tokens = torch.zeros(a.prompt, N + 1, dtype=torch.long, device=a.device)
    tokens[:, N] = torch.randint(0, 60, (a.prompt,))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, N] = True
    generate_frames(model, tokens, mask, 2)  # warm-up
    if a.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    frames, _ = generate_frames(model, tokens, mask, a.frames, temperature=0.9, top_k=50, seed=0)
    if a.device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    fps = len(frames) / dt
    print(f"{a.flavour} {a.device} {a.dtype} threads={a.threads}: {len(frames)} frames in {dt:.2f} s = "
          f"{fps:.2f} frames/s ({fps / FRAME_RATE:.3f}x real time)")


if __name__ == "__main__":
    main()
