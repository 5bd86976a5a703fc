"""filter_utterances and filter_windows: the quality rules of stages/filters.py applied to a chunk.

The first failing rule rejects a candidate with `Rejection(stage=<this stage>, reason=<filter
name>, metric=<its value>, level="utterance"|"window")`.

- `filter_utterances`, between `utterances` and `windows`, so a rejected utterance never sits
  inside a kept window. It also records the time VAD found no speech in (`stage="vad",
  reason="non_speech", level="region"`), so every second of input has a record (see
  `pipeline/stats.py` for how the funnel adds up).
- `filter_windows`, after `windows`, on the formed windows; it also attaches the per-utterance
  quality list (`utterance_quality`) that `pipeline stats` reads from the manifest.

Metrics land in `u.metrics` (utterances) and `w.metrics` (windows: manifest columns and the sample
JSON's `quality`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from stages.base import Resources, Stage
from stages.filters import FiltersConfig, check, make_filters
from stages.intervals import complement
from stages.records import Chunk, Rejection, Utterance, Window
from stages.signal import SignalContext


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
        **{k: float(u.metrics[k]) for k in DNSMOS_KEYS if k in u.metrics},
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


DNSMOS_KEYS = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl")


def non_speech_gaps(chunk: Chunk, ctx: SignalContext) -> list[tuple[float, float]]:
    return complement(ctx.any_speech, chunk.offset, chunk.end)


class FilterStage(Stage):
    """The rules of one level (`level`), from the shared `filters` config section."""

    level: ClassVar[str]  # "utterance" | "window"

    def __init__(self, config: FiltersConfig):
        super().__init__(config)
        self.filters = make_filters(config, self.level)

    def describe(self) -> dict[str, Any]:
        return {"filters": [
            {"name": f.name, "measures": f.description, **f.thresholds(), **({"disabled": True} if f.name in self.config.disable else {})}
            for f in self.filters
        ]}


class UtteranceFilterStage(FilterStage):
    name, level = "filter_utterances", "utterance"

    def process(self, chunk: Chunk) -> Chunk:
        ctx = SignalContext(chunk)
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
        return chunk


class WindowFilterStage(FilterStage):
    name, level = "filter_windows", "window"
    model = None  # DNSMOS, when filters.dnsmos

    def resources(self) -> Resources:
        # A light task, not a pool of its own: the ONNX session loads in a fraction of a second (per
        # task when stages run as separate operators, once per worker when they are fused).
        return Resources(cpus=0.25, memory_gb=0.1 if self.config.dnsmos else 0.0)

    def setup(self) -> None:
        if self.config.dnsmos:
            from stages.dnsmos import Dnsmos

            self.model = Dnsmos(threads=1)

    def process(self, chunk: Chunk) -> Chunk:
        ctx = SignalContext(chunk, self.model)
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
        return chunk
