"""CSM: a Llama-style backbone over 33-column rows and a small Llama-style decoder over codebooks.

Computes what transformers' `CsmForConditionalGeneration` computes (tests/test_train_reference.py
checks logits against it); `load_hf_weights` maps its state dict onto this model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.config import ModelConfig


@dataclass(frozen=True)
class TransformerArgs:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int


FLAVOURS = {
    "tiny": TransformerArgs(2, 64, 4, 2, 128),
    "tiny-decoder": TransformerArgs(2, 32, 4, 2, 64),
    "1B": TransformerArgs(16, 2048, 32, 8, 8192),  # Llama-3.2-1B, as in the released CSM
    "100M": TransformerArgs(4, 1024, 8, 2, 8192),
    "3B": TransformerArgs(28, 3072, 24, 8, 8192),  # Llama-3.2-3B
    "250M": TransformerArgs(6, 1536, 12, 4, 8192),  # our choice: ~260M, not published
    "8B": TransformerArgs(32, 4096, 32, 8, 14336),  # Llama-3.1-8B
    "300M": TransformerArgs(7, 1536, 12, 4, 8192),  # our choice: ~310M, not published
}
PAIRS = {"tiny": ("tiny", "tiny-decoder"), "1B": ("1B", "100M"), "3B": ("3B", "250M"), "8B": ("8B", "300M")}


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    if scaling.get("rope_type", "llama3") != "llama3":
        raise ValueError(f"unsupported rope_scaling {scaling}")
    # Llama 3: divide low frequencies by `factor`, keep high ones, interpolate in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Right padding only, so a plain causal mask is exact for every real position.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(a.ffn_dim, a.dim, bias=False)  # down
        self.w3 = nn.Linear(a.dim, a.ffn_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: TransformerArgs, eps: float):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(a.dim, eps), Attention(a)
        self.ffn_norm, self.feed_forward = RMSNorm(a.dim, eps), FeedForward(a)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Layers + final norm; no embeddings or heads (the caller owns those)."""

    def __init__(self, a: TransformerArgs, max_seq_len: int, cfg: ModelConfig):
        super().__init__()
        self.args = a
        self.layers = nn.ModuleList(Block(a, cfg.norm_eps) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, cfg.norm_eps)
        self.activation_checkpointing = False
        freqs = torch.outer(torch.arange(max_seq_len).float(), rope_frequencies(a.dim // a.n_heads, cfg.rope_theta, cfg.rope_scaling))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


class CSM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.flavour not in PAIRS:
            raise ValueError(f"model.flavour must be one of {sorted(PAIRS)}, got '{cfg.flavour}'")
        b = FLAVOURS[cfg.backbone or PAIRS[cfg.flavour][0]]
        d = FLAVOURS[cfg.decoder or PAIRS[cfg.flavour][1]]
        if cfg.text_vocab_size is None:
            raise ValueError("model.text_vocab_size must be resolved (from the tokenizer) before building")
        self.cfg, self.N, self.V = cfg, cfg.num_codebooks, cfg.audio_vocab_size
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, b.dim)
        # One table for all codebooks, codebook k at rows [k*V, (k+1)*V); shared with the decoder input.
        self.audio_embeddings = nn.Embedding(self.N * self.V, b.dim)
        self.backbone = Transformer(b, cfg.max_seq_len, cfg)
        self.codebook0_head = nn.Linear(b.dim, self.V, bias=False)
        self.projection = nn.Linear(b.dim, d.dim, bias=False)
        self.decoder = Transformer(d, self.N, cfg)
        self.audio_head = nn.Parameter(torch.empty(self.N - 1, d.dim, self.V))
        self.register_buffer("audio_offsets", torch.arange(self.N) * self.V, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=self.cfg.init_std)

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum of the filled columns' embeddings: [B, T, N+1] -> [B, T, D]."""
        B, T, _ = tokens.shape
        audio_ids = (tokens[..., : self.N] + self.audio_offsets).reshape(B * T, self.N)
        weights = mask[..., : self.N].reshape(B * T, self.N).to(self.audio_embeddings.weight.dtype)
        # embedding_bag sums the 32 codebook vectors without materialising [B, T, 32, D].
        audio = F.embedding_bag(audio_ids, self.audio_embeddings.weight, per_sample_weights=weights, mode="sum")
        text = self.text_embeddings(tokens[..., self.N]) * mask[..., self.N : self.N + 1].to(audio.dtype)
        return audio.view(B, T, -1) + text

    def hidden(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.embed(tokens, mask))

    def decoder_logits(self, h_prev: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Logits for codebooks 1..N-1 of M frames: h_prev [M, D] (backbone state before each frame),
        codes [M, N] (teacher forcing). Decoder position 0 is h_prev, position k the codebook k-1 embedding."""
        emb = self.audio_embeddings(codes[:, : self.N - 1] + self.audio_offsets[: self.N - 1])
        x = self.decoder(self.projection(torch.cat([h_prev.unsqueeze(1), emb], dim=1)))
        return torch.einsum("mkd,kdv->mkv", x[:, 1:], self.audio_head)

    def forward(self, tokens, mask, c0_index, dec_index):
        """c0_index, dec_index: (batch idx, position) of audio frames to score. Both codebook 0 and the
        decoder for frame t are conditioned on the backbone state at t-1, the position that predicts it."""
        h = self.hidden(tokens, mask)
        c0_logits = self.codebook0_head(h[c0_index[0], c0_index[1] - 1])
        dec_logits = self.decoder_logits(h[dec_index[0], dec_index[1] - 1], tokens[dec_index[0], dec_index[1], : self.N])
        return c0_logits, dec_logits


# --- transformers-format weights -------------------------------------------------------------

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
_LAYER_RE = re.compile(r"^(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)\.weight$")


def map_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `CsmForConditionalGeneration` state dict -> ours. The codec is dropped; the decoder's
    codebook embedding must equal the backbone's (CSM ties them)."""
    out = {}
    for key, value in hf.items():
        if key.startswith("codec_model.") or key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "depth_decoder.model.embed_tokens.weight":
            # Tied to the backbone's codebook table; a saved checkpoint may keep only one of the two.
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
        stack = "backbone" if m.group(1) == "backbone_model" else "decoder"
        out[f"{stack}.layers.{m.group(2)}.{_LAYER_MAP[m.group(3)]}.weight"] = value
    return out


def load_hf_weights(model: CSM, path_or_id: str) -> None:
    """Load released transformers-format CSM weights (e.g. `sesame/csm-1b`) from a dir or the hub."""
    path = Path(path_or_id)
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(path_or_id, allow_patterns=["*.safetensors", "config.json"]))
        except Exception as e:  # noqa: BLE001 - offline, gated, typo: all need the same advice
            raise RuntimeError(
                f"cannot load CSM weights '{path_or_id}' ({e}); set model.init_from to a local directory "
                "with the transformers-format safetensors (e.g. a download of sesame/csm-1b) or null"
            ) from e
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {path} (model.init_from)")
    if (path / "config.json").exists():
        theirs = json.loads((path / "config.json").read_text()).get("rope_scaling") or {}
        ours = model.cfg.rope_scaling or {}
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(theirs.get(k) != ours.get(k) for k in keys):
            raise ValueError(f"model.rope_scaling {ours} does not match the checkpoint's {theirs}")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    model.load_state_dict(map_hf_state_dict(hf), strict=True)
