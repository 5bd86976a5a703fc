"""Whisper encoder window length against word error rate and ASR time (picks `asr.window_step`).

    python bench/bench_asr_windows.py [--steps 30,15,10] [--copies 4]

Two sets with ground truth: pyannote's sample conversation (gain/speed-shifted copies, units planned
by the pipeline's own VAD + diarization, WER of each copy's words against `sample.stm`), and 96
espeak-ng lines of the synthetic chat script (4 voices x 2 speeds, singly and in pairs). One thread.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, make_inputs, table


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def edit_distance(a: list[str], b: list[str]) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[:], i
        for j, y in enumerate(b, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
    return d[-1]


def sample_units(copies: int) -> tuple[list[list[np.ndarray]], list[str]]:
    """Per copy of the sample, the audio of each unit the pipeline would transcribe; reference words."""
    import importlib.util

    from stages.asr import _slice
    from stages.decode import DecodeConfig, decode_chunks
    from stages.diarize import DiarizeConfig, DiarizeStage
    from stages.utterances import UtterancesConfig, plan_units
    from stages.vad import VadConfig, VadStage

    paths = make_inputs(Path(tempfile.gettempdir()) / "csm-bench" / "inputs", copies)
    chunks = [c for p in paths for c in decode_chunks(str(p), DecodeConfig())]
    chunks = DiarizeStage(DiarizeConfig()).process_batch(VadStage(VadConfig()).process_batch(chunks))
    units = [[_slice(c, r, ch) for r, ch in plan_units(c, UtterancesConfig())] for c in chunks]
    stm = Path(importlib.util.find_spec("pyannote.audio").origin).parent / "sample" / "sample.stm"
    ref = " ".join(f[5] for f in (line.split(maxsplit=5) for line in stm.read_text().splitlines()) if len(f) == 6)
    return units, ref


def espeak_lines() -> list[tuple[np.ndarray, str]]:
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest_audio import CLOSE_VOICES, SCRIPT, VOICE_A, VOICE_B, speak

    rng, items = np.random.default_rng(0), []
    for voice in (VOICE_A, VOICE_B, *CLOSE_VOICES):
        for speed in (140, 175):
            for _, text in SCRIPT:
                x = np.pad(speak(text, voice, speed), 3200)
                items.append(((x + 10 ** (-50 / 20) * rng.standard_normal(len(x))).astype(np.float32), text))
    pairs = [(np.concatenate([a[0], b[0]]), f"{a[1]} {b[1]}") for a, b in zip(items[::2], items[1::2])]
    return items + pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="30,15,10")
    ap.add_argument("--copies", type=int, default=4)
    args = ap.parse_args()
    import torch
    from whisperx.audio import log_mel_spectrogram

    from stages.asr import AsrConfig, AsrStage, generate, window_samples

    torch.set_num_threads(1)
    stage = AsrStage(AsrConfig(cpus=1))
    stage.setup()
    model = stage.pipe.model

    def transcribe(audio: np.ndarray, step: float) -> str:
        audio = audio[: 30 * 16000]
        feats = log_mel_spectrogram(audio, n_mels=80, padding=window_samples(len(audio), step) - len(audio)).numpy()[None]
        return generate(model, stage.pipe.tokenizer, stage.pipe.options, feats)[0]["text"]

    units, ref = sample_units(args.copies)
    lines = espeak_lines()
    rows = []
    for step in (float(s) for s in args.steps.split(",")):
        t = time.process_time()
        sample_err = sum(edit_distance(words(ref), words(" ".join(transcribe(u, step) for u in copy))) for copy in units)
        sample_cpu = time.process_time() - t
        t = time.process_time()
        line_err = sum(edit_distance(words(text), words(transcribe(x, step))) for x, text in lines)
        line_cpu = time.process_time() - t
        rows.append([f"{step:g} s", f"{sample_err / (len(words(ref)) * len(units)):.3f}", f"{sample_cpu:.1f}",
                     f"{line_err / sum(len(words(t)) for _, t in lines):.3f}", f"{line_cpu:.1f}"])
    n_units = sum(len(c) for c in units)
    print(f"## Whisper window steps: sample x{len(units)} ({n_units} units), {len(lines)} espeak lines; 1 thread\n")
    print(table(rows, ["window step", "sample WER", "sample CPU s", "espeak WER", "espeak CPU s"]))


if __name__ == "__main__":
    main()
