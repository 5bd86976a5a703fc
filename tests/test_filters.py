"""Quality filters and windows on constructed inputs: silence, noise, music-like tones, a looped
phrase, a 0.1 s blip, clipping, ... are rejected with the expected reason; clean speech (pyannote's
sample conversation, its reference transcript and real silero VAD) is kept."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf

from stages.filtering import UtteranceFilterStage, WindowFilterStage
from stages.filters import FILTER_ORDER, FiltersConfig, check, make_filters, repeat_ratio
from stages.intervals import complement
from stages.signal import SignalContext, snr_estimate
from stages.records import Chunk, Recording, Region, Utterance, Window, Word
from stages.windows import WindowsConfig, WindowsStage, positions, split_to_budget

SR = 16_000


@pytest.fixture(scope="module")
def vad_model():
    from stages.vad import VadConfig, VadStage

    stage = VadStage(VadConfig())
    stage.setup()  # the model the pipeline runs (silero's ONNX export)
    return stage.model


@pytest.fixture(scope="module")
def speech(sample_wav) -> np.ndarray:
    x, rate = sf.read(sample_wav, dtype="float32")
    assert rate == SR
    return x


@pytest.fixture(scope="module")
def reference(sample_stm) -> list[Utterance]:
    return [Utterance(spk, s, e, text, avg_logprob=-0.3, no_speech_prob=0.1) for s, e, spk, text in sample_stm]


def make_chunk(audio: np.ndarray, vad_model=None, speech: list[Region] | None = None) -> Chunk:
    """A chunk over `audio` with VAD regions from silero (or the given ones)."""
    from stages.vad import VadConfig, speech_regions

    audio = np.asarray(audio, dtype=np.float32)
    chunk = Chunk(Recording("src-0123456789", "mem://src", len(audio) / SR, SR, 1), 0, 0.0, True, audio[None], None)
    chunk.speech = speech if speech is not None else speech_regions(vad_model, audio, VadConfig())
    return chunk


def run_level(chunk: Chunk, level: str, config: FiltersConfig | None = None) -> Chunk:
    stage = UtteranceFilterStage if level == "utterance" else WindowFilterStage
    [out] = stage(config or FiltersConfig()).process_batch([chunk])
    assert not out.failed, out.errors
    return out


def reasons(chunk: Chunk, stages: tuple[str, ...] = ("filter_utterances", "filter_windows")) -> list[str]:
    return [r.reason for r in chunk.rejected if r.stage in stages]


def seconds(n: float) -> np.ndarray:
    return np.zeros(int(n * SR), np.float32)


def noise(n: float, level: float = 0.1) -> np.ndarray:
    return (level * np.random.default_rng(0).standard_normal(int(n * SR))).astype(np.float32)


def music(n: float) -> np.ndarray:
    """A C-major chord whose notes come and go every half second: tonal, rhythmic, not speech."""
    t = np.arange(int(n * SR)) / SR
    chord = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0))
    return (0.2 * chord * (0.3 + 0.7 * (np.floor(t * 2) % 2 == 0))).astype(np.float32)


def tone(n: float) -> np.ndarray:
    t = np.arange(int(n * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


SENTENCE = "I think we should meet there tomorrow morning, okay?"


# ------------------------------------------------------------------------- clean speech is kept


def test_clean_speech_passes_every_filter_and_metrics_are_recorded(speech, reference, vad_model):
    chunk = make_chunk(speech, vad_model)
    chunk.utterances = [dataclasses.replace(u, metrics={}) for u in reference]
    chunk = run_level(chunk, "utterance")
    assert reasons(chunk) == []
    assert len(chunk.utterances) == len(reference)
    for u in chunk.utterances:
        assert {"duration", "vad_coverage", "rms_dbfs", "chars_per_second", "repeat_ratio", "overlap_ratio", "language_prob"} <= set(u.metrics)
        assert u.metrics["language_prob"] == 1.0  # fixed-language ASR: no probability, taken as 1.0
    # Non-speech time is recorded (for the funnel): exactly the complement of the VAD regions.
    gaps = [r for r in chunk.rejected if r.reason == "non_speech"]
    assert gaps and all(r.stage == "vad" and r.level == "region" for r in gaps)
    speech_s = sum(r.duration for r in chunk.speech)
    assert sum(r.duration for r in gaps) == pytest.approx(30.0 - speech_s, abs=1e-6)

    chunk.windows = [Window(0, chunk.utterances)]
    chunk = run_level(chunk, "window")
    assert reasons(chunk) == [] and len(chunk.windows) == 1
    w = chunk.windows[0]
    assert w.metrics["snr_db"] > 15 and w.metrics["speech_ratio"] > 0.8 and w.metrics["clipping_ratio"] == 0.0
    assert len(w.metrics["utterance_quality"]) == len(reference)
    assert w.metrics["utterance_quality"][0]["start"] == reference[0].start


# ------------------------------------------------------------------- utterance-level rejections


@pytest.mark.parametrize("kind", ["silence", "noise", "music"])
def test_text_over_non_speech_is_rejected_as_text_in_silence(kind, vad_model):
    audio = {"silence": seconds(8), "noise": noise(8), "music": music(8)}[kind]
    chunk = make_chunk(audio, vad_model)
    chunk.utterances = [Utterance("A", 1.0, 7.0, SENTENCE)]
    chunk = run_level(chunk, "utterance")
    [rej] = [r for r in chunk.rejected if r.stage == "filter_utterances"]
    assert (rej.reason, rej.level, rej.start, rej.end) == ("text_in_silence", "utterance", 1.0, 7.0)
    assert rej.metric < 0.3 and chunk.utterances == []


def test_near_silent_audio_inside_vad_speech_is_text_in_silence():
    chunk = make_chunk(seconds(4) + 1e-5, speech=[Region(0, 4)])  # VAD fooled, audio at -100 dBFS
    chunk.utterances = [Utterance("A", 0.5, 3.5, SENTENCE)]
    assert reasons(run_level(chunk, "utterance")) == ["text_in_silence"]


@pytest.mark.parametrize(
    "text, start, end, fields, config, reason",
    [
        ("And I'm Sheila.", 14.5, 14.6, {}, None, "utterance_duration"),  # a 0.1 s blip
        ("I'm Sheila in Texas. " * 6, 14.444, 17.769, {}, None, "repetition"),  # looped decode
        ("no no no no no no no no", 14.444, 17.769, {}, None, "repetition"),
        ("Thank you for watching!", 14.444, 17.769, {}, None, "phantom_phrase"),
        ("Subtitles by the Amara.org community", 14.444, 17.769, {}, None, "phantom_phrase"),
        ("And I'm Sheila in Texas, originally from Chicago.", 14.444, 17.769, {"avg_logprob": -1.6}, None, "asr_logprob"),
        ("And I'm Sheila in Texas, originally from Chicago.", 14.444, 17.769, {"no_speech_prob": 0.9}, None, "asr_no_speech"),
        ("And I'm Sheila in Texas, originally from Chicago, and that is all.", 14.444, 15.2, {}, None, "speaking_rate"),
        ("Oh.", 14.444, 17.769, {}, None, "speaking_rate"),  # 3 chars over 3.3 s
        ("And I'm Sheila in Texas, originally from Chicago.", 14.444, 17.769, {"overlap": 2.5}, None, "overlap"),
        ("Und ich bin Sheila aus Texas.", 14.444, 17.769, {"language": "de"}, FiltersConfig(languages=["en"]), "language"),
        ("And I'm Sheila in Texas.", 14.444, 17.769, {"language_prob": 0.2}, None, "language"),
    ],
)
def test_utterance_filters_reject_with_their_reason(speech, vad_model, text, start, end, fields, config, reason):
    chunk = make_chunk(speech, vad_model)
    chunk.utterances = [Utterance("S", start, end, text, **fields)]
    chunk = run_level(chunk, "utterance", config)
    [rej] = [r for r in chunk.rejected if r.stage == "filter_utterances"]
    assert rej.reason == reason and rej.level == "utterance" and rej.metric is not None
    assert (rej.start, rej.end, rej.source_id) == (start, end, "src-0123456789")
    assert chunk.utterances == []


def test_first_failing_filter_gives_the_reason_and_disabled_filters_only_measure(speech, vad_model):
    u = Utterance("S", 14.5, 14.6, "Thank you for watching!")  # a blip AND a phantom
    cfg = FiltersConfig()
    metrics, reason, _ = check(make_filters(cfg, "utterance"), u, SignalContext(make_chunk(speech, vad_model)), cfg)
    assert reason == "utterance_duration" and FILTER_ORDER.index("utterance_duration") < FILTER_ORDER.index("phantom_phrase")
    assert metrics["phantom_phrase"] == 1.0  # measured although an earlier filter rejected
    cfg = FiltersConfig(disable=["utterance_duration", "speaking_rate"])
    _, reason, _ = check(make_filters(cfg, "utterance"), u, SignalContext(make_chunk(speech, vad_model)), cfg)
    assert reason == "phantom_phrase"


def test_repeat_ratio_leaves_ordinary_sentences_alone():
    assert repeat_ratio("Well, there isn't that much difference. At least, you know, they all call me a Yankee.")[0] == 0.0
    assert repeat_ratio("hello hello")[1] == 0  # too short to judge
    assert repeat_ratio("thank you thank you thank you thank you thank you")[0] > 0.5


# ---------------------------------------------------------------------- window-level rejections


def _window_chunk(audio, vad_model=None, speech=None, speakers=("A", "B")):
    chunk = make_chunk(audio, vad_model, speech)
    n = len(audio) / SR
    utts = [Utterance(speakers[i % len(speakers)], 0.5 + i * (n - 1) / 2, 0.5 + (i + 1) * (n - 1) / 2, SENTENCE) for i in range(2)]
    chunk.windows = [Window(0, utts)]
    return chunk


@pytest.mark.parametrize("kind", ["silence", "noise", "music"])
def test_windows_without_speech_fail_speech_ratio(kind, vad_model):
    audio = {"silence": seconds(8), "noise": noise(8), "music": music(8)}[kind]
    chunk = run_level(_window_chunk(audio, vad_model), "window")
    assert reasons(chunk) == ["speech_ratio", "no_windows"]
    rej = chunk.rejected[0]
    assert rej.level == "window" and rej.metric < 0.4 and (rej.start, rej.end) == (0.5, 7.5)
    assert chunk.windows == [] and chunk.done  # a chunk with no window left is rejected as a whole


@pytest.mark.parametrize("kind", ["noise", "tone", "silence"])
def test_snr_catches_noise_a_steady_tone_and_silence_that_fooled_vad(kind):
    audio = {"noise": noise(8), "tone": tone(8), "silence": seconds(8)}[kind]
    chunk = run_level(_window_chunk(audio, speech=[Region(0.0, 8.0)]), "window")
    assert reasons(chunk)[0] == "snr"
    assert chunk.rejected[0].metric < FiltersConfig().min_snr_db


@pytest.mark.parametrize("kind", ["noise", "tone"])
def test_dnsmos_rejects_noise_like_audio_that_passed_the_other_filters(kind):
    # Not music: DNSMOS rates the pulsing chord of music() 2.06, speech-like (speech_ratio catches it).
    audio = {"noise": noise(8), "tone": tone(8)}[kind]
    config = FiltersConfig(disable=["speech_ratio", "snr"])  # as if VAD and the SNR estimate were fooled
    chunk = run_level(_window_chunk(audio, speech=[Region(0.0, 8.0)]), "window", config)
    assert reasons(chunk)[0] == "dnsmos"
    assert chunk.rejected[0].metric < FiltersConfig().min_dnsmos_ovrl


def test_dnsmos_keeps_real_speech_and_scores_every_utterance(speech, vad_model, reference):
    chunk = make_chunk(speech, vad_model)
    chunk.windows = [Window(0, list(reference))]
    chunk = run_level(chunk, "window")
    assert reasons(chunk) == []
    w = chunk.windows[0]
    assert 2.0 < w.metrics["dnsmos_ovrl"] <= 5.0 and 1.0 <= w.metrics["dnsmos_bak"] <= 5.0
    assert all(2.0 < q["dnsmos_ovrl"] <= 5.0 for q in w.metrics["utterance_quality"])
    chunk = make_chunk(speech, vad_model)
    chunk.windows = [Window(0, list(reference))]
    chunk = run_level(chunk, "window", FiltersConfig(dnsmos=False))
    assert "dnsmos_ovrl" not in chunk.windows[0].metrics  # off: neither scored nor loaded


def test_snr_estimate_falls_with_added_noise(speech, vad_model):
    clean = make_chunk(speech, vad_model)
    noisy = make_chunk(speech + noise(30, level=0.05), speech=clean.speech)
    a, b = snr_estimate(SignalContext(clean), 6.7, 30.0), snr_estimate(SignalContext(noisy), 6.7, 30.0)
    assert a > 20 and b < a - 10


def test_clipped_speech_is_rejected(speech, vad_model, reference):
    loud = np.clip(speech * 40, -1.0, 1.0)
    chunk = make_chunk(loud, vad_model)
    chunk.windows = [Window(0, list(reference))]
    chunk = run_level(chunk, "window")
    assert reasons(chunk)[0] == "clipping" and chunk.rejected[0].metric > 0.005


def test_min_speakers_is_off_by_default_and_rejects_monologues_when_on(speech, vad_model, reference):
    mono = [u for u in reference if u.speaker == "Diane"]
    chunk = make_chunk(speech, vad_model)
    chunk.windows = [Window(0, mono), Window(1, list(reference))]
    kept = run_level(chunk, "window")
    assert [w.index for w in kept.windows] == [0, 1]
    chunk = make_chunk(speech, vad_model)
    chunk.windows = [Window(0, mono), Window(1, list(reference))]
    chunk = run_level(chunk, "window", FiltersConfig(min_speakers=2))
    assert reasons(chunk) == ["min_speakers"]
    assert [w.index for w in chunk.windows] == [0]  # kept windows renumbered in order
    assert chunk.windows[0].utterances == list(reference)


def test_describe_lists_every_filter_with_thresholds():
    utt, win = (stage(FiltersConfig()).describe()["filters"] for stage in (UtteranceFilterStage, WindowFilterStage))
    assert [f["name"] for f in utt + win] == FILTER_ORDER
    assert win[2]["min_snr_db"] == 5.0


def test_conversational_config_turns_on_min_speakers(tmp_path):
    import yaml
    from pathlib import Path

    from stages.overrides import with_overrides

    data = yaml.safe_load((Path(__file__).parent.parent / "configs" / "conversational.yaml").read_text())
    assert with_overrides(FiltersConfig(), data["filters"]).min_speakers == 2


# ----------------------------------------------------------------------------------- windows


def _words(n: int, start: float = 0.0, step: float = 0.4, pause_every: int = 0) -> list[Word]:
    out, t = [], start
    for i in range(n):
        out.append(Word(f"word{i}" + ("," if i % 7 == 6 else ""), t, t + 0.3))
        t += step + (0.6 if pause_every and i % pause_every == pause_every - 1 else 0.0)
    return out


def _check_pieces(u: Utterance, pieces: list[Utterance], cfg: WindowsConfig) -> None:
    assert len(pieces) > 1
    assert pieces[0].start == u.start and pieces[-1].end == u.end
    for a, b in zip(pieces, pieces[1:]):
        assert a.end == b.start  # the pieces tile the utterance
    for p in pieces:
        assert positions(p, cfg) <= cfg.max_positions and p.text == p.text.strip() and p.text
    # Never mid-word: the texts are whole words of the original, in order.
    assert " ".join(p.text for p in pieces).split() == u.text.split()


def test_long_utterance_with_word_times_is_split_at_pauses_between_words():
    words = _words(150, pause_every=10)
    u = Utterance("A", 0.0, words[-1].end, " ".join(w.text for w in words), words=words, metrics={"vad_coverage": 1.0})
    cfg = WindowsConfig(max_positions=400)
    assert positions(u, cfg) > cfg.max_positions
    pieces = split_to_budget(u, cfg)
    _check_pieces(u, pieces, cfg)
    for p in pieces:
        assert all(p.start <= w.start and w.end <= p.end for w in p.words)  # every word inside one piece
        assert p.text == " ".join(w.text for w in p.words)
    # Cuts fall in the 0.7 s pauses (after every 10th word), not between ordinary words.
    for p in pieces[:-1]:
        assert len(p.words) % 10 == 0
    assert sum(len(p.words) for p in pieces) == 150


def test_long_utterance_without_word_times_is_split_at_spaces_and_vad_pauses():
    text = " ".join(f"token{i}" for i in range(120))
    u = Utterance("A", 0.0, 60.0, text)
    cfg = WindowsConfig(max_positions=500)
    pieces = split_to_budget(u, cfg, pauses=[(20.0, 21.0), (38.0, 39.5)])
    _check_pieces(u, pieces, cfg)
    assert [p.end for p in pieces[:-1]] == [20.5, 38.75]  # the middle of each VAD pause
    pieces = split_to_budget(u, cfg)  # no pauses: proportional cuts at spaces
    _check_pieces(u, pieces, cfg)
    # Estimated text/time correspondence: each piece's share of characters ~ its share of time.
    for p in pieces:
        assert abs(len(p.text) / len(text) - p.duration / u.duration) < 0.03


def test_windows_stage_splits_instead_of_rejecting_and_enforces_min_length_and_speakers():
    utts = [Utterance("A", 0.0, 0.5, "Hi."), Utterance("B", 20.0, 80.0, " ".join(f"w{i}" for i in range(150)))]
    utts += [Utterance("A", 100.0, 103.0, "Yes, I know that one."), Utterance("A", 104.0, 106.0, "And this one.")]

    def fresh() -> Chunk:
        chunk = Chunk(Recording("src", "mem://src", 110.0, SR, 1), 0, 0.0, True, np.zeros((1, 110 * SR), np.float32), None)
        chunk.utterances = list(utts)
        return chunk

    cfg = WindowsConfig(max_positions=600, min_seconds=1.0, keep_single_speaker=False)
    [chunk] = WindowsStage(cfg).process_batch([fresh()])
    got = {r.reason for r in chunk.rejected}
    assert "utterance_over_budget" not in got
    assert {"window_too_short", "single_speaker"} <= got  # "Hi." alone (gap > 10 s); A's monologue
    # Single-speaker windows kept (the default): the 60 s utterance's pieces are in windows.
    cfg = WindowsConfig(max_positions=600, min_seconds=1.0)
    [chunk] = WindowsStage(cfg).process_batch([fresh()])
    assert not chunk.failed
    assert [r.reason for r in chunk.rejected] == ["window_too_short"]
    flat = [u for w in chunk.windows for u in w.utterances]
    assert flat == sorted(flat, key=lambda u: u.start)
    for w in chunk.windows:
        assert sum(positions(u, cfg) for u in w.utterances) <= cfg.max_positions
        assert all(0 <= u.start < u.end <= 110.0 for u in w.utterances)
    assert sum(u.duration for u in flat if u.speaker == "B") == pytest.approx(60.0)


def test_complement_of_regions():
    assert complement([(1.0, 2.0), (3.0, 4.0)], 0.0, 5.0) == [(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)]
    assert complement([(0.0, 5.0)], 0.0, 5.0) == []
