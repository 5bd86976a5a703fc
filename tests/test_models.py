"""The model stages on real audio: silero VAD and Whisper tiny.en on pyannote's sample, and Mimi."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from stages.decode import DecodeConfig, decode_chunks
from stages.tokenize import CodecUnavailable, TokenizeConfig, encode_batch, load_mimi, use_whole_clip_encoder


@pytest.fixture(scope="module")
def sample_chunk(sample_wav):
    (chunk,) = decode_chunks(str(sample_wav), DecodeConfig())
    return chunk


def _covered(regions, t: float) -> bool:
    return any(a <= t < b for a, b in regions)


def test_vad_regions_match_reference_speech(sample_chunk, sample_rttm):
    from stages.vad import VadConfig, VadStage

    stage = VadStage(VadConfig())
    (chunk,) = stage.process_batch([sample_chunk])
    found = [(r.start, r.end) for r in chunk.speech]
    ref = [(a, b) for a, b, _ in sample_rttm]
    grid = np.arange(0, 30, 0.05)
    hyp_on = np.array([_covered(found, t) for t in grid])
    ref_on = np.array([_covered(ref, t) for t in grid])
    precision = (hyp_on & ref_on).sum() / hyp_on.sum()
    recall = (hyp_on & ref_on).sum() / ref_on.sum()
    assert precision > 0.85 and recall > 0.85, (precision, recall)
    assert all(0 <= r.start < r.end <= 30.0 for r in chunk.speech)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_asr_transcript_shares_most_words_with_reference(sample_chunk, sample_stm):
    from stages.asr import AsrConfig, AsrStage
    from stages.vad import VadConfig, VadStage

    chunks = VadStage(VadConfig()).process_batch([sample_chunk])
    stage = AsrStage(AsrConfig())
    (chunk,) = stage.process_batch(chunks)
    assert not chunk.failed, chunk.errors
    hyp = _words(" ".join(s.text for s in chunk.segments))
    ref = _words(" ".join(t for *_, t in sample_stm))
    common = sum(min(hyp.count(w), ref.count(w)) for w in set(ref))
    assert common / len(ref) > 0.7, (common, len(ref), hyp)
    for seg in chunk.segments:
        assert seg.language == "en"
        assert -3.0 < seg.avg_logprob <= 0.0
        assert 0.0 <= seg.no_speech_prob <= 1.0
    # Segment times are VAD boundaries: a unit starts where a speech region starts and ends where
    # one ends (neighbouring regions separated by short pauses are joined into one unit).
    starts, ends = {round(r.start, 6) for r in chunk.speech}, {round(r.end, 6) for r in chunk.speech}
    assert all(round(s.start, 6) in starts and round(s.end, 6) in ends for s in chunk.segments)
    assert all(b.start - a.end > stage.units.merge_gap for a, b in zip(chunk.segments, chunk.segments[1:]) if b.end - a.start <= stage.units.max_seconds)


def test_whisper_windows_shorter_than_30s_transcribe_as_well(sample_chunk, sample_stm):
    """Units get a 15 s encoder window when they fit (unit + 1 s): the words must be as good as with
    Whisper's full 30 s window, and every input length a multiple of the step, at most 30 s."""
    from stages.asr import AsrConfig, AsrStage, window_samples, word_errors
    from stages.filters import words_of
    from stages.vad import VadConfig, VadStage

    rate = 16000
    assert window_samples(3 * rate, 15.0) == 15 * rate and window_samples(int(14.5 * rate), 15.0) == 30 * rate
    assert all(window_samples(n, 30.0) == 30 * rate for n in (1, rate, 29 * rate))
    (vad_chunk,) = VadStage(VadConfig()).process_batch([sample_chunk])
    ref = " ".join(t for *_, t in sample_stm)
    errors = {}
    for step in (30.0, 15.0):
        (chunk,) = AsrStage(AsrConfig(window_step=step)).process_batch([vad_chunk])  # sets chunk.segments anew
        errors[step] = word_errors(ref, " ".join(s.text for s in chunk.segments)) / len(words_of(ref))
    assert errors[15.0] <= errors[30.0] + 0.05, errors


@pytest.fixture(scope="module")
def mimi():
    model, identity = load_mimi(TokenizeConfig(allow_unreleased=True), "cpu")
    return model, identity


def test_unreleased_mimi_is_refused_unless_allowed():
    with pytest.raises(CodecUnavailable, match="tokenize.weights"):
        load_mimi(TokenizeConfig(allow_unreleased=False), "cpu")


def test_mimi_codes_shape_and_content(mimi, sample_chunk):
    model, identity = mimi
    assert identity["released"] is False and "random-init" in identity["weights"]
    a = sample_chunk.audio24k
    clips = [a[24000 * 7 : 24000 * 9], a[24000 * 10 : 24000 * 14 + 777], a[24000 * 20 : 24000 * 20 + 1000]]
    codes = encode_batch(model, clips, "cpu")
    for clip, c in zip(clips, codes):
        assert c.dtype == np.int16 and c.shape == (32, math.ceil(len(clip) / 1920))
        assert 0 <= c.min() and c.max() < 2048
    # Codes follow the audio: many distinct codes, different clips give different codes.
    assert len(np.unique(codes[1][0])) > 5
    assert not np.array_equal(codes[0][:, :10], codes[1][:, :10])
    # End padding in a batch does not change an utterance's own frames (causal encoder).
    for clip, c in zip(clips, codes):
        np.testing.assert_array_equal(encode_batch(model, [clip], "cpu")[0], c)


def test_whole_clip_encoder_gives_moshis_codes(mimi, sample_chunk):
    import copy

    model, _ = mimi
    fast = use_whole_clip_encoder(copy.deepcopy(model))
    assert fast.encoder.forward is not model.encoder.forward  # really the other path
    a = sample_chunk.audio24k
    clips = [a[24000 * 3 : 24000 * 6 + 123], a[24000 * 12 : 24000 * 13], a[24000 * 21 : 24000 * 21 + 4000]]
    for ours, moshis in zip(encode_batch(fast, clips, "cpu"), encode_batch(model, clips, "cpu")):
        np.testing.assert_array_equal(ours, moshis)
