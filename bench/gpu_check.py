"""The GPU check: model throughput on one GPU, as one table (run through bench/gpu_check.sh).

    python bench/gpu_check.py             # CUDA, sized to finish in about 6 minutes on an H100
    python bench/gpu_check.py --dry-run   # the same sections on CPU at tiny sizes (a test runs it)

Sections: Mimi encode by batch size in fp32 and bf16 autocast, with bf16's code agreement with
fp32; pyannote segmentation (the offline diarizer's PyanNet) and embedding models (WeSpeaker
ResNet34, the architecture of pyannote's community pipeline, and resemblyzer, the offline
default) by batch size; the 1B/100M trainer step in bf16, plain, with activation checkpointing,
with torch.compile, and both (bench/bench_train.py, one process each; the plain one also times a
sharded checkpoint save, synchronous vs asynchronous). A section whose package or
weights are missing prints "not measured: <why>" and the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from common import ROOT, table

import numpy as np

WHEELS = ROOT / "bench" / "gpu_wheels"
ROWS: list[list[str]] = []  # section, setting, throughput, detail, note
DEADLINE = [float("inf")]  # perf_counter time by which the table must be printed


def num(x: float) -> str:
    """Three significant figures at most, no exponent: 0.42, 13.1, 1234."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def row(section: str, setting: str, value: str = "", detail: str = "", note: str = "") -> None:
    ROWS.append([section, setting, value, detail, note])
    print(f"  {section} | {setting} | {value} | {detail} | {note}", file=sys.stderr, flush=True)


def timed_batches(model, audio, seconds: float, batches: list[int], device: str, sync, **timing):
    """(batch size, seconds per call) of `model` on batches of `seconds`-long views of one
    recording, each shifted by 1 s so no two rows of a batch are the same."""
    import torch

    for b in batches:
        x = torch.stack([torch.roll(audio, -i * 16000)[: int(seconds * 16000)] for i in range(b)])[:, None].to(device)
        with torch.inference_mode():
            yield b, timed(lambda: model(x), sync, **timing)


