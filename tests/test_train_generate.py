"""Generation: greedy frames equal transformers' generate (including where it stops), context
matters, a 24 kHz wav comes out; samples (and their WER) during training."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from train import generate, hf
from train.cli import generate as generate_cmd
from train.config import load_config
from train.model import FLAVOURS
from train.testing import tiny_run, tiny_tokenizer
from test_train import one_thread  # noqa: F401 (autouse fixture)

transformers = pytest.importorskip("transformers")
N, TEXT_V = 32, 96


def _hf_tiny(path):
    """A tiny random transformers CSM saved like sesame/csm-1b (released-form RoPE on both stacks)."""
    from transformers import CsmConfig, CsmForConditionalGeneration

    sesame = load_config(None).model.rope_scaling
    b, d = FLAVOURS["tiny"], FLAVOURS["tiny-decoder"]
    dd = dict(num_codebooks=N, backbone_hidden_size=b.dim, hidden_size=d.dim, intermediate_size=d.ffn_dim,
              num_hidden_layers=d.n_layers, num_attention_heads=d.n_heads, num_key_value_heads=d.n_kv_heads,
              max_position_embeddings=N + 1, rope_scaling=hf._released_form(sesame, N + 1))
    cfg = CsmConfig(num_codebooks=N, text_vocab_size=TEXT_V, hidden_size=b.dim, intermediate_size=b.ffn_dim,
                    num_hidden_layers=b.n_layers, num_attention_heads=b.n_heads, num_key_value_heads=b.n_kv_heads,
                    max_position_embeddings=256, rope_scaling=hf._released_form(sesame, 256),
                    depth_decoder_config=dd, codec_config={"model_type": "mimi"})
    torch.manual_seed(0)
    return CsmForConditionalGeneration(cfg).eval()


def _make_it_stop(m, ids):
    """Bend a random model so greedy decoding ends on an all-zero frame after a few frames: code 0 of
    every codebook gets one large embedding, which drives the decoder's heads to code 0 once codebook 0
    is 0; codebook 0's head row 0 is set to a backbone state the generation revisits (it cycles)."""
    V = m.config.vocab_size
    with torch.no_grad():
        u = torch.randn(m.config.hidden_size, generator=torch.Generator().manual_seed(0))
        m.backbone_model.embed_tokens.embed_audio_tokens.weight[torch.arange(N) * V] = 3 * u
        dec = m.depth_decoder
        h0 = torch.randn(1, m.config.hidden_size, generator=torch.Generator().manual_seed(1))
        states = dec.model(input_ids=torch.zeros(1, N, dtype=torch.long), backbone_last_hidden_state=h0).last_hidden_state
        dec.codebooks_head.weight[:, :, 0] = 20 * states[0, 1:].mean(0)
        frames = m.generate(input_ids=ids, max_new_tokens=16, do_sample=False, depth_decoder_do_sample=False)
        embeds = torch.cat([m.embed_text_tokens(ids), m.backbone_model.embed_tokens(frames)], 1)
        m.lm_head.weight[0] = m.backbone_model(inputs_embeds=embeds).last_hidden_state[0, ids.shape[1] + 8]


@pytest.mark.parametrize("stops", [False, True])
def test_greedy_frames_equal_transformers_generate(tmp_path, stops):
    m = _hf_tiny(tmp_path)
    ids = torch.randint(3, TEXT_V, (1, 7), generator=torch.Generator().manual_seed(1))
    if stops:
        _make_it_stop(m, ids)
    with torch.no_grad():
        expected = m.generate(input_ids=ids, max_new_tokens=16, do_sample=False, depth_decoder_do_sample=False)[0]
    m.save_pretrained(tmp_path / "csm")
    tiny_tokenizer(tmp_path / "csm")
    loaded = generate.load(str(tmp_path / "csm"))  # a transformers-format directory, as MODEL
    tokens = torch.zeros(7, N + 1, dtype=torch.long)
    tokens[:, N] = ids[0]
    mask = torch.zeros(7, N + 1, dtype=torch.bool)
    mask[:, N] = True
    frames, stopped = generate.generate_frames(loaded.model, tokens, mask, 16)
    assert torch.equal(frames, expected)
    assert stopped == stops and (len(frames) < 16) == stops
    if stops:
        assert not frames[-1].any() and len(frames) > 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return root, tiny_run(root, ["train.eval_every=0", "train.sample_every=2", "train.sample_prompts=[\"[0]hello there\"]",
                                 "generate.max_seconds=1.0"], max_steps=2)


def test_samples_during_training_with_wer(run_dir):
    root, history = run_dir
    wav = root / "run" / "samples" / "step-0000002" / "prompt-0.wav"
    audio, rate = sf.read(wav)
    meta = json.loads(wav.with_suffix(".wav.json").read_text())
    assert rate == 24000 and len(audio) == round(meta["seconds"] * 24000)
    assert meta["codec"]["released"] is False  # the seeded random Mimi, marked
    assert "sample_seconds" in history[1] and "sample_wer" in history[1] and "transcript" in meta
    assert "sample_seconds" not in history[0]


def test_generate_cli_wav_and_context_changes_output(run_dir):
    root, _ = run_dir
    key = "synthetic-0000000000-c0000-w0001"
    outs = {}
    for name, extra in (("plain", []), ("context", ["--context", key, "--shards", str(root / "data")])):
        out = root / f"{name}.wav"
        result = CliRunner().invoke(generate_cmd, [str(root / "run"), "--text", "[0]hello there", "--output", str(out),
                                                   "--max-seconds", "0.8", "--temperature", "0", *extra],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "NOT the released Mimi" in result.output
        audio, rate = sf.read(out)
        meta = json.loads(out.with_suffix(".wav.json").read_text())
        assert rate == 24000 and len(audio) == meta["num_frames"] * 1920 - (1920 if meta["stopped"] == "end-of-audio" else 0)
        outs[name] = (audio, meta)
    assert outs["context"][1]["prompt_rows"] > outs["plain"][1]["prompt_rows"]
    assert not np.array_equal(outs["context"][0], outs["plain"][0])
    # A wav with its text and speaker as context, encoded with the same Mimi: its frames + end-of-audio.
    out = root / "wav-context.wav"
    result = CliRunner().invoke(generate_cmd, [str(root / "run"), "--text", "[0]hello there", "--output", str(out),
                                               "--max-seconds", "0.8", "--temperature", "0",
                                               "--context", f"[1]how are you|{root / 'plain.wav'}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.with_suffix(".wav.json").read_text())["prompt_rows"]
    frames = len(outs["plain"][0]) // 1920
    assert rows == outs["plain"][1]["prompt_rows"] + 8 + frames + 1  # BOS [ 1 ] how are you EOS, audio, end
