"""pipeline evaluate (train/evaluate.py) and the pronunciation tests (train/pronounce.py)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from train import pronounce
from train.cli import evaluate as evaluate_cmd
from train.config import EvaluateConfig
from train.testing import tiny_run
from test_train import one_thread  # noqa: F401 (autouse fixture)


def test_nearest_variant_by_phoneme_edit_distance():
    refs = {"leed": "ʃiː wɪl lˈiːd ðə tˈiːm", "led": "ʃiː wɪl lˈɛd ðə tˈiːm"}
    assert pronounce.normalize("ʃiː wɪl lˈiːd") == "ʃiːwɪlliːd"  # stress and word boundaries are not phonemes
    assert pronounce.nearest("ʃ iː w ɪ l l iː d ð ə t iː m", refs) == ("leed", {"leed": 0, "led": 2})
    assert pronounce.nearest("ʃiːwɪllɛdðətiːm", refs)[0] == "led"
    assert pronounce.nearest("ʃiːwɪllæðətiːm", refs)[0] == "led"  # one substitution from "led", two from "leed"
    assert pronounce.nearest("ʃiːwɪllðətiːm", {"a": "ʃiːwɪllɛðətiːm", "b": "ʃiːwɪlloðətiːm"})[0] is None  # a tie decides nothing
    assert pronounce.edit_distance("kæɹəməl", "kɑːɹməl") == 3


def test_score_and_summary_on_constructed_phonemes():
    fake = {"She will leed the team to victory.": "ʃiːwɪlliːd", "She will led the team to victory.": "ʃiːwɪllɛd"}
    item = next(i for i in pronounce.items() if i.word == "lead" and i.expected == "leed")
    right = pronounce.score(item, "ʃiːwɪlliːt", fake.__getitem__)
    wrong = pronounce.score(item, "ʃiːwɪllɛt", fake.__getitem__)
    assert right["correct"] and right["picked"] == "leed" and not wrong["correct"] and wrong["picked"] == "led"
    tie = pronounce.score(item, "ʃiːwɪllɛːd", fake.__getitem__)  # one edit from each
    assert tie["picked"] is None and not tie["correct"]
    summary = pronounce.summarize([right, wrong, tie])
    assert summary == {"homograph": {"accuracy": 1 / 3, "items": 3, "undecided": 1}}


def test_items_cover_the_seed_words_and_espeak_tells_variants_apart():
    items = pronounce.items()
    assert {i.word for i in items if i.test == "homograph"} == {"lead", "bass", "tear", "wound", "row"}
    assert {i.word for i in items if i.test == "consistency"} == {
        "aunt", "data", "envelope", "mobile", "route", "vase", "either", "adult", "often", "caramel"}
    assert len(items) == 5 * 2 + 10 * 2
    for item in items:
        assert pronounce.respell(item.text, item.word, "XYZ") != item.text, item  # the word is in the sentence
        assert item.context is None or pronounce.respell(item.context, item.word, "XYZ") != item.context, item
        refs = {pronounce.normalize(pronounce.espeak(pronounce.respell(item.text, item.word, v))) for v in item.variants}
        assert len(refs) == len(item.variants), (item.word, refs)  # each reading has its own phonemes


def _random_recogniser(path):
    """A randomly initialised wav2vec2 phoneme CTC model (the real architecture, tiny) saved as a model dir."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2PhonemeCTCTokenizer

    phones = sorted({c for i in pronounce.items() for c in pronounce.normalize(pronounce.espeak(i.text))})
    vocab = {t: k for k, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *phones])}
    (path / "vocab.json").parent.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    Wav2Vec2PhonemeCTCTokenizer(str(path / "vocab.json"), do_phonemize=False).save_pretrained(str(path))
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 4),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0)
    Wav2Vec2ForCTC(cfg).save_pretrained(str(path))
    return path


def test_pronunciation_plumbing_on_a_random_recogniser(tmp_path):
    from scipy.signal import resample_poly

    recognise = pronounce.PhonemeRecognizer(str(_random_recogniser(tmp_path / "w2v")))
    spoken = []

    def speak(item):  # espeak-ng as the "model", saying the expected reading
        spoken.append(item)
        audio, rate = pronounce.espeak_audio(pronounce.respell(item.text, item.word, item.expected))
        return resample_poly(audio, 16000, rate).astype(np.float32)

    out = pronounce.run(speak, recognise, which=("homograph",))
    assert len(out["results"]) == 10 == out["homograph"]["items"] and "consistency" not in out
    for r in out["results"]:
        assert isinstance(r["heard"], str) and set(r["distances"]) == set(r["references"])
        assert r["picked"] in (None, *r["references"]) and r["correct"] == (r["picked"] == r["expected"])
    assert 0 <= out["homograph"]["accuracy"] <= 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return root, tiny_run(root, ["data.eval_fraction=0.3", "train.eval_every=1", "train.sample_every=0"], max_steps=1)


