"""filters: the quality rules, each with a recorded reason for everything it drops.

Each filter is a small class with a `name` (the rejection reason), the metric(s) it measures and
its threshold(s) from `FiltersConfig`. Every candidate is measured by every filter of its level
(the metrics are kept, so the manifest shows them for kept windows too); the first filter that
fails, in the order below, rejects it. The two stages that apply them (`filter_utterances` before
windows are formed, `filter_windows` after) are in stages/filtering.py; the signal measures they
use in stages/signal.py.

- `language_prob`: ASR language probability when the ASR stage provides one
  (`u.language_prob`); a fixed-language model (the default, `asr.language="en"`) gives
  none, and it is then taken as 1.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from stages.intervals import covered
from stages.overrides import require, require_between
from stages.records import Utterance, Window
from stages.signal import SignalContext, rms_dbfs, snr_estimate

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


@dataclass(frozen=True)
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
    # DNSMOS P.835 overall quality (1-5) of the window's speech. bench/bench_dnsmos.py: white noise
    # and a tone score 0.96-1.09; espeak speech 1.9-2.5 clean and 1.5 at 0 dB SNR; pyannote's
    # telephone sample 2.3-3.2 per turn. 1.3 rejects noise-like audio (a hallucinated transcript over
    # noise) and keeps narrowband and noisy speech; Emilia-Pipe's 3.0 suits studio corpora but would
    # drop most of a telephone call. Not a music detector: chords score 2.1-2.4 (speech_ratio and
    # snr catch those).
    min_dnsmos_ovrl: float = 1.3
    dnsmos: bool = True  # score windows and utterances with DNSMOS (about 12-24x real time on one core)
    # --- switches ---
    disable: list[str] = field(default_factory=list)  # filter names that measure but never reject

    def __post_init__(self):
        require_between(self, 0.0, 1.0, "min_vad_coverage", "max_no_speech_prob", "max_repeat_ratio", "min_language_prob",
                        "max_overlap_ratio", "min_speech_ratio", "max_clipping_ratio", "clip_level")
        require(self.min_utterance_seconds < self.max_utterance_seconds, "min_utterance_seconds",
                f"must be below max_utterance_seconds ({self.min_utterance_seconds} >= {self.max_utterance_seconds})")
        known = {f.name for f in UTTERANCE_FILTERS + WINDOW_FILTERS}
        unknown = sorted(set(self.disable) - known)
        require(not unknown, "disable", f"unknown filter names {unknown} (known: {', '.join(sorted(known))})")


# ------------------------------------------------------------------ text measures


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


class Dnsmos(Filter):
    name, level = "dnsmos", "window"
    description = "DNSMOS P.835 overall quality of the window's speech below min_dnsmos_ovrl (off with dnsmos: false)"

    def measure(self, w: Window, ctx):
        return ctx.dnsmos(w.utterances)

    def reject(self, m):
        v = m.get("dnsmos_ovrl")
        return v if v is not None and v < self.config.min_dnsmos_ovrl else None

    def thresholds(self):
        return {"min_dnsmos_ovrl": self.config.min_dnsmos_ovrl, "enabled": self.config.dnsmos}


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
WINDOW_FILTERS: tuple[type[Filter], ...] = (SpeechRatio, Clipping, Snr, Dnsmos, MinSpeakers)
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
