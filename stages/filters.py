"""filters: quality filters with a recorded reason for everything they drop.

Each filter is a small class with a `name` (the rejection reason), the metric(s) it measures and
its threshold(s) from `FiltersConfig`. Every candidate is measured by every filter of its level
(the metrics are kept, so the manifest shows them for kept windows too); the first filter that
fails, in the order below, rejects it with `Rejection(stage="filters", reason=<filter name>,
metric=<its value>, level="utterance"|"window")`.

The stage runs twice (two instances of `FilterStage`):

- `level="utterance"`, between `utterances` and `windows`, so a rejected utterance never sits
  inside a kept window. It also records the time VAD found no speech in (`stage="vad",
  reason="non_speech", level="region"`), so every second of input has a record (see
  `pipeline/stats.py` for how the funnel adds up).
- `level="window"`, after `windows`, on the formed windows; it also attaches the per-utterance
  quality list (`utterance_quality`) that `pipeline stats` reads from the manifest.

Metrics land in `u.metrics` (utterances) and `w.metrics` (windows: manifest columns and the sample
JSON's `quality`).

Signal metrics are estimates on the chunk's 16 kHz mono mix:
- `snr_db`: mean power of VAD speech frames over mean power of non-speech frames (frames at least
  0.1 s away from speech; from the window, else from the whole chunk; with no non-speech frames at
  all, the 10th percentile of frame power stands in for the noise floor). Not a MOS predictor: none
  installs offline.
- `clipping_ratio`: fraction of samples at or above `clip_level` of full scale (after resampling a
  clipped plateau ripples a little, so this slightly undercounts clipping in resampled files).
- `language_prob`: ASR language probability when the ASR stage provides one
  (`u.language_prob`); a fixed-language model (the default, `asr.language="en"`) gives
  none, and it is then taken as 1.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from stages.base import Stage
from stages.intervals import complement, covered, union
from stages.records import ANALYSIS_RATE, Chunk, Rejection, Utterance, Window

# Known Whisper "phantom" outputs: subtitle credits and video outros it hallucinates on silence,
# music and noise (learnt from subtitled videos). Matched as whole words on lower-cased text with
# punctuation removed. Phrases real conversations use ("thanks for listening" in a podcast) are
# left out on purpose; add them with `filters.phantom_phrases` for corpora where they only occur as
# hallucinations.
PHANTOM_PHRASES = (
    "thank you for watching",
    "thanks for watching",
    "please subscribe",
    "like and subscribe",
    "subscribe to my channel",
    "don't forget to subscribe",
    "subtitles by",
    "subtitled by",
    "subtitles made by",
    "captions by",
    "captioning by",
    "transcribed by",
    "translated by",
    "transcription by",
    "amara org",
    "www ",
    "see you in the next video",
)

_FRAME = 320  # 20 ms at 16 kHz, for energy measures


@dataclass
class FiltersConfig:
    # --- utterance level (run before windows are formed) ---
    min_utterance_seconds: float = 0.3  # shorter: a blip, too short to carry a turn
    max_utterance_seconds: float = 30.0  # longer: beyond Whisper's 30 s input, its text is truncated
    min_vad_coverage: float = 0.3  # text in silence: share of the utterance VAD calls speech
    min_rms_dbfs: float = -60.0  # text in silence: the utterance's level
    min_avg_logprob: float = -1.0  # Whisper's own logprob_threshold
    max_no_speech_prob: float = 0.6  # Whisper's own no_speech_threshold
    min_chars_per_second: float = 1.5  # speaking rate, characters of text per second of audio
    max_chars_per_second: float = 40.0  # fast read speech is ~25-30
    max_repeat_ratio: float = 0.5  # share of repeated word n-grams (n = 2..4): looping decodes
    min_repeat_ngrams: int = 4  # fewer n-grams than this: too short to judge
    phantom_phrases: list[str] = field(default_factory=lambda: list(PHANTOM_PHRASES))
    languages: list[str] = field(default_factory=list)  # allowed languages; empty: any
    min_language_prob: float = 0.5  # absent probability (fixed-language models) counts as 1.0
    max_overlap_ratio: float = 0.5  # seconds with another speaker talking / utterance duration
    # --- window level (run after windows are formed) ---
    min_speech_ratio: float = 0.4  # VAD speech / window length
    max_clipping_ratio: float = 0.005
    clip_level: float = 0.99  # |sample| at or above this (full scale 1.0) counts as clipped
    min_snr_db: float = 5.0
    min_speakers: int = 1  # 2 in configs/conversational.yaml
    # --- switches ---
    disable: list[str] = field(default_factory=list)  # filter names that measure but never reject


# ------------------------------------------------------------------ interval and signal helpers


def words_of(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def repeat_ratio(text: str, min_ngrams: int = 4) -> tuple[float, int]:
    """Largest share of repeated word n-grams over n = 2..4 (0: none repeated), and how many
    n-grams that was measured on (0: too short to judge)."""
    words = words_of(text)
    best, count = 0.0, 0
    for n in (2, 3, 4):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if len(grams) < min_ngrams:
            continue
        ratio = 1.0 - len(set(grams)) / len(grams)
        if ratio >= best:
            best, count = ratio, len(grams)
    # A single word looped ("no no no no no") also shows as repeated bigrams; one very long token
    # (e.g. "hahahahahahaha") is left alone.
    return best, count


def normalise(text: str) -> str:
    """Lower-case words separated by single spaces, padded with a space on each side."""
    return " " + " ".join(words_of(text.replace("\u2019", "'").replace(".", " "))) + " "


class SignalContext:
    """Per-chunk cached views for signal metrics (frame powers, speech intervals)."""

    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self.offset = chunk.offset
        self.speech = union([(r.start, r.end) for r in chunk.speech])
        self.channel_speech = [union([(r.start, r.end) for r in regions]) for regions in chunk.channel_speech]
        self.any_speech = union(self.speech + [iv for ch in self.channel_speech for iv in ch])
        self._mono: np.ndarray | None = None
        self._power: np.ndarray | None = None
        self._masks: dict[float, np.ndarray] = {}

    @property
    def mono(self) -> np.ndarray:
        if self._mono is None:
            self._mono = np.asarray(self.chunk.mono16k, dtype=np.float32)
        return self._mono

    def samples(self, start: float, end: float) -> np.ndarray:
        lo = max(0, int(round((start - self.offset) * ANALYSIS_RATE)))
        hi = min(len(self.mono), int(round((end - self.offset) * ANALYSIS_RATE)))
        return self.mono[lo:hi] if hi > lo else self.mono[:0]

    @property
    def frame_power(self) -> np.ndarray:
        """Mean power of each 20 ms frame of the chunk."""
        if self._power is None:
            n = len(self.mono) // _FRAME
            x = self.mono[: n * _FRAME].astype(np.float64).reshape(n, _FRAME)
            self._power = (x * x).mean(axis=1)
        return self._power

    def frame_times(self) -> np.ndarray:
        return self.offset + (np.arange(len(self.frame_power)) + 0.5) * _FRAME / ANALYSIS_RATE

    def speech_mask(self, guard: float = 0.0) -> np.ndarray:
        """Frames whose centre is within `guard` seconds of VAD speech (cached per guard)."""
        if guard not in self._masks:
            t = self.frame_times()
            mask = np.zeros(len(t), dtype=bool)
            for a, b in self.any_speech:
                lo, hi = np.searchsorted(t, [a - guard, b + guard])
                mask[lo:hi] = True
            self._masks[guard] = mask
        return self._masks[guard]

    def utterance_speech(self, u: Utterance) -> list[tuple[float, float]]:
        if self.chunk.speaker_mode == "channels" and u.channel < len(self.channel_speech):
            return self.channel_speech[u.channel]
        return self.any_speech


def rms_dbfs(x: np.ndarray) -> float:
    if len(x) == 0:
        return -120.0
    return float(10 * np.log10(max(float(np.mean(x.astype(np.float64) ** 2)), 1e-12)))


def snr_estimate(ctx: SignalContext, start: float, end: float, min_frames: int = 25) -> float:
    """SNR (dB) of [start, end): speech-frame power over non-speech-frame power (see module doc)."""
    power = ctx.frame_power
    if len(power) == 0:
        return 0.0
    t = ctx.frame_times()
    inside = (t >= start) & (t < end)
    speech = ctx.speech_mask() & inside
    quiet_all = ~ctx.speech_mask(guard=0.1)
    quiet = quiet_all & inside
    if speech.sum() == 0:
        return -20.0
    p_speech = float(power[speech].mean())
    if quiet.sum() >= min_frames:
        p_noise = float(power[quiet].mean())
    elif quiet_all.sum() >= min_frames:
        p_noise = float(power[quiet_all].mean())
    else:
        p_noise = float(np.percentile(power[inside], 10)) if inside.any() else 0.0
    if p_noise <= 1e-12:
        return 100.0 if p_speech > 1e-10 else -20.0
    return float(np.clip(10 * np.log10(max(p_speech - p_noise, 1e-12) / p_noise), -20.0, 100.0))


# ------------------------------------------------------------------ filters


class Filter:
    """Measures one aspect of a candidate; `reject` returns the metric to record, or None to keep."""

    name: ClassVar[str]
    level: ClassVar[str]  # "utterance" | "window"
    description: ClassVar[str] = ""

    def __init__(self, config: FiltersConfig):
        self.config = config

    def measure(self, item: Any, ctx: SignalContext) -> dict[str, float]:
        raise NotImplementedError

    def reject(self, m: dict[str, float]) -> float | None:
        raise NotImplementedError

    def thresholds(self) -> dict[str, Any]:
        return {}


class UtteranceDuration(Filter):
    name, level = "utterance_duration", "utterance"
    description = "utterance length (s) outside [min_utterance_seconds, max_utterance_seconds]"

    def measure(self, u: Utterance, ctx: SignalContext) -> dict[str, float]:
        return {"duration": float(u.duration)}

    def reject(self, m):
        c = self.config
        return m["duration"] if not c.min_utterance_seconds <= m["duration"] <= c.max_utterance_seconds else None

    def thresholds(self):
        return {"min_utterance_seconds": self.config.min_utterance_seconds, "max_utterance_seconds": self.config.max_utterance_seconds}


class TextInSilence(Filter):
    name, level = "text_in_silence", "utterance"
    description = "text where VAD heard little speech (vad_coverage) or the audio is near silent (rms_dbfs)"

    def measure(self, u: Utterance, ctx: SignalContext) -> dict[str, float]:
        cov = covered(ctx.utterance_speech(u), u.start, u.end) / max(u.duration, 1e-6)
        return {"vad_coverage": float(cov), "rms_dbfs": rms_dbfs(ctx.samples(u.start, u.end))}

    def reject(self, m):
        if m["vad_coverage"] < self.config.min_vad_coverage:
            return m["vad_coverage"]
        return m["rms_dbfs"] if m["rms_dbfs"] < self.config.min_rms_dbfs else None

    def thresholds(self):
        return {"min_vad_coverage": self.config.min_vad_coverage, "min_rms_dbfs": self.config.min_rms_dbfs}


class AsrLogprob(Filter):
    name, level = "asr_logprob", "utterance"
    description = "Whisper average token log probability below min_avg_logprob"

    def measure(self, u: Utterance, ctx):
        return {"avg_logprob": float(u.avg_logprob)}

    def reject(self, m):
        return m["avg_logprob"] if m["avg_logprob"] < self.config.min_avg_logprob else None

    def thresholds(self):
        return {"min_avg_logprob": self.config.min_avg_logprob}


class AsrNoSpeech(Filter):
    name, level = "asr_no_speech", "utterance"
    description = "Whisper no-speech probability above max_no_speech_prob"

    def measure(self, u: Utterance, ctx):
        return {"no_speech_prob": float(u.no_speech_prob)}

    def reject(self, m):
        return m["no_speech_prob"] if m["no_speech_prob"] > self.config.max_no_speech_prob else None

    def thresholds(self):
        return {"max_no_speech_prob": self.config.max_no_speech_prob}


class SpeakingRate(Filter):
    name, level = "speaking_rate", "utterance"
    description = "characters of text per second outside [min_chars_per_second, max_chars_per_second]"

    def measure(self, u: Utterance, ctx):
        return {"chars_per_second": len(u.text.strip()) / max(u.duration, 1e-3)}

    def reject(self, m):
        c, r = self.config, m["chars_per_second"]
        return r if not c.min_chars_per_second <= r <= c.max_chars_per_second else None

    def thresholds(self):
        return {"min_chars_per_second": self.config.min_chars_per_second, "max_chars_per_second": self.config.max_chars_per_second}


class Repetition(Filter):
    name, level = "repetition", "utterance"
    description = "share of repeated word n-grams (n=2..4) above max_repeat_ratio: a looping decode"

    def measure(self, u: Utterance, ctx):
        ratio, _ = repeat_ratio(u.text, self.config.min_repeat_ngrams)
        return {"repeat_ratio": float(ratio)}

    def reject(self, m):
        return m["repeat_ratio"] if m["repeat_ratio"] > self.config.max_repeat_ratio else None

    def thresholds(self):
        return {"max_repeat_ratio": self.config.max_repeat_ratio, "min_repeat_ngrams": self.config.min_repeat_ngrams}


class PhantomPhrase(Filter):
    name, level = "phantom_phrase", "utterance"
    description = "contains a known Whisper phantom phrase (subtitle credits, video outros)"

    def __init__(self, config):
        super().__init__(config)
        self.phrases = [normalise(p) for p in config.phantom_phrases if normalise(p).strip()]

    def measure(self, u: Utterance, ctx):
        text = normalise(u.text)
        return {"phantom_phrase": float(any(p in text for p in self.phrases))}

    def reject(self, m):
        return m["phantom_phrase"] if m["phantom_phrase"] > 0 else None

    def thresholds(self):
        return {"phantom_phrases": len(self.phrases)}


class Language(Filter):
    name, level = "language", "utterance"
    description = "language not in `languages` (when set) or its probability below min_language_prob"

    def measure(self, u: Utterance, ctx):
        prob = u.language_prob
        return {"language_prob": 1.0 if prob is None else float(prob)}

    def reject_language(self, u: Utterance) -> bool:
        return bool(self.config.languages) and u.language not in self.config.languages

    def reject(self, m):
        return m["language_prob"] if m["language_prob"] < self.config.min_language_prob else None

    def thresholds(self):
        return {"languages": list(self.config.languages), "min_language_prob": self.config.min_language_prob}


class Overlap(Filter):
    name, level = "overlap", "utterance"
    description = "share of the utterance during which another speaker talks above max_overlap_ratio"

    def measure(self, u: Utterance, ctx):
        return {"overlap_ratio": float(u.overlap) / max(u.duration, 1e-6)}

    def reject(self, m):
        return m["overlap_ratio"] if m["overlap_ratio"] > self.config.max_overlap_ratio else None

    def thresholds(self):
        return {"max_overlap_ratio": self.config.max_overlap_ratio}


class SpeechRatio(Filter):
    name, level = "speech_ratio", "window"
    description = "VAD speech over window length below min_speech_ratio"

    def measure(self, w: Window, ctx):
        return {"speech_ratio": covered(ctx.any_speech, w.start, w.end) / max(w.end - w.start, 1e-6)}

    def reject(self, m):
        return m["speech_ratio"] if m["speech_ratio"] < self.config.min_speech_ratio else None

    def thresholds(self):
        return {"min_speech_ratio": self.config.min_speech_ratio}


class Clipping(Filter):
    name, level = "clipping", "window"
    description = "share of samples at or above clip_level of full scale above max_clipping_ratio"

    def measure(self, w: Window, ctx):
        x = ctx.samples(w.start, w.end)
        ratio = float(np.mean(np.abs(x) >= self.config.clip_level)) if len(x) else 0.0
        return {"clipping_ratio": ratio}

    def reject(self, m):
        return m["clipping_ratio"] if m["clipping_ratio"] > self.config.max_clipping_ratio else None

    def thresholds(self):
        return {"max_clipping_ratio": self.config.max_clipping_ratio, "clip_level": self.config.clip_level}


class Snr(Filter):
    name, level = "snr", "window"
    description = "estimated SNR (speech vs non-speech frame power) below min_snr_db"

    def measure(self, w: Window, ctx):
        return {"snr_db": snr_estimate(ctx, w.start, w.end)}

    def reject(self, m):
        return m["snr_db"] if m["snr_db"] < self.config.min_snr_db else None

    def thresholds(self):
        return {"min_snr_db": self.config.min_snr_db}


class MinSpeakers(Filter):
    name, level = "min_speakers", "window"
    description = "fewer distinct speakers in the window than min_speakers (off at 1)"

    def measure(self, w: Window, ctx):
        return {"speakers": float(len({u.speaker for u in w.utterances}))}

    def reject(self, m):
        return m["speakers"] if m["speakers"] < self.config.min_speakers else None

    def thresholds(self):
        return {"min_speakers": self.config.min_speakers}


UTTERANCE_FILTERS: tuple[type[Filter], ...] = (
    UtteranceDuration, TextInSilence, AsrLogprob, AsrNoSpeech, SpeakingRate, Repetition, PhantomPhrase, Language, Overlap,
)
WINDOW_FILTERS: tuple[type[Filter], ...] = (SpeechRatio, Clipping, Snr, MinSpeakers)
# The order in which rejections are attributed (pipeline/stats.py uses it for the funnel).
FILTER_ORDER = [f.name for f in UTTERANCE_FILTERS + WINDOW_FILTERS]


def make_filters(config: FiltersConfig, level: str) -> list[Filter]:
    return [cls(config) for cls in (UTTERANCE_FILTERS if level == "utterance" else WINDOW_FILTERS)]


def check(filters: list[Filter], item: Any, ctx: SignalContext, config: FiltersConfig) -> tuple[dict[str, float], str | None, float | None]:
    """Measure `item` with every filter; returns (metrics, first failing filter name, its metric)."""
    metrics: dict[str, float] = {}
    reason, value = None, None
    for f in filters:
        m = f.measure(item, ctx)
        metrics.update(m)
        if reason is not None or f.name in config.disable:
            continue
        v = f.reject(m)
        if isinstance(f, Language) and v is None and f.reject_language(item):
            v = m["language_prob"]
        if v is not None:
            reason, value = f.name, float(v)
    return metrics, reason, value


def utterance_quality(u: Utterance) -> dict[str, Any]:
    """Per-utterance facts for the manifest (what `pipeline stats` draws its distributions from)."""
    d = max(u.duration, 1e-6)
    return {
        "start": float(u.start),
        "end": float(u.end),
        "speaker": str(u.speaker),
        "text_chars": int(len(u.text)),
        "chars_per_second": float(len(u.text.strip()) / d),
        "avg_logprob": float(u.avg_logprob),
        "no_speech_prob": float(u.no_speech_prob),
        "overlap_ratio": float(u.overlap / d),
        "vad_coverage": float(u.metrics.get("vad_coverage", 1.0)),
        "repeat_ratio": float(u.metrics.get("repeat_ratio", 0.0)),
        "language": str(u.language),
        "language_prob": float(u.metrics.get("language_prob", 1.0)),
    }


def window_metrics(w: Window) -> dict[str, float]:
    """Window-level aggregates of the utterance metrics (manifest columns)."""
    utts = w.utterances
    speech = sum(u.duration for u in utts) or 1e-6
    return {
        "chars_per_second": float(sum(len(u.text.strip()) for u in utts) / speech),
        "overlap_ratio": float(sum(u.overlap for u in utts) / speech),
        "min_vad_coverage": float(min(u.metrics.get("vad_coverage", 1.0) for u in utts)),
        "max_repeat_ratio": float(max(u.metrics.get("repeat_ratio", 0.0) for u in utts)),
        "min_language_prob": float(min(u.metrics.get("language_prob", 1.0) for u in utts)),
    }


def non_speech_gaps(chunk: Chunk, ctx: SignalContext) -> list[tuple[float, float]]:
    return complement(ctx.any_speech, chunk.offset, chunk.end)


class FilterStage(Stage):
    name = "filters"

    def __init__(self, config: FiltersConfig, level: str = "utterance"):
        super().__init__(config)
        if level not in ("utterance", "window"):
            raise ValueError(f"level must be 'utterance' or 'window', got {level!r}")
        self.level = level
        self.filters = make_filters(config, level)

    def describe(self) -> dict[str, Any]:
        # Both instances describe every filter (run.json keys stages by name, so they share one entry).
        return {
            f"{level}_filters": [
                {"name": f.name, "measures": f.description, **f.thresholds(), **({"disabled": True} if f.name in self.config.disable else {})}
                for f in make_filters(self.config, level)
            ]
            for level in ("utterance", "window")
        }

    def process(self, chunk: Chunk) -> Chunk:
        ctx = SignalContext(chunk)
        if self.level == "utterance":
            self.filter_utterances(chunk, ctx)
        else:
            self.filter_windows(chunk, ctx)
        return chunk

    def filter_utterances(self, chunk: Chunk, ctx: SignalContext) -> None:
        sid = chunk.recording.id
        # Non-speech time gets its own records, so the funnel accounts for every second of input.
        for a, b in non_speech_gaps(chunk, ctx):
            chunk.rejected.append(Rejection(sid, "vad", "non_speech", a, b, None, level="region"))
        kept = []
        for u in chunk.utterances:
            metrics, reason, value = check(self.filters, u, ctx, self.config)
            u.metrics.update(metrics)
            if reason is None:
                kept.append(u)
                self.counters["utterances_kept"] += 1
            else:
                chunk.rejected.append(Rejection(sid, self.name, reason, u.start, u.end, value, level="utterance"))
                self.counters[f"rejected:{reason}"] += 1
        chunk.utterances = kept

    def filter_windows(self, chunk: Chunk, ctx: SignalContext) -> None:
        sid = chunk.recording.id
        kept: list[Window] = []
        for w in chunk.windows:
            metrics, reason, value = check(self.filters, w, ctx, self.config)
            metrics.pop("speakers", None)  # already a manifest column (window_stats)
            if reason is not None:
                chunk.rejected.append(Rejection(sid, self.name, reason, w.start, w.end, value, level="window"))
                self.counters[f"rejected:{reason}"] += 1
                continue
            w.metrics.update(metrics)
            w.metrics.update(window_metrics(w))
            w.metrics["utterance_quality"] = [utterance_quality(u) for u in w.utterances]
            w.index = len(kept)
            kept.append(w)
            self.counters["windows_kept"] += 1
        chunk.windows = kept
        if not kept:
            chunk.reject(self.name, "no_windows")
