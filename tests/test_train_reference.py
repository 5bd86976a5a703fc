"""Our CSM computes what transformers' CsmForConditionalGeneration computes, given its weights."""

import dataclasses

import pytest
import torch

from train.config import Config, ModelConfig
from train.hf import _released_form, map_hf_state_dict
from train.loop import build_model
from train.model import CSM, FLAVOURS, rope_frequencies

transformers = pytest.importorskip("transformers")

N, V, TEXT_V = 32, 2051, 96
# Llama-3 scaling with a short original context, so all three frequency bands matter at 20 positions.
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


# Sesame's llama3 scaling (our default) as transformers' conversion writes it for each stack: same
# frequencies, different numbers (backbone original 1024 for 2048 positions, decoder 16 for 33).
SESAME = ModelConfig().rope_scaling
RELEASED = (_released_form(SESAME, 64), _released_form(SESAME, N + 1))


def _hf_model(rope_scaling, decoder_scaling="same", text_vocab=TEXT_V):
    from transformers import CsmConfig, CsmForConditionalGeneration

    b, d = FLAVOURS["tiny"], FLAVOURS["tiny-decoder"]
    codec = {"model_type": "mimi"}  # built (randomly) by the reference; unused here
    dd = dict(num_codebooks=N, backbone_hidden_size=b.dim, vocab_size=V, hidden_size=d.dim,
              intermediate_size=d.ffn_dim, num_hidden_layers=d.n_layers, num_attention_heads=d.n_heads,
              num_key_value_heads=d.n_kv_heads, max_position_embeddings=N + 1,
              rope_scaling=rope_scaling if decoder_scaling == "same" else decoder_scaling)
    cfg = CsmConfig(num_codebooks=N, vocab_size=V, text_vocab_size=text_vocab, hidden_size=b.dim,
                    intermediate_size=b.ffn_dim, num_hidden_layers=b.n_layers, num_attention_heads=b.n_heads,
                    num_key_value_heads=b.n_kv_heads, max_position_embeddings=64, rope_scaling=rope_scaling,
                    depth_decoder_config=dd, codec_config=codec, attn_implementation="eager")
    torch.manual_seed(0)
    model = CsmForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms too, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _rows(T=20, text_vocab=TEXT_V):
    """Text rows, then audio frames, an end-of-audio frame, more text, more audio."""
    g = torch.Generator().manual_seed(1)
    kinds = [0] * 5 + [1] * 6 + [2] + [0] * 3 + [1] * (T - 15)  # 0 text, 1 audio, 2 end-of-audio
    tokens = torch.zeros(2, T, N + 1, dtype=torch.long)
    mask = torch.zeros(2, T, N + 1, dtype=torch.bool)
    for t, k in enumerate(kinds):
        if k == 0:
            tokens[:, t, N] = torch.randint(0, text_vocab, (2,), generator=g)
            mask[:, t, N] = True
        else:
            tokens[:, t, :N] = torch.randint(0, 2048, (2, N), generator=g) if k == 1 else 0
            mask[:, t, :N] = True
    return tokens, mask


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3])
def test_logits_equal_transformers_reference(rope_scaling):
    hf = _hf_model(rope_scaling)
    ours = CSM(ModelConfig(flavour="tiny", text_vocab_size=TEXT_V, max_seq_len=64, rope_scaling=rope_scaling)).eval()
    ours.load_state_dict(map_hf_state_dict(hf.state_dict()), strict=True)
    assert_logits_equal(hf, ours)


