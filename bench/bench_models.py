"""Model throughput by batch size: Mimi encode (bf16 autocast on GPU) and Whisper through whisperx.

    python bench/bench_models.py                                   # CPU: Mimi fp32, Whisper tiny.en
    python bench/bench_models.py --mimi-bf16 --allow-unreleased    # CPU: what bf16 does to Mimi's codes
    python bench/bench_models.py --device cuda --asr-model large-v3 --batches 1,8,32,128

On a GPU this is the figure that sizes the GPU stages (how many chunks per call, how many actors
per GPU). Whisper `large-v3` comes from the hub; with no network, pass a local CTranslate2
directory. Mimi uses the released weights when they are cached (`tokenize.weights` otherwise), or
with --allow-unreleased the seeded random Mimi (same architecture, so the same speed).
Inputs are 10 s clips of the embedded conversation, given to Whisper as the pipeline does
(`AsrStage.transcribe_audio`: a 15 s window); each figure is after one warm-up call.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import make_inputs, table


def clips(rate: int, count: int, seconds: float = 10.0) -> list[np.ndarray]:
    """`count` distinct mono clips at `rate` (16 kHz for Whisper, 24 kHz for Mimi), decoded by our decode stage."""
    from stages.decode import DecodeConfig, DecodeStage

    path = make_inputs(Path(tempfile.gettempdir()) / "csm-bench" / "inputs", 1)[0]
    chunk = next(DecodeStage(DecodeConfig()).chunks(str(path)))
    audio = chunk.mono16k if rate == 16000 else chunk.audio24k
    n = int(seconds * rate)
    return [np.ascontiguousarray(np.roll(audio, i * rate)[:n], dtype=np.float32) for i in range(count)]


def timed(fn, sync) -> float:
    fn()  # warm-up: kernels, allocator, CTranslate2 caches
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def bench_mimi(device: str, batches: list[int], allow_unreleased: bool, bf16: bool, sync) -> list[list]:
    from stages.tokenize import TokenizeConfig, encode_batch, encoder_tile_seconds, load_mimi, use_whole_clip_encoder

    config = TokenizeConfig(allow_unreleased=allow_unreleased)
    model, identity = load_mimi(config, device)
    model = use_whole_clip_encoder(model, encoder_tile_seconds(config, device))  # as the pipeline runs it
    rows = []
    for b in batches:
        batch = clips(24000, b)
        dt = timed(lambda batch=batch: encode_batch(model, batch, device, bf16), sync)
        agree = ""
        if bf16:  # what bf16 costs in codes: the share equal to an fp32 encode, codebook 0 / all
            ours, ref = (np.stack(encode_batch(model, batch, device, bf16=x)) for x in (True, False))
            agree = f"{(ours[:, 0] == ref[:, 0]).mean():.3f} / {(ours == ref).mean():.3f}"
        rows.append(["mimi", b, f"{10.0 * b / dt:.0f}", f"{dt:.2f}", "bf16 autocast" if bf16 else "fp32",
                     "released" if identity["released"] else "random-init", agree])
    return rows


def bench_whisper(device: str, model_name: str, batches: list[int], threads: int, sync) -> list[list]:
    from stages.asr import AsrConfig, AsrStage

    stage = AsrStage(AsrConfig(model=model_name, cpus=threads))
    stage.setup()
    rows = []
    for b in batches:
        stage.config = dataclasses.replace(stage.config, batch_size=b)  # configs are frozen
        batch = clips(16000, b)
        dt = timed(lambda batch=batch: stage.transcribe_audio(batch), sync)
        rows.append(["whisper " + model_name, b, f"{10.0 * b / dt:.0f}", f"{dt:.2f}", stage.compute_type, "", ""])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--asr-model", default=None, help="default: the packaged tiny.en")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--allow-unreleased", action="store_true", help="random-init Mimi if the weights are missing")
    ap.add_argument("--mimi-bf16", action="store_true", help="Mimi under bf16 autocast on CPU too (always on GPU)")
    args = ap.parse_args()
    import torch

    from stages.asr import DEFAULT_MODEL

    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    batches = [int(b) for b in args.batches.split(",")]
    rows = bench_mimi(args.device, batches, args.allow_unreleased, args.device == "cuda" or args.mimi_bf16, sync)
    rows += bench_whisper(args.device, args.asr_model or DEFAULT_MODEL, batches, args.threads, sync)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"## Model throughput, 10 s clips, {where}\n")
    print(table(rows, ["model", "batch", "x real time", "s per call", "precision", "weights", "codes = fp32's (cb 0 / all)"]))


if __name__ == "__main__":
    main()
