"""transformers-format CSM (`CsmForConditionalGeneration`, e.g. sesame/csm-1b) in and out.

In (`model.init_from`): the architecture comes from the checkpoint's config.json, the weights are
mapped onto ours. RoPE compatibility is decided by the frequencies each stack computes (transformers'
own RoPE functions on their config, ours on ours), never by comparing scaling dicts: transformers'
conversion writes Sesame's llama3 scaling in an equivalent but different-looking form.
Out (`export`): our weights and config as a directory `CsmForConditionalGeneration.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from train.config import ModelConfig
from train.model import CSM, TransformerArgs, rope_frequencies, shape_spec, stack_args


_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP = {
    "embed_text_tokens.weight": "text_embeddings.weight",
    "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embeddings.weight",
    "lm_head.weight": "codebook0_head.weight",
    "backbone_model.norm.weight": "backbone.norm.weight",
    "depth_decoder.model.norm.weight": "decoder.norm.weight",
    "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
    "depth_decoder.codebooks_head.weight": "audio_head",
}
_DECODER_EMBED = "depth_decoder.model.embed_tokens.weight"  # tied to the backbone's codebook table
_STACKS = {"backbone_model": "backbone", "depth_decoder.model": "decoder"}
_LAYER_RE = re.compile(r"^(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)\.weight$")
CODEC_PREFIX = "codec_model."
WEIGHT_FILES = ["*.safetensors", "*.json", "*.jinja", "*.model", "*.txt"]


def map_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `CsmForConditionalGeneration` state dict -> ours. The codec is dropped; the decoder's
    codebook embedding must equal the backbone's (CSM ties them)."""
    out = {}
    for key, value in hf.items():
        if key.startswith(CODEC_PREFIX) or key.endswith("rotary_emb.inv_freq"):
            continue
        if key == _DECODER_EMBED:
            # A saved checkpoint may keep only one of the two tied tables.
            tied = hf.get("backbone_model.embed_tokens.embed_audio_tokens.weight")
            if tied is not None and not torch.equal(tied, value):
                raise ValueError("checkpoint has untied decoder codebook embeddings; this model ties them")
            out["audio_embeddings.weight"] = value
            continue
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
            continue
        m = _LAYER_RE.match(key)
        if not m or m.group(3) not in _LAYER_MAP:
            raise KeyError(f"unexpected key in transformers CSM checkpoint: {key}")
        out[f"{_STACKS[m.group(1)]}.layers.{m.group(2)}.{_LAYER_MAP[m.group(3)]}.weight"] = value
    return out


