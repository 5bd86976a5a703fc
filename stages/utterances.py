"""utterances: speaker-attributed utterances cut at pauses.

Two halves: `plan_units` decides what Whisper transcribes (VAD regions cut at pauses, split where
the speaker changes, or each channel's regions when channels are speakers), and the stage turns the
transcribed units into utterances: speaker by most overlap with the diarization turns, overlapped
speech measured, same-speaker neighbours merged up to a maximum length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.base import Stage
from stages.intervals import union
from stages.records import AsrSegment, Chunk, Region, Rejection, Turn, Utterance

_STEP = 0.02  # seconds: resolution for finding speaker changes inside a region


@dataclass
class UtterancesConfig:
    merge_gap: float = 0.5  # same speaker, pause at most this long: one utterance
    max_seconds: float = 20.0  # never merge beyond this (Mimi frames per utterance stay bounded)
    min_piece: float = 0.5  # speaker-change splits shorter than this are absorbed by a neighbour


def split_at_turns(region: Region, turns: list[Turn], min_piece: float) -> list[Region]:
    """Split a speech region where the dominant speaker changes."""
    inside = [t for t in turns if t.end > region.start and t.start < region.end]
    if len({t.speaker for t in inside}) < 2:
        return [region]
    grid = np.arange(region.start, region.end, _STEP) + _STEP / 2
    labels = np.full(len(grid), -1)
    # Longer turns first, shorter (interjections) last so they win where turns overlap.
    for i, t in sorted(enumerate(inside), key=lambda it: -(it[1].end - it[1].start)):
        labels[(grid >= t.start) & (grid < t.end)] = i
    # Gaps between turns inherit the previous speaker.
    for k in range(1, len(labels)):
        if labels[k] < 0:
            labels[k] = labels[k - 1]
    speakers = np.array([inside[i].speaker if i >= 0 else "" for i in labels])
    cuts = [0] + [k for k in range(1, len(speakers)) if speakers[k] != speakers[k - 1]] + [len(speakers)]
    pieces = [[cuts[j], cuts[j + 1]] for j in range(len(cuts) - 1)]
    min_steps = int(min_piece / _STEP)
    merged: list[list[int]] = []
    for p in pieces:
        if merged and (p[1] - p[0] < min_steps or merged[-1][1] - merged[-1][0] < min_steps):
            merged[-1][1] = p[1]
        else:
            merged.append(p)
    bounds = [region.start + a * _STEP for a, _ in merged] + [region.end]
    return [Region(bounds[j], bounds[j + 1]) for j in range(len(merged))]


def plan_units(chunk: Chunk, config: UtterancesConfig) -> list[tuple[Region, int | None]]:
    """What to transcribe: (region, channel) pairs in time order; channel None means the mono mix.

    VAD regions are split where the speaker changes, then neighbours of the same speaker and
    channel with short pauses are joined (up to `max_seconds`): one Whisper window per utterance
    rather than per breath, which is both the utterance we keep and a fraction of the encoder work.
    """
    if chunk.speaker_mode == "channels":
        units = [(r, c) for c, regions in enumerate(chunk.channel_speech) for r in regions]
    else:
        units = [(p, None) for r in chunk.speech for p in split_at_turns(r, chunk.turns, config.min_piece)]
    units.sort(key=lambda u: (u[0].start, u[1] or 0))
    merged: list[tuple[Region, int | None, str | None]] = []
    last: dict[int | None, int] = {}  # channel -> index of its latest unit
    for region, channel in units:
        speaker = assign_speaker(region.start, region.end, chunk.turns)[0] if channel is None else None
        i = last.get(channel)
        # On the mono mix only the directly preceding unit can continue; on separate channels the
        # other side's backchannel ("yes") does not end this side's utterance.
        if i is not None and (channel is not None or i == len(merged) - 1):
            prev, _, prev_speaker = merged[i]
            if prev_speaker == speaker and 0 <= region.start - prev.end <= config.merge_gap and region.end - prev.start <= config.max_seconds:
                merged[i] = (Region(prev.start, region.end), channel, speaker)
                continue
        last[channel] = len(merged)
        merged.append((region, channel, speaker))
    return [(r, c) for r, c, _ in merged]


def assign_speaker(start: float, end: float, turns: list[Turn]) -> tuple[str | None, float]:
    """Speaker who talks longest within [start, end) (ties: the smaller label), and the seconds of
    [start, end) during which two or more speakers talk at once. (None, 0.0) when nobody does."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for t in turns:
        if t.end > start and t.start < end:
            spans.setdefault(t.speaker, []).append((max(start, t.start), min(end, t.end)))
    if not spans:
        return None, 0.0
    merged = {spk: union(s) for spk, s in spans.items()}  # a speaker's own overlapping turns count once
    talk = {spk: sum(b - a for a, b in s) for spk, s in merged.items()}
    return max(sorted(talk), key=talk.get), overlapped_seconds(merged)


def overlapped_seconds(merged: dict[str, list[tuple[float, float]]]) -> float:
    """Time covered by the disjoint spans of at least two different speakers."""
    events = sorted((t, d) for spans in merged.values() for a, b in spans for t, d in ((a, 1), (b, -1)))
    total, active, prev = 0.0, 0, 0.0
    for t, delta in events:  # ends sort before starts at one instant: touching spans don't overlap
        if active >= 2:
            total += t - prev
        active, prev = active + delta, t
    return total


def to_utterance(seg: AsrSegment, chunk: Chunk) -> Utterance:
    if chunk.speaker_mode == "channels" or not chunk.turns:
        # Without diarization each channel is one speaker, and the label says so.
        speaker, overlap = f"channel{seg.channel}", 0.0
        if chunk.speaker_mode == "channels":
            # diarize names each channel's speaker: {label: channel}
            by_channel = {ch: label for label, ch in chunk.channel_speakers.items()}
            speaker = by_channel.get(seg.channel, speaker)
            overlap = assign_speaker(seg.start, seg.end, chunk.turns)[1]
    else:
        speaker, overlap = assign_speaker(seg.start, seg.end, chunk.turns)
        speaker = speaker or "unknown"
    return Utterance(
        speaker, seg.start, seg.end, seg.text, seg.channel, seg.language,
        seg.avg_logprob, seg.no_speech_prob, list(seg.words), overlap, seg.language_prob,
    )


def merge_utterances(utts: list[Utterance], config: UtterancesConfig) -> list[Utterance]:
    out: list[Utterance] = []
    for u in utts:
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.speaker == u.speaker
            and prev.channel == u.channel
            and 0 <= u.start - prev.end <= config.merge_gap
            and u.end - prev.start <= config.max_seconds
        ):
            # Duration-weighted confidence of the merged text.
            w0, w1 = prev.duration, u.duration
            prev.avg_logprob = (prev.avg_logprob * w0 + u.avg_logprob * w1) / (w0 + w1)
            prev.no_speech_prob = max(prev.no_speech_prob, u.no_speech_prob)
            prev.text = f"{prev.text} {u.text}".strip()
            prev.end, prev.overlap = u.end, prev.overlap + u.overlap
            prev.words.extend(u.words)
        else:
            out.append(u)
    return out


class UtterancesStage(Stage):
    name = "utterances"

    def process(self, chunk: Chunk) -> Chunk:
        utts = []
        for seg in chunk.segments:
            if not seg.text:
                chunk.rejected.append(
                    Rejection(chunk.recording.id, self.name, "empty_transcript", seg.start, seg.end, level="utterance")
                )
                continue
            utts.append(to_utterance(seg, chunk))
        chunk.utterances = merge_utterances(utts, self.config)
        return chunk

