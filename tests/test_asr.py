"""ASR on context windows, timed words and speakers per word: against plain whisperx on pyannote's
sample, and on synthetic conversations whose turns are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from stages.asr import AsrConfig, AsrStage, plan_windows, snap_to_speech, wer
from stages.records import AsrSegment, Chunk, Recording, Region, Turn, Word
from stages.utterances import UtterancesConfig, UtterancesStage
from conftest_audio import SCRIPT, SCRIPT_BACKCHANNEL, VOICE_A, VOICE_B, conversation, have_espeak

needs_espeak = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")


@pytest.fixture(scope="module")
def asr():
    stage = AsrStage(AsrConfig(cpus=1))
    stage.setup()
    return stage


def chunk_of(audio: np.ndarray, speech: list[tuple[float, float]], turns: list[Turn], rid: str = "conv") -> Chunk:
    mono = np.ascontiguousarray(audio, dtype=np.float32)
    chunk = Chunk(Recording(rid, f"{rid}.wav", len(mono) / 16000, 16000, 1), 0, 0.0, True, mono[None])
    chunk.speech = [Region(a, b) for a, b in speech]
    chunk.turns, chunk.speaker_mode = turns, "diarization"
    return chunk


def transcribe(asr, chunk: Chunk, config: UtterancesConfig | None = None) -> Chunk:
    (chunk,) = asr.process_batch([chunk])
    assert not chunk.failed, chunk.errors
    (chunk,) = UtterancesStage(config or UtterancesConfig()).process_batch([chunk])
    return chunk


# --- pure functions ---------------------------------------------------------------------------

def test_windows_hold_every_region_once_and_cut_at_the_longest_pause():
    regions = [Region(0, 4), Region(4.3, 12), Region(14, 16), Region(16.2, 18), Region(18.4, 25), Region(25.1, 31)]
    windows = plan_windows(regions, 20.0)
    assert all(w.duration <= 20.0 for w in windows)
    for r in regions:  # each region inside exactly one window
        assert sum(w.start <= r.start and r.end <= w.end for w in windows) == 1
    # The first window cannot take 18.4..25: it is cut at its longest pause (12..14), not just before 18.4.
    assert [(w.start, w.end) for w in windows] == [(0, 12), (14, 31)]
    # A long pause that would leave the window under half full is passed over for a shorter one.
    assert plan_windows([Region(0, 4), Region(6, 12), Region(12.3, 21)], 20.0)[0].end == 12
    long = plan_windows([Region(0, 50)], 20.0)  # a region longer than a window: equal parts
    assert [(w.start, w.end) for w in long] == [(0, pytest.approx(50 / 3)), (pytest.approx(50 / 3), pytest.approx(100 / 3)), (pytest.approx(100 / 3), 50)]


def test_word_times_fit_the_speech_they_fall_in():
    words = [Word("over", 0.8, 1.6), Word("the", 1.7, 1.8), Word("next", 2.9, 3.0)]
    snap_to_speech(words, [(1.2, 2.0), (2.5, 4.0)], reach=1.0)
    assert (words[0].start, words[0].end) == (1.2, 1.6)  # trimmed off the pause before it
    assert words[1].end == 2.0  # last word of its region reaches the region's end
    assert (words[2].start, words[2].end) == (2.5, 4.0)  # a squeezed lone word gets its region


def _segment(words, language_prob=None, channel=0):
    text = " ".join(w.text for w in words)
    return AsrSegment(words[0].start, words[-1].end, text, "en", -0.2, 0.01, channel, words, language_prob)


def test_long_speech_is_cut_on_word_boundaries_and_nothing_is_lost():
    words = [Word(f"w{i}", i * 0.5, i * 0.5 + 0.4) for i in range(40)]  # 20 s of one speaker, 0.1 s pauses
    chunk = chunk_of(np.zeros(16000 * 21, np.float32), [(0, 20)], [Turn(0, 20, "S0")])
    chunk.segments = [_segment(words)]
    (chunk,) = UtterancesStage(UtterancesConfig(max_seconds=6.0)).process_batch([chunk])
    utts = chunk.utterances
    assert len(utts) == 4 and " ".join(u.text for u in utts) == " ".join(w.text for w in words)
    for u in utts:
        assert u.end - u.start <= 6.0 + 2 * UtterancesConfig().pad
        assert u.words[0].start >= u.start and u.words[-1].end <= u.end
        assert u.text == " ".join(w.text for w in u.words)  # cut between words, never inside one
    assert all(a.end <= b.start for a, b in zip(utts, utts[1:]))  # padding never overlaps a neighbour


def test_language_probability_reaches_the_language_filter():
    from pipeline.config import PipelineConfig
    from stages.chain import build_stages

    words = [Word("hola", 1.0, 1.4), Word("amigo", 1.5, 2.0)]
    other = [Word("hello", 3.0, 3.4), Word("friend", 3.5, 4.0)]
    chunk = chunk_of(0.1 * np.random.default_rng(0).standard_normal(16000 * 5).astype(np.float32), [(0.9, 4.1)],
                     [Turn(0.9, 4.1, "S0")])
    chunk.segments = [_segment(words, language_prob=0.2), _segment(other, language_prob=0.97)]
    stages = {s.name: s for s in build_stages(PipelineConfig())}
    (chunk,) = stages["utterances"].process_batch([chunk])
    assert [u.language_prob for u in chunk.utterances] == [0.2, 0.97]
    (chunk,) = stages["filter_utterances"].process_batch([chunk])
    rejected = [r for r in chunk.rejected if r.reason == "language"]
    assert len(rejected) == 1 and rejected[0].metric == pytest.approx(0.2)
    assert [u.text for u in chunk.utterances] == ["hello friend"]


# --- real Whisper -----------------------------------------------------------------------------

@pytest.mark.slow
def test_kept_transcripts_as_good_as_plain_whisperx_on_the_sample(sample_wav, sample_stm):
    """The chain up to the window filters against `whisperx.load_model(...).transcribe(audio)` on the
    whole file, same packaged model, scored with Whisper's English normalizer."""
    import soundfile as sf
    import torch
    import whisperx

    from pipeline.config import PipelineConfig
    from stages.chain import build_stages
    from stages.asr import DEFAULT_MODEL, resolve_model
    from stages.decode import decode_chunks

    torch.set_num_threads(1)
    ref = " ".join(t for *_, t in sample_stm)
    audio, _ = sf.read(sample_wav, dtype="float32")
    model = whisperx.load_model(resolve_model(DEFAULT_MODEL), "cpu", compute_type="int8", language="en", threads=1)
    plain = wer(ref, " ".join(s["text"] for s in model.transcribe(audio, batch_size=8)["segments"]))

    config = PipelineConfig()
    batch = list(decode_chunks(str(sample_wav), config.decode))
    for stage in build_stages(config):
        if stage.name in ("tokenize", "write"):
            break
        batch = stage.process_batch(batch)
    utts = [u for c in batch for w in c.windows for u in w.utterances]
    ours = wer(ref, " ".join(u.text for u in utts))
    assert ours <= plain + 0.01, (ours, plain)
    # Every kept utterance carries its words, timed in order and inside it.
    assert utts and all(u.words for u in utts)
    for u in utts:
        assert all(u.start <= w.start <= w.end <= u.end for w in u.words), u
        assert all(a.start <= b.start for a, b in zip(u.words, u.words[1:])), u


