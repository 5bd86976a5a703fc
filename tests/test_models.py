"""The model stages on real audio: silero VAD on pyannote's sample, and Mimi (Whisper: test_asr.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.decode import DecodeConfig, decode_chunks
from stages.tokenize import MIMI_FILE, MIMI_REPO, CodecUnavailable, TokenizeConfig, encode_batch, load_mimi, use_whole_clip_encoder


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


def test_vad_regions_are_silero_get_speech_timestamps_own(sample_chunk):
    """Our frame loop against silero's own `get_speech_timestamps` on the same packaged model: the
    same regions to the sample, on audio whose length is no multiple of a frame."""
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    from stages.vad import VadConfig, speech_regions

    audio = np.concatenate([sample_chunk.mono16k, sample_chunk.mono16k[: 16000 * 7 + 301] * 0.5])
    config, model = VadConfig(min_silence_ms=100), load_silero_vad(onnx=True)
    theirs = get_speech_timestamps(torch.from_numpy(audio), model, threshold=config.threshold, sampling_rate=16000,
                                   min_speech_duration_ms=config.min_speech_ms, min_silence_duration_ms=config.min_silence_ms,
                                   speech_pad_ms=config.speech_pad_ms, max_speech_duration_s=config.max_speech_seconds)
    ours = speech_regions(model, audio, config, offset=2.0)
    assert len(theirs) >= 4
    flat = [x for r in ours for x in (r.start - 2.0, r.end - 2.0)]
    assert flat == pytest.approx([t[k] / 16000 for t in theirs for k in ("start", "end")], abs=1e-9)


@pytest.fixture(scope="module")
def mimi():
    model, identity = load_mimi(TokenizeConfig(allow_unreleased=True), "cpu")
    return model, identity


def test_mimi_hub_names_are_moshis():
    from moshi.models import loaders

    assert (MIMI_REPO, MIMI_FILE) == (loaders.DEFAULT_REPO, loaders.MIMI_NAME)


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


@pytest.mark.parametrize("tile_seconds", [1.0, 0.32])
def test_tiled_encoder_carries_each_convs_context_across_tiles(mimi, sample_chunk, tile_seconds):
    """Long clips go through the encoder in tiles (WholeClipEncoder): every conv must see the end of
    the tile before, not zeros. The latent is moshi's to float rounding (other oneDNN groupings of
    the same sums) and the codes agree; with zeros for context at each tile the latent is off by up to 0.07."""
    import copy

    import torch

    model, _ = mimi
    tiled = use_whole_clip_encoder(copy.deepcopy(model), tile_seconds=tile_seconds)
    a = sample_chunk.audio24k
    clips = [a[: 24000 * 25 + 777], a[24000 * 3 : 24000 * 6 + 123]]  # 26 and 4 tiles of 1 s
    with torch.no_grad():
        for clip in clips:
            x = torch.from_numpy(np.pad(clip, (0, -len(clip) % 1920)))[None, None]
            ours, moshis = tiled.encoder(x), model.encoder(x)
            assert ours.shape == moshis.shape
            torch.testing.assert_close(ours, moshis, rtol=1e-5, atol=1e-5)
    ours, moshis = encode_batch(tiled, clips, "cpu"), encode_batch(model, clips, "cpu")
    agree = sum(int((o == m).sum()) for o, m in zip(ours, moshis)) / sum(m.size for m in moshis)
    assert agree >= 0.999, agree
    for o, m in zip(ours, moshis):
        np.testing.assert_array_equal(o[0], m[0])  # codebook 0, what the backbone predicts
