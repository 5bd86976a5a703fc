"""Targets and losses: codebook 0 on every audio frame, the decoder on a random subset of frames.

Losses are returned as sums with their counts so the loop can normalise by the global count
(all micro-batches, all ranks): the result then does not depend on how a batch is split.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F


def audio_positions(mask: torch.Tensor, num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch idx, position) of every audio frame with a predecessor, end-of-audio frames included."""
    audio = mask[..., 0].clone()
    audio[:, 0] = False  # nothing predicts position 0 (samples start with text anyway)
    return audio.nonzero(as_tuple=True)


def decoder_subset_size(n_frames: int, fraction: float) -> int:
    """Compute amortization: round(fraction * frames), never 0 (an empty set gives a NaN loss)."""
    return min(n_frames, max(1, round(n_frames * fraction)))


def sample_seed(seed: int, step: int, key: str) -> int:
    # Seeded by the sample's key, not its place in the batch, so any split over ranks or
    # micro-batches selects the same frames; by step, so the subset changes every step.
    return zlib.crc32(f"{seed}:{step}:{key}".encode())


def select_decoder_frames(batch: dict, fraction: float, seed: int, step: int, num_codebooks: int):
    """Per sample, a random subset of its audio frames for the decoder: (batch idx, position)."""
    b_idx, t_idx = audio_positions(batch["mask"], num_codebooks)
    chosen_b, chosen_t = [], []
    for b, key in enumerate(batch["keys"]):
        t = t_idx[b_idx == b]
        g = torch.Generator().manual_seed(sample_seed(seed, step, key))
        pick = torch.randperm(len(t), generator=g)[: decoder_subset_size(len(t), fraction)]
        chosen_t.append(t[pick.sort().values])
        chosen_b.append(torch.full((len(pick),), b, dtype=torch.long))
    return torch.cat(chosen_b), torch.cat(chosen_t)


def prepare(batch: dict, fraction: float, seed: int, step: int, num_codebooks: int) -> dict:
    """Adds the frame indices and target counts the loss needs; cheap, so counts are known before
    any forward pass."""
    c0 = audio_positions(batch["mask"], num_codebooks)
    dec = select_decoder_frames(batch, fraction, seed, step, num_codebooks)
    return {
        **batch,
        "c0_index": c0,
        "dec_index": dec,
        "c0_count": len(c0[0]),
        "dec_count": len(dec[0]) * (num_codebooks - 1),
    }


def loss_sums(model, batch: dict, num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of codebook 0 over all audio frames and of codebooks 1..N-1 over the
    decoder subset."""
    tokens = batch["tokens"]
    c0_logits, dec_logits = model(tokens, batch["mask"], batch["c0_index"], batch["dec_index"])
    c0_target = tokens[batch["c0_index"][0], batch["c0_index"][1], 0]
    dec_target = tokens[batch["dec_index"][0], batch["dec_index"][1], 1:num_codebooks]
    c0 = F.cross_entropy(c0_logits.float(), c0_target, reduction="sum")
    dec = F.cross_entropy(dec_logits.float().flatten(0, 1), dec_target.flatten(), reduction="sum")
    return c0, dec
