"""Targets and losses: codebook 0 on every audio frame; the decoder on every end-of-audio frame (so
a model learns to stop: generation ends on an all-zero frame) plus a random subset of the others.

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


def end_of_audio(tokens: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """Which of the given audio frames are end-of-audio frames (all codes 0)."""
    return (tokens[b_idx, t_idx, :num_codebooks] == 0).all(-1)


def select_decoder_frames(batch: dict, fraction: float, seed: int, step: int, num_codebooks: int):
    """Per sample, its end-of-audio frames and a random `fraction` of its other audio frames (at
    least one): (batch idx, position), in order."""
    b_idx, t_idx = audio_positions(batch["mask"], num_codebooks)
    eos = end_of_audio(batch["tokens"], b_idx, t_idx, num_codebooks)
    chosen_b, chosen_t = [], []
    for b, key in enumerate(batch["keys"]):
        mine = b_idx == b
        t, always = t_idx[mine & ~eos], t_idx[mine & eos]
        g = torch.Generator().manual_seed(sample_seed(seed, step, key))
        pick = t[torch.randperm(len(t), generator=g)[: decoder_subset_size(len(t), fraction)]]
        chosen_t.append(torch.cat([pick, always]).sort().values)
        chosen_b.append(torch.full((len(pick) + len(always),), b, dtype=torch.long))
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
    decoder frames."""
    sums = codebook_loss_sums(model, batch, num_codebooks)
    return sums[0], sums[1:].sum()


def codebook_loss_sums(model, batch: dict, num_codebooks: int) -> torch.Tensor:
    """Summed cross-entropy per codebook [N]: codebook 0 over c0_index, the others over dec_index."""
    tokens = batch["tokens"]
    c0_logits, dec_logits = model(tokens, batch["mask"], batch["c0_index"], batch["dec_index"])
    c0_target = tokens[batch["c0_index"][0], batch["c0_index"][1], 0]
    dec_target = tokens[batch["dec_index"][0], batch["dec_index"][1], 1:num_codebooks]
    c0 = F.cross_entropy(c0_logits.float(), c0_target, reduction="sum")
    dec = F.cross_entropy(dec_logits.float().transpose(1, 2), dec_target, reduction="none").sum(0)
    return torch.cat([c0[None], dec])
