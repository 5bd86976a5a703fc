"""Synthetic conversations with exact ground truth (espeak-ng voices), shared by the diarization
tests and bench/bench_diarize.py. Needs the `espeak-ng` binary."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

RATE = 16_000
CACHE = Path(os.environ.get("CSM_TEST_CACHE", Path(tempfile.gettempdir()) / "csm-corpus-espeak"))

# Measured with resemblyzer (mean cosine distance, 4 lines each): en-us+m3 vs en+f4 0.38 apart,
# 0.11-0.12 within a voice. Some pairs that sound different are not apart for a speaker encoder
# (en-us vs en-gb+f3: 0.11, like two lines of one voice) and the segmentation model then also
# hears one speaker, so they can't test diarization.
VOICE_A = "en-us+m3"  # male
VOICE_B = "en+f4"  # female
CLOSE_VOICES = ("en-us", "en-us+f2")  # 0.28 apart: a harder pair for the bench

# Lines of a two-person chat; plain sentences (no commas) so espeak leaves no long pauses inside.
SCRIPT = [
    (0, "Hello there I was hoping we could talk about the project plan today"),
    (1, "Sure thing I have a few minutes before my next meeting starts"),
    (0, "Great the first item is the schedule for the data collection"),
    (1, "I think we are about two weeks behind where we wanted to be"),
    (0, "That matches what I heard from the team yesterday afternoon"),
    (1, "We could bring in another person to help with the recordings"),
    (0, "That sounds reasonable let us check the budget first"),
    (1, "I will send you the numbers as soon as I get back to my desk"),
]


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str, speed: int = 165) -> np.ndarray:
    """espeak-ng speech at 16 kHz float32, leading/trailing silence trimmed (cached on disk)."""
    key = hashlib.sha1(f"{voice}|{speed}|{text}".encode()).hexdigest()[:16]
    path = CACHE / f"{key}.npy"
    if path.exists():
        return np.load(path)
    wav_bytes = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], check=True, capture_output=True
    ).stdout
    x, rate = sf.read(io.BytesIO(wav_bytes), dtype="float32")
    g = np.gcd(rate, RATE)
    x = resample_poly(x, RATE // g, rate // g).astype(np.float32)
    loud = np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())
    x = x[loud[0] : loud[-1] + 1]
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    return x


@dataclass
class Conversation:
    channels: np.ndarray  # float32 [speakers, samples]: speaker k's speech on channel k only
    turns: list[tuple[float, float, int]]  # (start, end, speaker index), exact

    @property
    def mono(self) -> np.ndarray:
        return self.channels.sum(axis=0).astype(np.float32)

    @property
    def duration(self) -> float:
        return self.channels.shape[1] / RATE


def conversation(
    script=SCRIPT,
    voices=(VOICE_A, VOICE_B),
    gap: float = 0.6,
    lead: float = 0.5,
    overlap_last: float = 0.0,
    noise_db: float = -55.0,
    seed: int = 0,
) -> Conversation:
    """Lines in order with `gap` seconds of silence between turns; each speaker (one per voice) on its own track.

    `overlap_last` starts each line that much before the previous one ends (crosstalk)."""
    clips = [(spk, speak(text, voices[spk])) for spk, text in script]
    turns, t = [], lead
    for i, (spk, x) in enumerate(clips):
        start = t - (overlap_last if i else 0.0)
        turns.append((start, start + len(x) / RATE, spk))
        t = start + len(x) / RATE + gap
    n = round((t + lead) * RATE)
    out = np.zeros((len(voices), n), np.float32)
    for (start, _, spk), (_, x) in zip(turns, clips):
        i = round(start * RATE)
        out[spk, i : i + len(x)] += x
    # a faint independent noise floor per channel: real recordings are never digital silence
    rng = np.random.default_rng(seed)
    out += (10 ** (noise_db / 20) * rng.standard_normal(out.shape)).astype(np.float32)
    turns = [(round(s, 4), round(e, 4), k) for s, e, k in turns]
    return Conversation(out, turns)


def energy_regions(x: np.ndarray, frame: float = 0.02, min_gap: float = 0.3, rel_db: float = -35.0):
    """(start, end) seconds where the frame energy is within rel_db of the loudest frame, with
    gaps shorter than min_gap bridged: VAD good enough for clean synthetic speech."""
    n = int(frame * RATE)
    frames = len(x) // n
    e = np.square(x[: frames * n].reshape(frames, n)).mean(axis=1)
    on = 10 * np.log10(e + 1e-12) > 10 * np.log10(e.max() + 1e-12) + rel_db
    regions: list[list[float]] = []
    for i in np.flatnonzero(on):
        s, t = i * frame, (i + 1) * frame
        if regions and s - regions[-1][1] < min_gap:
            regions[-1][1] = t
        else:
            regions.append([s, t])
    return [(round(s, 3), round(t, 3)) for s, t in regions]


# Third voices. Measured with resemblyzer (bench/bench_diarize.py --voices: mean cosine distance
# between utterance embeddings of different sentences, 16 lines a voice): one voice with itself
# 0.09-0.12; VOICE_A-VOICE_B 0.41; VOICE_C-VOICE_A 0.17 (also en-us, en+m1, en-gb+m2, en+grandpa:
# 0.17-0.19 from VOICE_A), so VOICE_C is a "close voices" case, not a distinct third person;
# VOICE_D-VOICE_A 0.35, VOICE_D-VOICE_B 0.47 (with en+Andy the farthest from both of 35 en variants).
VOICE_C = "en-gb-scotland+m1"  # male, close to VOICE_A: the hard three-voice case (bench_asr's third voice)
VOICE_D = "en+m8"  # male, distinct from VOICE_A and VOICE_B: three distinguishable people

# Three people; plain sentences as above.
SCRIPT_THREE = [
    (0, "Good morning everyone thanks for joining the call so early"),
    (1, "No problem I was already up with the kids anyway"),
    (2, "Same here so what is first on the list for today"),
    (0, "We need to decide where the new office should be"),
    (2, "I would vote for somewhere close to the train station"),
    (1, "The station is fine but the rent there is very high"),
    (0, "Let us collect three options and compare them next week"),
    (2, "I can look at the places near the river this afternoon"),
]

# One-word backchannels in the other speaker's pauses.
SCRIPT_BACKCHANNEL = [
    (0, "So I drove down to the coast on Saturday morning"),
    (1, "Yeah"),
    (0, "and the traffic was terrible for the first hour"),
    (1, "Right"),
    (0, "but after that the road was almost empty all the way"),
    (1, "Okay"),
    (0, "we got there just in time for lunch by the harbour"),
    (1, "That sounds lovely what did you have"),
    (0, "Fish and chips of course"),
    (1, "Nice"),
]
