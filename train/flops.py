"""Model FLOPs of a training step and MFU.

The PaLM convention: 6 FLOPs per matmul weight per position (forward + backward), plus attention at
12 x layers x dim x sequence length per position (no causal discount); embeddings are lookups and
count nothing. Per CSM micro-batch: the backbone on every row of the padded batch, the codebook-0 head
on every audio frame, and per decoder frame the projection and decoder on N positions and N-1 heads.
"""

from __future__ import annotations

import torch

from train.config import ModelConfig
from train.model import TransformerArgs, stack_args

# Dense bf16 peak TFLOP/s by device name (vendor datasheets); anything else needs train.peak_tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def _matmul_weights(a: TransformerArgs) -> int:
    hd = a.dim // a.n_heads
    return a.n_layers * (a.dim * hd * (2 * a.n_heads + 2 * a.n_kv_heads) + 3 * a.dim * a.ffn_dim)


def batch_flops(cfg: ModelConfig, batch_size: int, seq_len: int, c0_frames: int, decoder_frames: int) -> float:
    """FLOPs of forward + backward for one micro-batch of [batch_size, seq_len] rows."""
    b, d = stack_args(cfg)
    N, V = cfg.num_codebooks, cfg.audio_vocab_size
    positions = batch_size * seq_len
    backbone = positions * (6 * _matmul_weights(b) + 12 * b.n_layers * b.dim * seq_len)
    decoder = decoder_frames * (N * (6 * _matmul_weights(d) + 12 * d.n_layers * d.dim * N + 6 * b.dim * d.dim)
                                + (N - 1) * 6 * d.dim * V)
    return float(backbone + c0_frames * 6 * b.dim * V + decoder)


def peak_tflops(configured: float | None, device: torch.device, dtype: str) -> float | None:
    """train.peak_tflops, else the table's bf16 figure for a known GPU; None: MFU is not logged."""
    if configured:
        return configured
    if device.type != "cuda" or dtype != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
