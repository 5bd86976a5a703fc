"""Signal measures for the quality filters, estimated on a chunk's 16 kHz mono mix:

- `snr_db`: mean power of VAD speech frames over mean power of non-speech frames (frames at least
  0.1 s away from speech; from the window, else from the whole chunk; with no non-speech frames at
  all, the 10th percentile of frame power stands in for the noise floor).
- `dnsmos_sig`, `dnsmos_bak`, `dnsmos_ovrl` (stages/dnsmos.py): Microsoft's DNSMOS P.835 for a
  window's utterances, joined, and for each utterance (`SignalContext.dnsmos`).
- `clipping_ratio` (stages/filters.py): fraction of samples at or above `clip_level` of full scale
  (after resampling a clipped plateau ripples a little, so this slightly undercounts clipping in
  resampled files).
"""

from __future__ import annotations

import numpy as np

from stages.intervals import union
from stages.records import ANALYSIS_RATE, Chunk, Utterance

_FRAME = 320  # 20 ms at 16 kHz, for energy measures


class SignalContext:
    """Per-chunk cached views for signal metrics (frame powers, speech intervals)."""

    def __init__(self, chunk: Chunk, dnsmos=None):
        self.chunk = chunk
        self.dnsmos_model = dnsmos  # a stages.dnsmos.Dnsmos, or None: not scored
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

    def dnsmos(self, utterances: list[Utterance]) -> dict[str, float]:
        """DNSMOS of the utterances joined (duration-weighted over them); each utterance's own
        scores go to its `metrics`. {} when no model was given."""
        from stages.dnsmos import score_spans

        if self.dnsmos_model is None or not utterances:
            return {}
        scores = score_spans(self.dnsmos_model, [self.samples(u.start, u.end) for u in utterances])
        for u, sc in zip(utterances, scores):
            u.metrics.update({f"dnsmos_{k}": round(v, 4) for k, v in sc.items()})
        weights = [max(u.duration, 1e-6) for u in utterances]
        return {f"dnsmos_{k}": float(np.average([sc[k] for sc in scores], weights=weights)) for k in ("sig", "bak", "ovrl")}

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