def _evaluate(root, *extra):
    out = root / "report.json"
    result = CliRunner().invoke(evaluate_cmd, [
        str(root / "run"), "--shards", str(root / "data"), "--output", str(out), "--report", str(root / "report.html"),
        "--set", "max_seconds=0.4", "--set", "prompts=[\"hello there\", \"how are you\"]", "--set", "contexts=1",
        "--set", "loss_batches=2", *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def test_evaluate_cli_scores_what_it_can_and_names_the_rest(run_dir):
    root, history = run_dir
    report, output = _evaluate(root)
    held = report["held_out"]
    assert held["scored"] and "hash" in held["split"] and len(held["codebook_loss"]) == 32
    # The trainer's own eval on the same held-out batches (eval_batches=2 in tiny.yaml) gives the same numbers.
    assert held["codebook_loss"] == pytest.approx([history[0][f"eval_cb{k}_loss"] for k in range(32)], rel=1e-5)
    assert held["c0_perplexity"] == pytest.approx(np.exp(held["c0_loss"]))
    assert held["decoder_perplexity"] == pytest.approx(np.exp(np.mean(held["codebook_loss"][1:])))
    assert [p["text"] for p in report["prompts"]] == ["hello there", "how are you"]
    assert all(p["context"] and p["stopped"] in ("end-of-audio", "length limit") for p in report["prompts"])
    assert report["length"]["scored"] and 0 <= report["length"]["stopped_at_end_of_audio"] <= 1
    # The seeded random Mimi: no audio metric is scored, each says why (never a zero).
    for metric in ("intelligibility", "speaker_similarity", "pronunciation.homograph", "pronunciation.consistency"):
        assert "not the released Mimi" in report["not_scored"][metric], metric
        assert f"NOT SCORED {metric}" in output
    assert all("wer" not in p and "speaker_similarity" not in p for p in report["prompts"])
    assert "not scored" in (root / "report.html").read_text()


def test_evaluate_names_a_missing_held_out_split_and_phoneme_model(run_dir, tmp_path):
    root, _ = run_dir
    meta_dir = root / "run" / "checkpoints"
    meta = next(meta_dir.glob("step-*")) / "meta.json"
    saved = meta.read_text()
    m = json.loads(saved)
    m["config"]["data"]["eval_fraction"] = 0.0
    try:
        meta.write_text(json.dumps(m))
        report, _ = _evaluate(root, "--set", "pronunciation=[]")
    finally:
        meta.write_text(saved)
    assert "eval_fraction=0" in report["not_scored"]["held_out"]
    assert all(p["context"] is None for p in report["prompts"]) and report["pronunciation"] == {}


def test_evaluate_config_is_validated():
    from stages.overrides import ConfigError, with_overrides

    with pytest.raises(ConfigError, match="pronunciation"):
        with_overrides(EvaluateConfig(), {"pronunciation": ["rhymes"]})
    with pytest.raises(ConfigError, match="max_seconds"):
        EvaluateConfig(max_seconds=0)


def test_audio_metrics_plumbing_with_real_asr_and_speaker_encoder(run_dir, tmp_path):
    """The scored path, forced on the seeded random Mimi (the released one is not here): the pipeline's
    ASR, resemblyzer and a random phoneme recogniser on what the run generates. Numbers are noise."""
    from train import evaluate as ev, generate

    root, _ = run_dir
    loaded = generate.load(str(root / "run"))
    codec, codec_id = generate.load_codec(loaded.model.N, True)
    cfg = EvaluateConfig(prompts=("hello there",), max_seconds=0.6, phoneme_model=str(_random_recogniser(tmp_path / "w2v")),
                         pronunciation=("consistency",))
    scorers = ev.Scorers(cfg, {**codec_id, "released": True}, None)  # pretend: scores noise, for the plumbing only
    assert scorers.audio is None and scorers.asr_error is None and scorers.encoder_error is None
    assert scorers.phoneme_error is None
    g = generate.GenerateConfig(temperature=cfg.temperature, max_seconds=cfg.max_seconds, seed=0)
    urls, _ = ev.held_out_shards(str(root / "data"), ev.run_config(str(root / "run"), loaded, None), True)
    contexts = ev.context_turns(urls, 1, loaded.tokenizer, loaded.model.N)
    out = ev.prompt_set(loaded, cfg, g, codec, contexts, scorers)
    row = out["prompts"][0]
    assert isinstance(row["transcript"], str) and row["wer"] >= 0 and -1 <= row["speaker_similarity"] <= 1
    assert out["intelligibility"]["scored"] and out["speaker_similarity"]["prompts"] == 1
    pron = ev.pronunciation(loaded, cfg, g, codec, scorers)
    assert pron["consistency"]["scored"] and pron["consistency"]["items"] == 20 == len(pron["items"])
    assert all(r["context"] for r in pron["items"]) and "homograph" not in pron


def test_held_out_split_packed_val_and_unknown_training_data(tmp_path):
    from train import evaluate as ev
    from train.config import Config, DataConfig

    for split, names in (("train", ["a.tar", "b.tar"]), ("val", ["c.tar"])):
        (tmp_path / split).mkdir()
        for n in names:
            (tmp_path / split / n).write_bytes(b"")
    (tmp_path / "pack.json").write_text("{}")  # a finished pack
    run_cfg = Config(data=DataConfig(eval_fraction=0.0))  # the run held nothing out of train/: val/ still is
    urls, how = ev.held_out_shards(str(tmp_path), run_cfg, True)
    assert urls == [str(tmp_path / "val" / "c.tar")] and "val/" in how and "unknown" not in how
    assert "unknown" in ev.held_out_shards(str(tmp_path), run_cfg, False)[1]
