"""windows: consecutive utterances of one source grouped into CSM training samples.

The budget counts what the model sees (reference.md section 1): the text rows of
`[{speaker}]{text}` with BOS/EOS, the utterance's Mimi frames, and one end-of-audio frame per
utterance. The default of 2048 positions is CSM's context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.base import Stage
from stages.records import Chunk, Rejection, Utterance, Window

FRAME_RATE = 12.5  # Mimi frames per second


@dataclass
class WindowsConfig:
    max_positions: int = 2048  # text tokens + audio frames + end-of-audio frames
    chars_per_token: float = 3.5  # estimate for the Llama-3 tokenizer on English
    max_gap_seconds: float = 10.0  # a longer silence starts a new window (a different exchange)
    min_utterances: int = 1


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


class WindowsStage(Stage):
    name = "windows"

    def process(self, chunk: Chunk) -> Chunk:
        groups, too_long = group_windows(chunk.utterances, self.config)
        sid = chunk.recording.id
        for u in too_long:
            chunk.rejected.append(Rejection(sid, self.name, "utterance_over_budget", u.start, u.end, positions(u, self.config), level="utterance"))
        chunk.windows = []
        for group in groups:
            if len(group) < self.config.min_utterances:
                chunk.rejected.append(Rejection(sid, self.name, "too_few_utterances", group[0].start, group[-1].end, len(group)))
                continue
            chunk.windows.append(Window(len(chunk.windows), group))
        if not chunk.windows:
            chunk.reject(self.name, "no_windows")
        return chunk