@pytest.mark.slow
@needs_espeak
def test_a_turn_change_inside_one_window_puts_each_word_on_its_speaker(asr):
    conv = conversation(SCRIPT[:4], (VOICE_A, VOICE_B), gap=0.5)
    turns = [Turn(s, e, f"S{k}") for s, e, k in conv.turns]
    chunk = transcribe(asr, chunk_of(conv.mono, [(s, e) for s, e, _ in conv.turns], turns))
    assert len(chunk.segments) == 1  # one Whisper window heard all four turns
    words = [(w, u.speaker) for u in chunk.utterances for w in u.words]
    right = sum(any(t.start <= (w.start + w.end) / 2 < t.end and t.speaker == spk for t in turns) for w, spk in words)
    assert right / len(words) >= 0.95, [(w.text, w.start, spk) for w, spk in words]
    assert [u.speaker for u in chunk.utterances] == ["S0", "S1", "S0", "S1"]
    lines = [line for _, line in SCRIPT[:4]]
    for k, u in enumerate(chunk.utterances):  # each utterance's text is its own line's, not a neighbour's
        assert min(range(4), key=lambda j: wer(lines[j], u.text)) == k, (lines[k], u.text)


@pytest.mark.slow
@needs_espeak
def test_a_backchannel_in_a_pause_is_the_other_speakers_own_utterance(asr):
    conv = conversation(SCRIPT_BACKCHANNEL, (VOICE_A, VOICE_B), gap=0.5)  # A ... "Yeah" ... A ... "Right" ...
    turns = [Turn(s, e, f"S{k}") for s, e, k in conv.turns]
    chunk = transcribe(asr, chunk_of(conv.mono, [(s, e) for s, e, _ in conv.turns], turns))
    got = [(u.speaker, u.text.strip(".,!? ").lower()) for u in chunk.utterances]
    assert [spk for spk, _ in got] == [f"S{k}" for k, _ in SCRIPT_BACKCHANNEL], got  # one utterance per turn
    one_word = [(i, u) for i, u in enumerate(chunk.utterances) if len(SCRIPT_BACKCHANNEL[i][1].split()) == 1]
    assert [got[i][1] for i, _ in one_word] == [SCRIPT_BACKCHANNEL[i][1].lower() for i, _ in one_word]
    for i, u in one_word:  # its own time, inside the other speaker's pause
        s, e, _ = conv.turns[i]
        assert u.start <= (s + e) / 2 <= u.end and u.start > conv.turns[i - 1][1] - 0.2