def guarded(section: str):
    """Run a section; any failure becomes one "not measured" row naming the reason."""
    def wrap(fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                fn(*a, **k)
            except Exception as exc:  # a missing package or weight is an answer, not a crash
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                row(section, "-", note=f"not measured: {why[:150]}")
                traceback.print_exc(file=sys.stderr)
            print(f"[{section}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
        return run
    return wrap


def timed(fn, sync, repeat: int = 1) -> float:
    if time.perf_counter() > DEADLINE[0] - 60:
        raise TimeoutError("out of the check's time budget")
    fn()  # warm-up: kernels, allocator, autotuning
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat


def speech(rate: int, seconds: float) -> np.ndarray:
    """Real speech (pyannote's 30 s sample, read with scipy: no soundfile on the GPU machine), looped
    to `seconds`; a speech-like synthetic signal when pyannote.audio is not there."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    try:  # located without importing pyannote (ten seconds of imports)
        import importlib.util

        sr, x = wavfile.read(Path(importlib.util.find_spec("pyannote.audio").origin).parent / "sample" / "sample.wav")
        x = x.astype(np.float32) / (32768.0 if x.dtype == np.int16 else 1.0)
        x = resample_poly(x, rate, sr).astype(np.float32) if sr != rate else x
    except Exception:
        t = np.arange(rate * 8) / rate
        x = ((np.sin(2 * np.pi * 3 * t) > 0) * 0.3 * np.sin(2 * np.pi * 150 * t * (1 + t / 2))).astype(np.float32)
    return np.resize(x, int(seconds * rate))


@guarded("mimi")
def mimi(device: str, batches: list[int], seconds: float, sync) -> None:
    from stages.tokenize import CodecUnavailable, TokenizeConfig, encode_batch, encoder_tile_seconds, load_mimi, use_whole_clip_encoder

    try:
        model, _ = load_mimi(TokenizeConfig(), device)
        note = "released weights"
    except CodecUnavailable:  # no hub here: the seeded random Mimi, same architecture, same speed
        model, _ = load_mimi(TokenizeConfig(allow_unreleased=True), device)
        note = "RANDOM-INIT Mimi (allow_unreleased: released weights unavailable); agreement on random codebooks"
    model = use_whole_clip_encoder(model, encoder_tile_seconds(TokenizeConfig(), device))  # as the pipeline runs it
    audio = speech(24000, seconds * 8)
    for b in batches:
        clips = [np.roll(audio, -i * 24000)[: int(seconds * 24000)] for i in range(b)]
        codes = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            dt = timed(lambda: encode_batch(model, clips, device, bf16=bf16), sync)
            codes[name] = np.stack(encode_batch(model, clips, device, bf16=bf16))
            agree = ""
            if bf16:
                a, r = codes["bf16"], codes["fp32"]
                agree = f"codes = fp32's: cb0 {(a[:, 0] == r[:, 0]).mean():.3f}, all {(a == r).mean():.3f}"
            row("mimi encode", f"{name} batch {b} x {seconds:g} s", f"{num(b * seconds / dt)}x real time",
                f"{num(dt * 1000)} ms/call; {agree}".rstrip("; "), note)


@guarded("pyannote segmentation")
def segmentation(device: str, batches: list[int], sync) -> None:
    import torch
    from pyannote.audio import Model

    from stages.diarize import DiarizeConfig
    from stages.diarizer import default_segmentation_path

    slim = WHEELS / "segmentation.ckpt"  # bench/gpu_wheels.sh: whisperx's checkpoint without optimizer state
    path = str(slim) if slim.exists() else default_segmentation_path()
    model = Model.from_pretrained(path, strict=False).to(device).eval()
    duration, step = model.specifications.duration, DiarizeConfig().segmentation_step
    audio = torch.from_numpy(speech(16000, duration * 4))
    for b, dt in timed_batches(model, audio, duration, batches, device, sync, repeat=3):
        # the pipeline slides the window by step * duration: each audio second is seen 1/step times
        row("pyannote segmentation", f"PyanNet fp32 batch {b} x {duration:g} s", f"{num(b * duration * step / dt)}x real time",
            f"{num(b / dt)} windows/s at step {step}", "offline diarizer's model (whisperx checkpoint)")


def embedding_rows(section: str, label: str, model, seconds: float, batches: list[int], device: str, sync,
                   note: str, **timing) -> None:
    """Rows of a speaker-embedding model's throughput, one per batch size, on `seconds`-long clips."""
    import torch

    audio = torch.from_numpy(speech(16000, seconds * 4))
    for b, dt in timed_batches(model, audio, seconds, batches, device, sync, **timing):
        row(section, f"{label} batch {b} x {seconds:g} s", f"{num(b / dt)} embeddings/s", f"{num(b * seconds / dt)}x real time", note)


@guarded("pyannote embedding")
def embedding(device: str, batches: list[int], seconds: float, sync) -> None:
    import torch
    from pyannote.audio.models.embedding import WeSpeakerResNet34

    torch.manual_seed(0)
    model = WeSpeakerResNet34().to(device).eval()  # hub weights are gated: random init, same cost
    embedding_rows("pyannote embedding", "WeSpeaker ResNet34 fp32", model, seconds, batches, device, sync,
                   "community pipeline's architecture, random init", repeat=3)


@guarded("resemblyzer embedding")
def resemblyzer(device: str, batches: list[int], seconds: float, sync) -> None:
    import importlib.util

    if importlib.util.find_spec("resemblyzer") is None or importlib.util.find_spec("librosa") is None:
        raise ModuleNotFoundError("resemblyzer/librosa not installed (librosa needs numba + llvmlite, ~45 MB: over the 64 MiB budget)")
    from stages.diarizer import default_encoder_path, resemblyzer_embedding_model

    model = resemblyzer_embedding_model(default_encoder_path()).to(device).eval()
    embedding_rows("resemblyzer embedding", "GE2E", model, seconds, batches, device, sync,
                   "offline diarizer's encoder; mel on CPU (librosa)")


@guarded("trainer")
def trainer(device: str, flavour: str, seq_len: int, batch: int, steps: int, timeout: float, vocab: int) -> None:
    # fraction: the trainer's default compute amortization (decoder on 1/16 of the frames)
    base = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--one", "--flavour", flavour, "--device", device,
            "--seq-len", str(seq_len), "--batch", str(batch), "--steps", str(steps), "--fraction", str(1 / 16),
            "--text-vocab", str(vocab)]
    # eager also times a sharded checkpoint save, synchronous vs asynchronous (what each blocks the step for)
    for label, extra in (("eager", ["--save"]), ("act. ckpt", ["--ac"]), ("compile", ["--compile"]),
                         ("compile + act. ckpt", ["--compile", "--ac"])):
        setting = f"{flavour} {'bf16' if device == 'cuda' else 'fp32'} {label}, {batch} x {seq_len}"
        left = DEADLINE[0] - time.perf_counter() - 10
        if left < 30:
            row("trainer step", setting, note="not measured: out of the check's time budget")
            continue
        try:
            limit = min(timeout + 60 * ("--save" in extra), left)  # 1B + AdamW: ~20 GB written twice
            proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            row("trainer step", setting, note=f"not measured: over {limit:.0f} s")
            continue
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            row("trainer step", setting, note=f"not measured: {last[:150]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        mfu = f", MFU {r['mfu']:.1%}" if "mfu" in r else (f", {r['tflops']:.0f} TFLOP/s" if "tflops" in r else "")
        save = ""
        if "save_sync_s" in r:
            save = (f"; {r['save_gb']:.2g} GB checkpoint: sync save {num(r['save_sync_s'])} s, "
                    f"async blocks {num(r['save_async_block_s'])} s (written in {num(r['save_async_total_s'])} s)")
        elif "save_error" in r:
            save = f"; save not measured: {r['save_error'][:80]}"
        row("trainer step", setting, f"{num(r['tokens_per_s'])} tokens/s",
            f"{num(r['step_s'] * 1000)} ms/step{mfu}, peak {r['peak_mem_gb']:.1f} GB{save}",
            "MFU vs dense bf16 peak" if "mfu" in r else ("no MFU on CPU" if device == "cpu" else "GPU peak unknown"))


def header(device: str, dry: bool) -> str:
    import torch

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    mode = "DRY RUN (tiny sizes on CPU: plumbing only, not figures)" if dry else "full"
    return f"## GPU check, {mode}: {where}, torch {torch.__version__}, Python {sys.version.split()[0]}"


def report(device: str, dry: bool, t0: float) -> None:
    print(header(device, dry) + f", {time.perf_counter() - t0:.0f} s\n")
    print(table(ROWS, ["section", "setting", "throughput", "detail", "note"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections (mimi,segmentation,embedding,trainer)")
    ap.add_argument("--budget-s", type=float, default=None, help="print the table by then (default 400, dry run 240)")
    args = ap.parse_args()
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --dry-run for the CPU rehearsal")
    device = "cpu" if dry else "cuda"
    if dry:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    only = set(filter(None, args.only.split(",")))
    want = lambda s: not only or s in only  # noqa: E731
    t0 = time.perf_counter()
    DEADLINE[0] = t0 + (args.budget_s or (240 if dry else 400))

    def killed(signum, frame):  # `timeout` in gpu_check.sh: still print what was measured
        row("check", "-", note=f"stopped by signal {signum}: later sections not measured")
        report(device, dry, t0)
        os._exit(1)

    signal.signal(signal.SIGTERM, killed)
    if want("mimi"):
        mimi(device, [1, 2] if dry else [1, 8, 32, 64], 2.0 if dry else 10.0, sync)
    if want("segmentation"):
        segmentation(device, [1, 4] if dry else [1, 32, 128, 512], sync)
    if want("embedding"):
        embedding(device, [1, 2] if dry else [1, 32, 128], 2.0 if dry else 10.0, sync)
        resemblyzer(device, [1, 2] if dry else [1, 32, 128], 2.0 if dry else 10.0, sync)
    if want("trainer"):
        if dry:  # the tiny flavour, a small text vocabulary: the plumbing, compile included
            trainer("cpu", "tiny", 64, 1, 1, timeout=90, vocab=1024)
        else:
            trainer("cuda", "1B", 2048, 4, 10, timeout=120, vocab=128256)
    report(device, dry, t0)


if __name__ == "__main__":
    main()
