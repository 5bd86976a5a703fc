"""utterances: speaker-attributed utterances built from timed words.

ASR hands over context windows of transcribed speech with a time per word. Here each word goes to
the speaker who talks most during it (overlap-aware; a word no turn touches goes to the nearest
turn), and an utterance is a run of one speaker's words, cut where the speaker changes, at a pause
longer than `max_pause`, and before it would exceed `max_seconds` (always on a word boundary). Its
start and end follow its first and last word, padded by `pad` but never past the middle of the pause
to a neighbouring utterance,
so Mimi encodes whole words. A one-word backchannel in the other speaker's pause is its own
utterance. With channels as speakers (`chunk.speaker_mode == "channels"`), each channel's words
belong to that channel's speaker and runs are built per channel.

A window whose text has no word times (timing disabled, or alignment failed) becomes one
utterance over the window, attributed by most overlap and marked `custom["untimed"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.base import Stage
from stages.intervals import subtract, union
from stages.overrides import require
from stages.records import AsrSegment, Chunk, Rejection, Turn, Utterance, Word


@dataclass(frozen=True)
class UtterancesConfig:
    max_pause: float = 0.5  # a longer pause between one speaker's words ends the utterance
    max_seconds: float = 20.0  # an utterance never grows beyond this (Mimi frames per utterance stay bounded)
    pad: float = 0.1  # seconds of audio kept before the first and after the last word

    def __post_init__(self):
        require(self.max_pause >= 0, "max_pause", f"must be >= 0, got {self.max_pause}")
        require(self.max_seconds > 0, "max_seconds", f"must be > 0, got {self.max_seconds}")
        require(self.pad >= 0, "pad", f"must be >= 0, got {self.pad}")


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


def word_speaker(w: Word, turns: list[Turn]) -> str | None:
    """Who says `w`: most talk during it, else the turn nearest to it (diarization often leaves
    short gaps that a word's edges fall into)."""
    speaker, _ = assign_speaker(w.start, w.end, turns)
    if speaker is None and turns:
        mid = (w.start + w.end) / 2
        speaker = min(turns, key=lambda t: (max(t.start - mid, mid - t.end, 0.0), t.speaker)).speaker
    return speaker


@dataclass
class _Spoken:
    """A word with who said it and the window it came from."""

    word: Word
    speaker: str
    segment: AsrSegment


@dataclass
class _Run:
    items: list[_Spoken] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.items[0].word.start

    @property
    def end(self) -> float:
        return self.items[-1].word.end


def runs_of_words(spoken: list[_Spoken], config: UtterancesConfig) -> list[_Run]:
    """Consecutive words of one speaker, cut at speaker changes, long pauses and the length limit."""
    runs: list[_Run] = []
    for s in spoken:
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.items[-1].speaker == s.speaker
            and s.word.start - last.end <= config.max_pause
            and s.word.end - last.start <= config.max_seconds
        ):
            last.items.append(s)
        else:
            runs.append(_Run([s]))
    return runs


def to_utterance(run: _Run, lo: float, hi: float, turns: list[Turn]) -> Utterance:
    """The utterance of a run of words, its edges padded to [lo, hi] (the neighbouring words)."""
    from stages.asr import NO_SPACE_LANGUAGES

    segs = list({id(s.segment): s.segment for s in run.items}.values())
    first = segs[0]
    words = [s.word for s in run.items]
    joiner = "" if first.language in NO_SPACE_LANGUAGES else " "
    spans = [w.end - w.start for w in words]
    weights = [sum(d for d, s in zip(spans, run.items) if s.segment is seg) or 1e-3 for seg in segs]
    overlap = assign_speaker(lo, hi, turns)[1] if turns else 0.0
    return Utterance(
        run.items[0].speaker, lo, hi, joiner.join(w.text for w in words).strip(), first.channel, first.language,
        sum(seg.avg_logprob * wt for seg, wt in zip(segs, weights)) / sum(weights),
        max(seg.no_speech_prob for seg in segs), words, overlap,
        None if any(seg.language_prob is None for seg in segs) else min(seg.language_prob for seg in segs),
    )


def stream_utterances(segments: list[AsrSegment], speaker_of, turns: list[Turn], config: UtterancesConfig,
                      lo: float, hi: float) -> list[Utterance]:
    """Utterances of one stream (the mono mix, or one channel) from its windows' timed words."""
    spoken = [_Spoken(w, speaker_of(w), seg) for seg in segments for w in seg.words]
    spoken.sort(key=lambda s: (s.word.start, s.word.end))
    runs = runs_of_words(spoken, config)
    out = []
    for k, run in enumerate(runs):
        # pad into a pause at most up to its middle: neighbours never share audio
        before = (runs[k - 1].end + run.start) / 2 if k else lo
        after = (run.end + runs[k + 1].start) / 2 if k + 1 < len(runs) else hi
        start = max(before, lo, run.start - config.pad)
        end = min(after, hi, run.end + config.pad)
        out.append(to_utterance(run, min(start, run.start), max(end, run.end), turns))
    return out


def untimed_utterance(seg: AsrSegment, speaker: str, turns: list[Turn]) -> Utterance:
    overlap = assign_speaker(seg.start, seg.end, turns)[1] if turns else 0.0
    return Utterance(speaker, seg.start, seg.end, seg.text, seg.channel, seg.language, seg.avg_logprob,
                     seg.no_speech_prob, [], overlap, seg.language_prob, custom={"untimed": True})


class UtterancesStage(Stage):
    name = "utterances"

    def process(self, chunk: Chunk) -> Chunk:
        channel_mode = chunk.speaker_mode == "channels"
        by_channel = {ch: label for label, ch in chunk.channel_speakers.items()}
        streams: dict[int, list[AsrSegment]] = {}
        utts: list[Utterance] = []
        for seg in chunk.segments:
            if not seg.text:
                chunk.rejected.append(
                    Rejection(chunk.recording.id, self.name, "empty_transcript", seg.start, seg.end, level="utterance")
                )
            elif seg.words:
                streams.setdefault(seg.channel if channel_mode else 0, []).append(seg)
            else:
                speaker = by_channel.get(seg.channel, f"channel{seg.channel}") if channel_mode else (
                    assign_speaker(seg.start, seg.end, chunk.turns)[0] or _nobody(chunk))
                utts.append(untimed_utterance(seg, speaker, chunk.turns))
        for channel, segs in streams.items():
            if channel_mode:
                label = by_channel.get(channel, f"channel{channel}")
                speaker_of = lambda w, label=label: label  # noqa: E731
            else:
                speaker_of = lambda w: word_speaker(w, chunk.turns) or _nobody(chunk)  # noqa: E731
            utts += stream_utterances(segs, speaker_of, chunk.turns, self.config, chunk.offset, chunk.end)
        chunk.utterances = sorted(utts, key=lambda u: (u.start, u.channel))
        # Speech no utterance holds (Whisper heard no word there, or its words fell elsewhere) is
        # dropped on purpose too: recorded, so every second of input has a record.
        heard = union([(r.start, r.end) for r in chunk.speech] + [(r.start, r.end) for ch in chunk.channel_speech for r in ch])
        for a, b in subtract(heard, union([(u.start, u.end) for u in utts])):
            chunk.rejected.append(Rejection(chunk.recording.id, self.name, "untranscribed", a, b, level="region"))
        return chunk


def _nobody(chunk: Chunk) -> str:
    """Label when no turn exists at all (no diarization): one speaker per channel, as before."""
    return "unknown" if chunk.turns else "channel0"
