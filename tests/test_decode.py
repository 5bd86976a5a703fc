"""decode: real containers/codecs through PyAV, rates, channels, bounded chunks, bad inputs."""

from __future__ import annotations

import dataclasses
import math

import av
import numpy as np
import pytest
import soundfile as sf

from stages.decode import DecodeConfig, DecodeStage, decode_chunks
from stages.records import ANALYSIS_RATE, CODEC_RATE
from tests.conftest import tone


def _encode(path, audio: np.ndarray, rate: int, codec: str, fmt: str) -> None:
    """Write `audio` ([n] or [n, channels]) with PyAV's own encoders (mp3, vorbis, ...)."""
    channels = 1 if audio.ndim == 1 else audio.shape[1]
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono" if channels == 1 else "stereo")
        planar = np.ascontiguousarray(audio.reshape(len(audio), channels).T.astype(np.float32))
        for i in range(0, planar.shape[1], 4096):
            frame = av.AudioFrame.from_ndarray(planar[:, i : i + 4096], format="fltp", layout=stream.layout.name)
            frame.rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.mark.parametrize(
    "ext,rate,channels",
    [("wav", 44100, 1), ("flac", 22050, 2), ("mp3", 44100, 2), ("ogg", 32000, 1), ("opus", 48000, 2), ("m4a", 44100, 1), ("wav", 8000, 1)],
)
def test_formats_round_trip_duration_rate_and_channels(tmp_path, ext, rate, channels):
    seconds = 3.0
    audio = tone(seconds, rate, channels=channels)
    path = tmp_path / f"x.{ext}"
    if ext in ("wav", "flac", "ogg"):
        sf.write(path, audio, rate, **({"format": "OGG", "subtype": "VORBIS"} if ext == "ogg" else {}))
    else:
        codec, fmt = {"mp3": ("libmp3lame", "mp3"), "opus": ("libopus", "ogg"), "m4a": ("aac", "ipod")}[ext]
        _encode(path, audio, rate, codec, fmt)
    chunks = list(decode_chunks(str(path), DecodeConfig()))
    assert len(chunks) == 1 and chunks[0].last
    c = chunks[0]
    assert c.recording.sample_rate == rate and c.recording.channels == channels
    assert c.audio16k.shape[0] == channels and c.audio16k.dtype == np.float32
    # Lossy codecs add encoder delay/padding: allow 60 ms.
    assert abs(c.duration - seconds) < 0.06
    assert c.audio24k.ndim == 1 and len(c.audio24k) * 2 == c.audio16k.shape[1] * 3
    # The signal survives: the 220 Hz tone dominates the spectrum at 16 kHz.
    spec = np.abs(np.fft.rfft(c.mono16k))
    assert abs(np.argmax(spec) * ANALYSIS_RATE / len(c.mono16k) - 220) < 5


def test_long_input_is_cut_into_bounded_chunks_at_quiet_points(tmp_path):
    rate = 16000
    # 1 s tone / 0.5 s silence, repeated: quiet points every 1.5 s.
    period = np.concatenate([tone(1.0, rate), np.zeros(rate // 2, np.float32)])
    audio = np.tile(period, 20)  # 30 s
    path = tmp_path / "long.wav"
    sf.write(path, audio, rate)
    chunks = list(decode_chunks(str(path), DecodeConfig(chunk_seconds=7.0, cut_search_seconds=2.0)))
    assert len(chunks) >= 4
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.duration <= 7.0 + 1e-6 for c in chunks)
    # Contiguous, nothing lost or duplicated, and every cut lands in silence.
    assert sum(c.audio16k.shape[1] for c in chunks) == len(audio)
    for a, b in zip(chunks, chunks[1:]):
        assert math.isclose(a.offset + a.duration, b.offset, abs_tol=1e-9)
        assert (b.offset % 1.5) >= 1.0 - 0.03
    np.testing.assert_allclose(np.concatenate([c.mono16k for c in chunks]), audio, atol=1e-4)
    assert sum(len(c.audio24k) for c in chunks) == len(audio) * CODEC_RATE // rate


def test_the_end_of_a_long_recording_is_cut_into_half_chunks(tmp_path):
    """taper_chunks: in the last 2 x 7 s of a 30 s recording each chunk is at most half of what
    remains (at least 7 / 4 s), so a run's final chunks are short; a recording under twice that
    (20 s) is cut as before."""
    rate = 16000
    period = np.concatenate([tone(1.0, rate), np.zeros(rate // 2, np.float32)])
    for seconds, tapered in ((30, True), (20, False)):
        audio = np.tile(period, seconds * 2 // 3)
        path = tmp_path / f"{seconds}.wav"
        sf.write(path, audio, rate)
        config = DecodeConfig(chunk_seconds=7.0, cut_search_seconds=2.0)
        chunks = list(decode_chunks(str(path), config))
        plain = list(decode_chunks(str(path), dataclasses.replace(config, taper_chunks=0)))
        assert sum(c.audio16k.shape[1] for c in chunks) == len(audio)  # nothing lost or duplicated
        if not tapered:
            assert [c.offset for c in chunks] == [c.offset for c in plain]
            continue
        assert len(chunks) > len(plain)
        head = [c for c in chunks if c.offset < seconds - 14.0]
        tail = [c for c in chunks if c.offset >= seconds - 14.0]
        assert [c.offset for c in head] == [c.offset for c in plain[: len(head)]]  # full chunks until then
        assert len(tail) >= 3, [c.duration for c in chunks]
        assert all(c.duration <= max((seconds - c.offset) / 2, 7.0 / 4) + 1e-6 for c in tail[:-1]), [c.duration for c in chunks]
        assert tail[-1].duration <= 7.0 / 4 + 2.0, [c.duration for c in chunks]
        assert all((b.offset % 1.5) >= 1.0 - 0.03 for b in tail)  # still cut in silence


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("empty.wav", b"", "InvalidDataError"),
        ("random.mp3", np.random.default_rng(0).bytes(5000), "InvalidDataError"),
        ("text.mp3", b"this is not audio at all\n" * 40, "InvalidDataError"),
    ],
)
def test_bad_inputs_become_one_failed_record(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    chunks = list(DecodeStage(DecodeConfig()).chunks(str(path)))
    assert len(chunks) == 1 and chunks[0].last and chunks[0].failed
    err = chunks[0].errors[0]
    assert err.stage == "decode" and err.uri == str(path)
    assert err.error_type in (expected, "DecodeError", "EOFError"), err


def test_nan_samples_are_refused(tmp_path):
    audio = tone(1.0, 16000)
    audio[100:200] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, audio, 16000, subtype="FLOAT")
    (chunk,) = DecodeStage(DecodeConfig()).chunks(str(path))
    assert chunk.failed and "non-finite" in chunk.errors[0].message


def test_truncated_file_keeps_the_decodable_prefix_and_warns(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, tone(4.0, 16000), 16000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    chunks = list(DecodeStage(DecodeConfig()).chunks(str(path)))
    assert chunks[-1].last and not chunks[-1].failed
    assert 0.5 < sum(c.duration for c in chunks) < 4.0