def assert_logits_equal(hf, ours):
    """Backbone logits, codebook-0 logits and decoder logits of both models on the same rows."""
    tokens, mask = _rows(text_vocab=ours.cfg.text_vocab_size)
    audio = mask[..., 0]
    with torch.no_grad():
        # The reference's own embedding: text rows from embed_text_tokens, audio rows summed codebooks.
        embeds = hf.embed_text_tokens(tokens[..., N])
        embeds[audio] = hf.backbone_model.embed_tokens(tokens[..., :N])[audio]
        # Labels: codebook 0 on audio frames; the decoder on a few frames (the rest -100 past column 0).
        labels = torch.full((2, tokens.shape[1], N), -100)
        labels[audio] = tokens[..., :N][audio]
        dec_frames = torch.zeros_like(audio)
        dec_frames[0, [5, 11, 17]] = True
        dec_frames[1, [8, 16]] = True
        labels[..., 1:][audio & ~dec_frames] = -100
        out = hf(inputs_embeds=embeds, labels=labels)

        c0_index = audio.nonzero(as_tuple=True)
        dec_index = dec_frames.nonzero(as_tuple=True)
        h = ours.hidden(tokens, mask)
        c0_logits, dec_logits = ours(tokens, mask, c0_index, dec_index)

    torch.testing.assert_close(ours.codebook0_head(h), out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c0_logits, out.logits[c0_index[0], c0_index[1] - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec_logits, out.depth_decoder_logits, rtol=1e-5, atol=1e-5)
    assert dec_logits.shape == (5, N - 1, V)


def test_rope_frequencies_match_transformers_llama3_for_csm_1b():
    from transformers import CsmConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig()  # defaults: the released CSM-1B RoPE
    hf_cfg = CsmConfig(rope_scaling=cfg.rope_scaling, max_position_embeddings=16384)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(rope_frequencies(64, cfg.rope_theta, cfg.rope_scaling), expected)


def test_mapping_rejects_unknown_keys():
    with pytest.raises(KeyError):
        map_hf_state_dict({"backbone_model.layers.0.self_attn.rotary.weight": torch.zeros(1)})


def test_init_from_released_form_rope_scaling_logits_equal(tmp_path):
    hf = _hf_model(*RELEASED)
    hf.save_pretrained(tmp_path / "csm")
    # Our defaults (flavour, sizes) differ from the checkpoint's: its config.json decides the architecture.
    cfg = Config(model=ModelConfig(init_from=str(tmp_path / "csm"), max_seq_len=64))
    ours = build_model(cfg).eval()
    assert ours.cfg.backbone == "layers=2,dim=64,heads=4,kv_heads=2,ffn=128" and ours.cfg.text_vocab_size == TEXT_V
    assert_logits_equal(hf, ours)


def test_init_from_mismatches_fail_naming_key_and_numbers(tmp_path):
    from train import data, loop
    from train.testing import make_shards, tiny_tokenizer

    hf = _hf_model(*RELEASED, text_vocab=8)
    hf.save_pretrained(tmp_path / "csm")
    tok = tiny_tokenizer(tmp_path / "tok")
    model = ModelConfig(init_from=str(tmp_path / "csm"), max_seq_len=64)
    with pytest.raises(ValueError, match=rf"data.tokenizer has {len(tok)} tokens > model.init_from .*text_vocab_size=8"):
        loop.model_config(model, tok)
    # The decoder's RoPE is checked too: a decoder scaling that is not Sesame's fails, naming the stack.
    _hf_model(RELEASED[0], LLAMA3).save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="depth decoder"):
        loop.model_config(dataclasses.replace(model, init_from=str(tmp_path / "bad")), tok)
    shards = make_shards(tmp_path / "data", n_shards=1, per_shard=1, num_codebooks=16)
    with pytest.raises(ValueError, match="model.num_codebooks=32 but shard .* holds 16 codebooks"):
        data.preflight(data.list_shards(shards, 0)[0], True, 32, 2051)
    with pytest.raises(ValueError, match="model.audio_vocab_size=1024 cannot hold the 2048 codes"):
        data.preflight(data.list_shards(shards, 0)[0], True, 16, 1024)


def test_load_hf_weights_from_saved_transformers_checkpoint(tmp_path):
    hf = _hf_model(LLAMA3)
    hf.save_pretrained(tmp_path / "csm")  # safetensors + config.json, as sesame/csm-1b is published
    model = ModelConfig(flavour="tiny", text_vocab_size=TEXT_V, max_seq_len=64, rope_scaling=LLAMA3, init_from=str(tmp_path / "csm"))
    ours = build_model(Config(model=model)).eval()
    expected = map_hf_state_dict(hf.state_dict())
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    with pytest.raises(ValueError, match="rope_scaling"):  # a mismatched RoPE must not load silently
        build_model(Config(model=dataclasses.replace(model, rope_scaling=None)))


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    from transformers import AutoProcessor, CsmForConditionalGeneration

    from train import checkpoint, loop
    from train.config import load_config, parse_sets
    from train.export import export
    from train.testing import make_shards, tiny_tokenizer

    tiny_tokenizer(tmp_path / "tok")
    make_shards(tmp_path / "data", n_shards=2, per_shard=2)
    cfg = load_config("configs/train/tiny.yaml", parse_sets([
        f"data.tokenizer={tmp_path / 'tok'}", "data.allow_unreleased_codec=true", "data.num_workers=0",
        "data.eval_fraction=0", "train.sample_every=0"]))
    loop.run(cfg, str(tmp_path / "data"), str(tmp_path / "run"), max_steps=2)
    summary = export(tmp_path / "run", tmp_path / "hf")
    assert summary["step"] == 2 and summary["processor"] and not summary["codec_weights"]
    hf = CsmForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours, _, _ = checkpoint.load_run_model(tmp_path / "run")
    assert_logits_equal(hf, ours)
    assert hf.generation_config.do_sample and hf.depth_decoder.generation_config.top_k == cfg.generate.top_k
    assert AutoProcessor.from_pretrained(tmp_path / "hf").tokenizer.bos_token_id == hf.config.bos_token_id
