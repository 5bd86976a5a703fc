"""utterances, windows and config: pure functions on typed records."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from stages.overrides import parse_sets
from stages.records import Region, Turn, Utterance
from stages.utterances import UtterancesConfig, assign_speaker
from stages.windows import WindowsConfig, audio_frames, group_windows, positions


def test_assign_speaker_by_most_overlap_and_measures_overlap():
    turns = [Turn(0.0, 4.0, "A"), Turn(3.0, 10.0, "B")]
    assert assign_speaker(2.0, 5.0, turns) == ("A", 1.0)  # A 2 s, B 2 s: tie -> smaller label; both talk 3..4
    speaker, overlap = assign_speaker(3.5, 9.0, turns)
    assert speaker == "B" and overlap == pytest.approx(0.5)
    # One speaker's own overlapping turns are not overlapped speech.
    assert assign_speaker(0.0, 5.0, [Turn(0, 3, "A"), Turn(2, 5, "A")]) == ("A", 0.0)
    assert assign_speaker(20.0, 21.0, turns) == (None, 0.0)


def _utt(s, e, spk="A", text="hello there"):
    return Utterance(spk, s, e, text)


def test_windows_respect_the_budget_and_keep_order():
    cfg = WindowsConfig(max_positions=300)
    utts = [_utt(i * 5.0, i * 5.0 + 4.0, "AB"[i % 2], "word " * 10) for i in range(12)]
    windows, too_long = group_windows(utts, cfg)
    assert not too_long and len(windows) > 1
    flat = [u for w in windows for u in w]
    assert flat == sorted(utts, key=lambda u: u.start)  # every utterance once, in order
    for w in windows:
        assert sum(positions(u, cfg) for u in w) <= cfg.max_positions
    # Greedy: adding the next utterance would have broken the budget.
    for w, nxt in zip(windows, windows[1:]):
        assert sum(positions(u, cfg) for u in w) + positions(nxt[0], cfg) > cfg.max_positions


def test_window_budget_counts_frames_text_and_end_of_audio():
    u = _utt(0.0, 2.0, "S0", "abcdefg")  # 2 s -> 25 frames; "[S0]abcdefg" = 11 chars -> 4 tokens + BOS/EOS
    assert audio_frames(2.0) == 25 and audio_frames(2.01) == 26
    assert positions(u, WindowsConfig(chars_per_token=3.5)) == 25 + 6 + 1


def test_gap_starts_a_new_window_and_oversized_utterances_are_reported():
    cfg = WindowsConfig(max_gap_seconds=10.0, max_positions=200)
    windows, too_long = group_windows([_utt(0, 2), _utt(30, 32), _utt(40, 59)], cfg)
    assert [[u.start for u in w] for w in windows] == [[0], [30]]
    assert [u.start for u in too_long] == [40]


def test_config_overrides_and_unknown_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("asr:\n  batch_size: 4\nwindows:\n  max_positions: 1024\n")
    cfg = load_config([f], ["vad.threshold=0.6", "tokenize.weights=/m.safetensors", "decode.chunk_seconds=60"])
    assert cfg.asr.batch_size == 4 and cfg.windows.max_positions == 1024
    assert cfg.vad.threshold == 0.6 and cfg.tokenize.weights == "/m.safetensors"
    assert cfg.decode.chunk_seconds == 60.0 and isinstance(cfg.decode.chunk_seconds, float)
    assert load_config().asr.batch_size != 4  # defaults untouched by earlier loads
    with pytest.raises(ConfigError, match="asr.batch_sise"):
        load_config([], ["asr.batch_sise=3"])
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load_config([], ["nope.x=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config([], ["asr.batch_size=many"])
    with pytest.raises(ConfigError, match="asr.actors: expected int"):  # a None default still has a type
        load_config([], ["asr.actors=two"])
    assert load_config([], ["asr.actors=3"]).asr.actors == 3 and load_config([], ["run.workers=null"]).run.workers is None
    assert parse_sets(["a.b.c=null", "a.d=2"]) == {"a": {"b": {"c": None}, "d": 2}}


def test_channel_mode_gives_each_channels_words_to_its_speaker():
    import numpy as np

    from stages.records import AsrSegment, Chunk, Recording, Word
    from stages.utterances import UtterancesStage

    chunk = Chunk(Recording("call", "call.wav", 10.0, 8000, 2), 0, 0.0, True, np.zeros((2, 160000), np.float32))
    chunk.speaker_mode, chunk.channel_speakers = "channels", {"S0": 1, "S1": 0}
    chunk.turns = [Turn(1.0, 3.0, "S0"), Turn(4.0, 6.0, "S1"), Turn(4.5, 4.8, "S0")]
    ch0 = [Word("well", 4.0, 4.4), Word("maybe", 4.5, 5.0), Word("later", 5.2, 6.0)]
    ch1 = [Word("call", 1.0, 1.5), Word("me", 1.6, 3.0), Word("yes", 4.5, 4.8)]
    chunk.segments = [AsrSegment(1.0, 4.8, "call me yes", "en", -0.1, 0.0, 1, ch1), AsrSegment(4.0, 6.0, "well maybe later", "en", -0.1, 0.0, 0, ch0)]
    (chunk,) = UtterancesStage(UtterancesConfig(max_pause=0.5)).process_batch([chunk])
    got = [(u.speaker, u.text, u.channel) for u in chunk.utterances]
    # channel 1's "yes" is its own utterance (a 1.5 s pause), said over channel 0's turn
    assert got == [("S0", "call me", 1), ("S1", "well maybe later", 0), ("S0", "yes", 1)]
    assert chunk.utterances[2].overlap == pytest.approx(0.3)  # the other channel talks throughout its word


def test_source_ids_are_safe_file_names_and_keys():
    from stages.records import source_id
    from stages.corpus_format import sample_key

    for uri in ["../../etc/passwd", "/data/a b/ünïcode.tar.gz.wav", "s3://bucket/x/..", "", "/x/.hidden", "C:\\evil\\..\\f.mp3"]:
        sid = source_id(uri)
        assert sid and all(c.isascii() and (c.isalnum() or c in "_-") for c in sid), (uri, sid)
        assert "." not in sample_key(sid, 3, 7) and "/" not in sample_key(sid, 3, 7)
    assert source_id("/a/x.wav") != source_id("/b/x.wav")  # same name, different files: different ids
    assert source_id("/a/x.wav") == source_id("/a/x.wav")
