"""Shared helpers for the pipeline benchmarks: benchmark inputs and process-tree CPU accounting."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_inputs(directory: Path, count: int) -> list[Path]:
    """`count` distinct 30 s conversations: pyannote's sample, each copy slightly gain- and
    speed-shifted so no two inputs are byte-identical (real work, not a cache hit)."""
    import soundfile as sf

    from pipeline.inputs import embedded_default

    audio, rate = sf.read(embedded_default()[0], dtype="float32")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = directory / f"conv{i:03d}.wav"
        if not p.exists():
            stretch = 1.0 + 0.01 * (i % 5)
            idx = np.minimum((np.arange(int(len(audio) / stretch)) * stretch).astype(int), len(audio) - 1)
            sf.write(p, audio[idx] * (0.8 + 0.05 * (i % 4)), rate)
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
