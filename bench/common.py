"""Shared helpers for the pipeline benchmarks: benchmark inputs and process-tree CPU accounting."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _sample() -> tuple[np.ndarray, int]:
    import soundfile as sf

    from pipeline.inputs import embedded_default

    audio, rate = sf.read(embedded_default()[0], dtype="float32")
    return audio, rate


def varied(audio: np.ndarray, i: int) -> np.ndarray:
    """Copy `i` of a clip, slightly speed- and gain-shifted so no two copies are byte-identical."""
    stretch = 1.0 + 0.01 * (i % 5)
    idx = np.minimum((np.arange(int(len(audio) / stretch)) * stretch).astype(int), len(audio) - 1)
    return audio[idx] * (0.8 + 0.05 * (i % 4))


def make_inputs(directory: Path, count: int) -> list[Path]:
    """`count` distinct 30 s conversations: pyannote's sample, each copy varied (real work, not a cache hit)."""
    import soundfile as sf

    audio, rate = _sample()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = directory / f"conv{i:03d}.wav"
        if not p.exists():
            sf.write(p, varied(audio, i), rate)
        paths.append(p)
    return paths


def make_long_inputs(directory: Path, minutes: list[float]) -> list[Path]:
    """Podcast-shaped recordings, one per entry of `minutes`: varied copies of pyannote's sample
    (two speakers, real speech) back to back with 0.3 to 1.5 s pauses between them; cached."""
    import soundfile as sf

    audio, rate = _sample()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, m in enumerate(minutes):
        p = directory / f"podcast{n:02d}-{m:g}min.wav"
        if not p.exists():
            parts, total, k = [], 0, 0
            while total < m * 60 * rate:
                pause = np.zeros(int(rate * (0.3 + 0.3 * ((k + n) % 5))), np.float32)
                parts += [varied(audio, k + 7 * n), pause]
                total, k = total + len(parts[-2]) + len(pause), k + 1
            sf.write(p, np.concatenate(parts)[: int(m * 60 * rate)], rate)
        paths.append(p)
    return paths


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (Ray workers are not children: see ray_runner)."""
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows])
