"""DNSMOS P.835 (Microsoft's non-intrusive speech quality predictor): SIG (speech), BAK
(background) and OVRL (overall) mean opinion scores, 1 to 5, from 16 kHz audio.

The ONNX models ship inside the `speechmos` wheel (MIT licence, `speechmos/dnsmos_models/`), so
this runs offline. We score the way the DNS Challenge's reference script does (9.01 s input,
clips shorter than that repeated to fill it, the same polynomial calibration), except that
segments of a longer clip are taken every 9.01 s instead of every second: the mean over a whole
window barely moves and it costs a ninth as much.
"""

from __future__ import annotations

import os

import numpy as np

RATE = 16_000
INPUT_SECONDS = 9.01
# The reference script's calibration of the primary model's raw outputs (non-personalized).
_CALIBRATION = {
    "sig": np.poly1d([-0.08397278, 1.22083953, 0.0052439]),
    "bak": np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
    "ovrl": np.poly1d([-0.06766283, 1.11546468, 0.04602535]),
}


def model_path() -> str:
    import speechmos

    return os.path.join(os.path.dirname(speechmos.__file__), "dnsmos_models", "sig_bak_ovr.onnx")


class Dnsmos:
    """The P.835 model in an onnxruntime session of `threads` intra-op threads."""

    def __init__(self, threads: int = 1, path: str | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        self.path = path or model_path()
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def segments(self, audio: np.ndarray) -> np.ndarray:
        """[n, 9.01 s] float32 segments covering the clip (a short clip repeated to fill one)."""
        n = int(INPUT_SECONDS * RATE)
        audio = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
        if len(audio) == 0:
            raise ValueError("empty audio")
        if len(audio) < n:
            audio = np.tile(audio, -(-n // len(audio)))
        starts = range(0, len(audio) - n + 1, n)
        return np.stack([audio[s : s + n] for s in starts])

    def score(self, audio: np.ndarray) -> dict[str, float]:
        """{"sig", "bak", "ovrl"}: the calibrated means over the clip's segments."""
        raw = np.stack([self.session.run(None, {self.input: seg[None]})[0][0] for seg in self.segments(audio)])
        return {k: float(np.mean(_CALIBRATION[k](raw[:, i]))) for i, k in enumerate(("sig", "bak", "ovrl"))}


def score_spans(model: Dnsmos, clips: list[np.ndarray]) -> list[dict[str, float]]:
    """Scores of several clips (a window's utterances) at the cost of their total length: the
    clips are joined, the join is scored in 9.01 s segments (the last one ending at the join's end,
    a join shorter than a segment repeated to fill it), and each clip gets the mean of the segments
    that hold its samples, weighted by how many. Whole-clip scoring would pay a full 9 s inference
    for every one-word utterance."""
    n = int(INPUT_SECONDS * RATE)
    joined = np.concatenate([np.asarray(c, dtype=np.float32) for c in clips]) if clips else np.zeros(0, np.float32)
    if len(joined) == 0:
        raise ValueError("empty audio")
    if len(joined) <= n:
        one = model.score(joined)
        return [dict(one) for _ in clips]
    starts = list(range(0, len(joined) - n + 1, n))
    if starts[-1] + n < len(joined):
        starts.append(len(joined) - n)  # the tail, overlapping the previous segment
    scores = [model.score(joined[s : s + n]) for s in starts]
    out, begin = [], 0
    for c in clips:
        end = begin + len(c)
        weights = np.array([max(0, min(end, s + n) - max(begin, s)) for s in starts], dtype=np.float64)
        if weights.sum() == 0:  # an empty clip: the segment it sits in
            weights = np.array([float(s <= begin < s + n) for s in starts]) + 1e-9
        out.append({k: float(np.average([sc[k] for sc in scores], weights=weights)) for k in ("sig", "bak", "ovrl")})
        begin = end
    return out
