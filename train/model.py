"""CSM: a Llama-style backbone over 33-column rows and a small Llama-style decoder over codebooks.

Computes what transformers' `CsmForConditionalGeneration` computes (tests/test_train_reference.py
checks logits against it); train/hf.py maps its weights and config both ways. Both stacks take an
optional `KVCache` for generation (train/generate.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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
_SPEC = re.compile(r"^layers=(\d+),dim=(\d+),heads=(\d+),kv_heads=(\d+),ffn=(\d+)$")


def transformer_args(name: str) -> TransformerArgs:
    """A flavour name, or an explicit shape `layers=L,dim=D,heads=H,kv_heads=K,ffn=F` (what a
    transformers checkpoint's config.json resolves to, so a run records its exact architecture)."""
    if name in FLAVOURS:
        return FLAVOURS[name]
    m = _SPEC.match(name.replace(" ", ""))
    if not m:
        raise ValueError(f"unknown transformer shape '{name}': a flavour ({sorted(FLAVOURS)}) or "
                         "'layers=L,dim=D,heads=H,kv_heads=K,ffn=F'")
    return TransformerArgs(*(int(g) for g in m.groups()))


def stack_args(cfg: ModelConfig) -> tuple[TransformerArgs, TransformerArgs]:
    """(backbone, decoder) shapes of a model config."""
    if cfg.flavour not in PAIRS:
        raise ValueError(f"model.flavour must be one of {sorted(PAIRS)}, got '{cfg.flavour}'")
    return transformer_args(cfg.backbone or PAIRS[cfg.flavour][0]), transformer_args(cfg.decoder or PAIRS[cfg.flavour][1])


def shape_spec(a: TransformerArgs) -> str:
    return f"layers={a.n_layers},dim={a.dim},heads={a.n_heads},kv_heads={a.n_kv_heads},ffn={a.ffn_dim}"


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


class KVCache:
    """Preallocated keys/values of every layer of one stack, for generation: a prefill from empty
    (causal), then one position per call."""

    def __init__(self, a: TransformerArgs, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (a.n_layers, batch, a.n_kv_heads, max_len, a.dim // a.n_heads)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache full: {end} positions > {self.k.shape[3]}")
        if self.pos and k.shape[2] > 1:
            raise ValueError("KV cache: only a prefill from empty may hold several positions")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Right padding only, so a plain causal mask is exact for every real position; a single
        # cached step attends to everything before it.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
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

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Layers + final norm; no embeddings or heads (the caller owns those)."""

    def __init__(self, a: TransformerArgs, max_seq_len: int, cfg: ModelConfig):
        super().__init__()
        self.args = a
        self.layers = nn.ModuleList(Block(a, cfg.norm_eps) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, cfg.norm_eps)
        self.activation_checkpointing = False
        self.max_seq_len, self.rope = max_seq_len, (cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        """RoPE tables: not in the state dict, so recomputed after a meta-device build (to_empty)."""
        inv = rope_frequencies(self.args.dim // self.args.n_heads, *self.rope).to(device)
        freqs = torch.outer(torch.arange(self.max_seq_len, device=device).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start = cache.pos if cache is not None else 0
        end = start + x.shape[1]
        cos, sin = self.rope_cos[start:end].to(x.dtype), self.rope_sin[start:end].to(x.dtype)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos = end
        return self.norm(x)


class CSM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b, d = stack_args(cfg)
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
        self.register_buffer("audio_offsets", None, persistent=False)
        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self, device=None) -> None:
        """Non-persistent buffers (RoPE tables, codebook offsets), e.g. after to_empty()."""
        self.backbone.init_buffers(device)
        self.decoder.init_buffers(device)
        self.audio_offsets = torch.arange(self.N, device=device) * self.V

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