def to_hf_state_dict(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> transformers names. Both tied codebook tables, as separate tensors: written once,
    transformers 4.57 ties the missing one the wrong way round and leaves it unloaded."""
    top = {v: k for k, v in _TOP_MAP.items()}
    layer = {v: k for k, v in _LAYER_MAP.items()}
    stacks = {v: k for k, v in _STACKS.items()}
    out = {}
    for key, value in ours.items():
        if key in top:
            out[top[key]] = value
            continue
        stack, _, i, *rest = key.split(".")
        out[f"{stacks[stack]}.layers.{i}.{layer['.'.join(rest[:-1])]}.weight"] = value
    out[_DECODER_EMBED] = ours["audio_embeddings.weight"].clone()
    return out


def resolve(path_or_id: str, what: str = "model.init_from") -> Path:
    """A local directory, or a hub snapshot (weights, configs, tokenizer files)."""
    path = Path(path_or_id)
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, allow_patterns=WEIGHT_FILES))
    except Exception as e:  # noqa: BLE001 - offline, gated, typo: all need the same advice
        raise RuntimeError(
            f"cannot load CSM weights '{path_or_id}' ({type(e).__name__}: {e}); set {what} to a local directory "
            "with the transformers-format checkpoint (e.g. a download of sesame/csm-1b) or log in to the hub"
        ) from e


def _stack(c, name: str) -> TransformerArgs:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    problems = [f"{k}=true" for k in ("attention_bias", "mlp_bias") if getattr(c, k, False)]
    if head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(f"head_dim={head_dim} != hidden_size/num_attention_heads")
    if c.hidden_act != "silu":
        problems.append(f"hidden_act={c.hidden_act}")
    if problems:
        raise ValueError(f"{name} of the checkpoint is not a Llama block this model builds: {', '.join(problems)}")
    return TransformerArgs(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                           c.intermediate_size)


def hf_inv_freq(stack_config) -> torch.Tensor:
    """The inverse RoPE frequencies transformers computes for one stack's config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = (stack_config.rope_scaling or {}).get("rope_type", "default")
    return ROPE_INIT_FUNCTIONS[rope_type](stack_config, "cpu")[0]


def check_rope(cfg: ModelConfig, hf_config) -> None:
    """Both stacks' frequencies must equal ours (model.rope_theta, model.rope_scaling)."""
    for name, c in (("backbone", hf_config), ("depth decoder", hf_config.depth_decoder_config)):
        theirs = hf_inv_freq(c)
        ours = rope_frequencies(c.hidden_size // c.num_attention_heads, cfg.rope_theta, cfg.rope_scaling)
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=0):
            diff = (theirs - ours).abs().max().item() if theirs.shape == ours.shape else "shape"
            raise ValueError(
                f"model.rope_scaling {cfg.rope_scaling} / model.rope_theta {cfg.rope_theta} give other RoPE "
                f"frequencies than the checkpoint's {name} (rope_theta {c.rope_theta}, rope_scaling "
                f"{c.rope_scaling}; max difference {diff}): set them to the checkpoint's"
            )


def model_config_from_hf(cfg: ModelConfig, path: Path) -> ModelConfig:
    """`cfg` with the architecture of the checkpoint at `path` (config.json)."""
    from transformers import CsmConfig

    c = CsmConfig.from_pretrained(str(path))
    d = c.depth_decoder_config
    if not c.tie_codebooks_embeddings:
        raise ValueError(f"{path}: tie_codebooks_embeddings=false; this model ties the codebook tables")
    for key in ("num_codebooks", "vocab_size"):
        if getattr(d, key) != getattr(c, key):
            raise ValueError(f"{path}: depth decoder {key}={getattr(d, key)} != backbone {key}={getattr(c, key)}")
    if d.backbone_hidden_size != c.hidden_size:
        raise ValueError(f"{path}: depth decoder backbone_hidden_size={d.backbone_hidden_size} != hidden_size={c.hidden_size}")
    check_rope(cfg, c)
    return dataclasses.replace(
        cfg, backbone=shape_spec(_stack(c, "backbone")), decoder=shape_spec(_stack(d, "depth decoder")),
        num_codebooks=c.num_codebooks, audio_vocab_size=c.vocab_size, text_vocab_size=c.text_vocab_size,
        norm_eps=c.rms_norm_eps,
    )


def load_hf_weights(model: CSM, path: Path) -> None:
    """Load the checkpoint's weights into `model` (its codec, if any, is not ours: export copies it)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {path} (model.init_from)")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    model.load_state_dict(map_hf_state_dict(hf), strict=True)


def _released_form(scaling: dict | None, max_positions: int) -> dict | None:
    """Llama-3 scaling rewritten around original length `max_positions // 2`, as transformers'
    conversion writes it (same frequencies: every threshold is original/low and original/high)."""
    if not scaling:
        return None
    k = (max_positions // 2) / scaling["original_max_position_embeddings"]
    return {**scaling, "original_max_position_embeddings": max_positions // 2,
            "low_freq_factor": scaling["low_freq_factor"] * k, "high_freq_factor": scaling["high_freq_factor"] * k}


def hf_config(cfg: ModelConfig, bos_token_id: int | None = None):
    from transformers import CsmConfig

    b, d = stack_args(cfg)
    dd = dict(num_codebooks=cfg.num_codebooks, backbone_hidden_size=b.dim, vocab_size=cfg.audio_vocab_size,
              hidden_size=d.dim, intermediate_size=d.ffn_dim, num_hidden_layers=d.n_layers,
              num_attention_heads=d.n_heads, num_key_value_heads=d.n_kv_heads, max_position_embeddings=cfg.num_codebooks + 1,
              rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
              rope_scaling=_released_form(cfg.rope_scaling, cfg.num_codebooks + 1))
    extra = {"bos_token_id": bos_token_id} if bos_token_id is not None else {}
    return CsmConfig(num_codebooks=cfg.num_codebooks, vocab_size=cfg.audio_vocab_size, text_vocab_size=cfg.text_vocab_size,
                     hidden_size=b.dim, intermediate_size=b.ffn_dim, num_hidden_layers=b.n_layers,
                     num_attention_heads=b.n_heads, num_key_value_heads=b.n_kv_heads,
                     max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                     rope_scaling=_released_form(cfg.rope_scaling, cfg.max_seq_len), depth_decoder_config=dd, **extra)



def load_hf_model(path: Path) -> CSM:
    """Our model with the weights and RoPE of a transformers-format checkpoint (for generation):
    its backbone's scaling is adopted, and must give the decoder's frequencies too."""
    from transformers import CsmConfig

    c = CsmConfig.from_pretrained(str(path))
    scaling = c.rope_scaling if (c.rope_scaling or {}).get("rope_type", "default") != "default" else None
    base = ModelConfig(rope_theta=c.rope_theta, rope_scaling=scaling, max_seq_len=c.max_position_embeddings,
                       init_from=str(path))
    model = CSM(model_config_from_hf(base, path))
    load_hf_weights(model, path)
    return model
