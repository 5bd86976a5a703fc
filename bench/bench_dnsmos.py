"""DNSMOS P.835 on real, synthetic and non-speech audio: the figures behind `filters.min_dnsmos_ovrl`.

    python bench/bench_dnsmos.py

Scores pyannote's telephone sample (whole and per reference turn), espeak-ng voices clean and with
white noise at 20/10/5/0 dB SNR, and non-speech (white noise, a 220 Hz tone, a steady and a pulsing
chord); prints SIG/BAK/OVRL and the seconds per 9.01 s segment on one thread.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import ROOT, table

RATE = 16_000


def main() -> None:
    import sys

    import soundfile as sf

    sys.path.insert(0, str(ROOT / "tests"))
    import pyannote.audio
    from conftest_audio import SCRIPT, VOICE_A, VOICE_B, VOICE_C, speak

    from stages.dnsmos import Dnsmos

    model = Dnsmos(threads=1)
    sample = Path(pyannote.audio.__file__).parent / "sample"
    x, _ = sf.read(sample / "sample.wav", dtype="float32")
    clips = [("sample, speech part (6.7-30 s)", x[int(6.7 * RATE):])]
    for line in (sample / "sample.rttm").read_text().splitlines():
        f = line.split()
        start, dur = float(f[3]), float(f[4])
        if dur > 1.0:
            clips.append((f"sample turn {start:.1f}-{start + dur:.1f} s", x[int(start * RATE):int((start + dur) * RATE)]))
    rng = np.random.default_rng(0)
    for voice in (VOICE_A, VOICE_B, VOICE_C, "en-us"):
        clips.append((f"espeak {voice}, clean", speak(SCRIPT[0][1], voice)))
    s = speak(SCRIPT[0][1], VOICE_A)
    for snr in (20, 10, 5, 0):
        n = rng.standard_normal(len(s)).astype(np.float32)
        n *= np.sqrt(np.mean(s**2) / np.mean(n**2)) / 10 ** (snr / 20)
        clips.append((f"espeak {VOICE_A}, {snr} dB SNR", np.clip(s + n, -1, 1)))
    t = np.arange(RATE * 5) / RATE
    chord = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0))
    clips += [
        ("white noise", 0.1 * rng.standard_normal(len(t)).astype(np.float32)),
        ("220 Hz tone", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)),
        ("steady chord", (0.2 * chord).astype(np.float32)),
        ("pulsing chord (tests' music)", (0.2 * chord * (0.3 + 0.7 * (np.floor(t * 2) % 2 == 0))).astype(np.float32)),
    ]
    rows = []
    for name, clip in clips:
        sc = model.score(clip)
        rows.append([name, f"{len(clip) / RATE:.1f}", f"{sc['sig']:.2f}", f"{sc['bak']:.2f}", f"{sc['ovrl']:.2f}"])
    print(table(rows, ["clip", "seconds", "SIG", "BAK", "OVRL"]))
    seg = model.segments(x[: int(9.01 * RATE)])
    start = time.perf_counter()
    for _ in range(5):
        model.session.run(None, {model.input: seg})
    print(f"\n{(time.perf_counter() - start) / 5:.3f} s per 9.01 s segment on one thread")


if __name__ == "__main__":
    main()
