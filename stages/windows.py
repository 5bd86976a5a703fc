"""windows: consecutive utterances of one source grouped into CSM training samples.

The budget counts what the model sees (reference.md section 1): the text rows of
`[{speaker}]{text}` with BOS/EOS, the utterance's Mimi frames, and one end-of-audio frame per
utterance. The default of 2048 positions is CSM's context.

A window is cut only at utterance boundaries. An utterance that alone is over the budget is split
into pieces that fit (`split_to_budget`), never mid-word: with word timestamps (`u.words`, from
`asr.align_model`) at the longest pause between two words; without them, at the middle of a VAD
pause inside the utterance when there is one, else at a time cut, and the text is then split at the
space nearest the same proportion of its characters. Without word timestamps the text/audio
correspondence of the pieces is an estimate (uniform speaking rate assumed).
Windows shorter than `min_seconds`, and single-speaker windows unless `keep_single_speaker`, are
rejected with a record.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from stages.base import Stage
from stages.overrides import require
from stages.records import Chunk, Rejection, Utterance, Window

FRAME_RATE = 12.5  # Mimi frames per second


@dataclass(frozen=True)
class WindowsConfig:
    max_positions: int = 2048  # text tokens + audio frames + end-of-audio frames
    chars_per_token: float = 3.5  # estimate for the Llama-3 tokenizer on English
    max_gap_seconds: float = 10.0  # a longer silence starts a new window (a different exchange)
    min_utterances: int = 1
    min_seconds: float = 1.0  # shorter windows (first utterance start to last one's end) are rejected
    keep_single_speaker: bool = True  # False: windows with one speaker only are rejected
    split_long: bool = True  # split utterances over the budget (at pauses / word boundaries) instead of rejecting

    def __post_init__(self):
        require(self.max_positions >= 64, "max_positions", f"must be at least 64, got {self.max_positions}")
        require(self.chars_per_token > 0, "chars_per_token", f"must be > 0, got {self.chars_per_token}")
        require(self.min_utterances >= 1, "min_utterances", f"must be at least 1, got {self.min_utterances}")


def audio_frames(duration: float) -> int:
    """Mimi frames for `duration` seconds: ceil(samples / 1920) at 24 kHz."""
    return math.ceil(round(duration * 24_000) / 1920)


def text_tokens(u: Utterance, chars_per_token: float) -> int:
    return math.ceil(len(f"[{u.speaker}]{u.text}") / chars_per_token) + 2  # + BOS, EOS


def positions(u: Utterance, config: WindowsConfig) -> int:
    return text_tokens(u, config.chars_per_token) + audio_frames(u.duration) + 1  # + end-of-audio


def group_windows(utts: list[Utterance], config: WindowsConfig) -> tuple[list[list[Utterance]], list[Utterance]]:
    """Greedy grouping in time order; returns (windows, utterances too long for any window)."""
    windows: list[list[Utterance]] = []
    too_long: list[Utterance] = []
    current: list[Utterance] = []
    used = 0
    for u in sorted(utts, key=lambda u: (u.start, u.channel)):
        cost = positions(u, config)
        if cost > config.max_positions:
            too_long.append(u)
            continue
        gap = u.start - current[-1].end if current else 0.0
        if current and (used + cost > config.max_positions or gap > config.max_gap_seconds):
            windows.append(current)
            current, used = [], 0
        current.append(u)
        used += cost
    if current:
        windows.append(current)
    return windows, too_long


def _fits(text: str, speaker: str, seconds: float, config: WindowsConfig) -> bool:
    cost = math.ceil(len(f"[{speaker}]{text}") / config.chars_per_token) + 2 + audio_frames(seconds) + 1
    return cost <= config.max_positions


def _word_spans(u: Utterance) -> list[tuple[int, int]] | None:
    """(begin, end) character span in `u.text` of each word of `u.words`, or None if they can't
    all be found in order."""
    spans, cursor = [], 0
    for w in u.words:
        token = w.text.strip()
        at = u.text.find(token, cursor) if token else -1
        if at < 0:
            return None
        spans.append((at, at + len(token)))
        cursor = at + len(token)
    return spans


def cut_candidates(u: Utterance, pauses: list[tuple[float, float]] = ()) -> list[tuple[float, int, float]]:
    """Where `u` may be cut: (time, character index of the text cut, pause length), in time order.

    The character index always falls on a space, so no word is ever split."""
    text, n = u.text, len(u.text)
    spans = _word_spans(u) if u.words else None
    out: list[tuple[float, int, float]] = []
    if spans is not None and len(u.words) > 1:
        for i in range(len(u.words) - 1):
            a, b = u.words[i], u.words[i + 1]
            char = spans[i + 1][0]
            if " " not in text[spans[i][1] : char]:
                continue  # words not separated by a space in the text: not a word boundary
            t = (a.end + b.start) / 2
            if u.start < t < u.end:
                out.append((t, char, max(0.0, b.start - a.end)))
        return out
    spaces = [i for i, c in enumerate(text) if c == " "]
    if not spaces or n == 0:
        return out
    d = u.duration

    def nearest_space(t: float) -> int:
        target = n * (t - u.start) / d
        return min(spaces, key=lambda i: abs(i - target))

    # VAD pauses inside the utterance: cut in their middle; text at the proportional space.
    for a, b in pauses:
        if a > u.start and b < u.end:
            t = (a + b) / 2
            out.append((t, nearest_space(t), b - a))
    # Every space, at its proportional time (an estimate without word timestamps).
    for i in spaces:
        t = u.start + d * (i + 0.5) / n
        if u.start < t < u.end:
            out.append((t, i, 0.0))
    return sorted(out)


def _piece(u: Utterance, start: float, end: float, c0: int, c1: int) -> Utterance:
    d = max(u.duration, 1e-9)
    return dataclasses.replace(
        u,
        start=start,
        end=end,
        text=u.text[c0:c1].strip(),
        words=[w for w in u.words if start <= (w.start + w.end) / 2 < end],
        overlap=u.overlap * (end - start) / d,  # prorated: an estimate
        frames=None,
        custom={**u.custom, "split_from": [u.start, u.end]},
    )


def split_to_budget(u: Utterance, config: WindowsConfig, pauses: list[tuple[float, float]] = ()) -> list[Utterance] | None:
    """`u` itself when it fits the budget, else consecutive pieces that each fit, cut at pauses or
    word boundaries (see the module doc); None when no such split exists."""
    if positions(u, config) <= config.max_positions:
        return [u]
    cands = cut_candidates(u, pauses)
    pieces: list[Utterance] = []
    t0, c0 = u.start, 0
    while not _fits(u.text[c0:].strip(), u.speaker, u.end - t0, config):
        feasible = [
            (t, c, p) for t, c, p in cands
            if t > t0 and c > c0 and u.text[c0:c].strip() and _fits(u.text[c0:c].strip(), u.speaker, t - t0, config)
        ]
        if not feasible:
            return None
        latest = max(t for t, _, _ in feasible)
        # The longest pause in the later half of what fits (no tiny pieces); ties: the later cut.
        t, c, _ = max((x for x in feasible if x[0] >= t0 + 0.5 * (latest - t0)), key=lambda x: (x[2], x[0]))
        pieces.append(_piece(u, t0, t, c0, c))
        t0, c0 = t, c
    pieces.append(_piece(u, t0, u.end, c0, len(u.text)))
    return pieces


class WindowsStage(Stage):
    name = "windows"

    def process(self, chunk: Chunk) -> Chunk:
        sid, cfg = chunk.recording.id, self.config
        utts: list[Utterance] = []
        speech = sorted((r.start, r.end) for r in chunk.speech)
        pauses = [(a[1], b[0]) for a, b in zip(speech, speech[1:]) if b[0] > a[1]]
        for u in chunk.utterances:
            if cfg.split_long:
                pieces = split_to_budget(u, cfg, pauses)
            else:
                pieces = [u] if positions(u, cfg) <= cfg.max_positions else None
            if pieces is None:
                chunk.rejected.append(Rejection(sid, self.name, "utterance_over_budget", u.start, u.end, positions(u, cfg), level="utterance"))
                continue
            self.counters["utterances_split"] += len(pieces) > 1
            utts.extend(pieces)
        groups, too_long = group_windows(utts, cfg)
        for u in too_long:
            chunk.rejected.append(Rejection(sid, self.name, "utterance_over_budget", u.start, u.end, positions(u, cfg), level="utterance"))
        chunk.windows = []
        for group in groups:
            start, end = group[0].start, max(u.end for u in group)
            if len(group) < cfg.min_utterances:
                chunk.rejected.append(Rejection(sid, self.name, "too_few_utterances", start, end, len(group)))
                continue
            if group[-1].end - group[0].start < cfg.min_seconds:
                chunk.rejected.append(Rejection(sid, self.name, "window_too_short", start, end, group[-1].end - group[0].start))
                continue
            speakers = len({u.speaker for u in group})
            if speakers < 2 and not cfg.keep_single_speaker:
                chunk.rejected.append(Rejection(sid, self.name, "single_speaker", start, end, speakers))
                continue
            chunk.windows.append(Window(len(chunk.windows), group))
        if not chunk.windows:
            chunk.reject(self.name, "no_windows")
        return chunk
