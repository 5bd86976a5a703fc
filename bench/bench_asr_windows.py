"""Whisper encoder window length against word error rate and ASR time (picks `asr.window_step`).

    python bench/bench_asr_windows.py [--steps 30,15,10] [--copies 4]

Two sets with ground truth: pyannote's sample conversation (gain/speed-shifted copies, units planned
by the pipeline's own VAD + diarization, WER of each copy's words against `sample.stm`), and 96
espeak-ng lines of the synthetic chat script (4 voices x 2 speeds, singly and in pairs). One thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, make_inputs, table


def sample_chunks(copies: int) -> tuple[list, str]:
    """Copies of the sample, through the pipeline's VAD and diarization; the reference transcript."""
    import importlib.util

    from stages.decode import DecodeConfig, decode_chunks
    from stages.diarize import DiarizeConfig, DiarizeStage
    from stages.vad import VadConfig, VadStage

    paths = make_inputs(Path(tempfile.gettempdir()) / "csm-bench" / "inputs", copies)
    chunks = [c for p in paths for c in decode_chunks(str(p), DecodeConfig())]
    chunks = DiarizeStage(DiarizeConfig()).process_batch(VadStage(VadConfig()).process_batch(chunks))
    stm = Path(importlib.util.find_spec("pyannote.audio").origin).parent / "sample" / "sample.stm"
    ref = " ".join(f[5] for f in (line.split(maxsplit=5) for line in stm.read_text().splitlines()) if len(f) == 6)
    return chunks, ref


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

    from stages.asr import AsrConfig, AsrStage, word_errors
    from stages.filters import words_of
    from stages.utterances import plan_units

    torch.set_num_threads(1)
    stage = AsrStage(AsrConfig(cpus=1))
    stage.setup()
    chunks, ref = sample_chunks(args.copies)
    units = [plan_units(c, stage.units) for c in chunks]
    lines = espeak_lines()
    rows = []
    for step in (float(s) for s in args.steps.split(",")):
        stage.config.window_step = step
        t = time.process_time()
        sample_err = sum(word_errors(ref, " ".join(o["text"] for o in stage.transcribe(c, u))) for c, u in zip(chunks, units))
        sample_cpu = time.process_time() - t
        t = time.process_time()
        outs = stage.transcribe_audio([x for x, _ in lines])
        line_err = sum(word_errors(text, o["text"]) for (_, text), o in zip(lines, outs))
        line_cpu = time.process_time() - t
        rows.append([f"{step:g} s", f"{sample_err / (len(words_of(ref)) * len(chunks)):.3f}", f"{sample_cpu:.1f}",
                     f"{line_err / sum(len(words_of(t)) for _, t in lines):.3f}", f"{line_cpu:.1f}"])
    print(f"## Whisper window steps: sample x{len(chunks)} ({sum(map(len, units))} units), {len(lines)} espeak lines; 1 thread\n")
    print(table(rows, ["window step", "sample WER", "sample CPU s", "espeak WER", "espeak CPU s"]))


if __name__ == "__main__":
    main()
