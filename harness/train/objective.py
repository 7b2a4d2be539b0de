"""The adaptation objective (arXiv 2410.17891, Algorithm 1): masking, annealed attention, shifted loss.

All randomness comes from generators seeded by (seed, step, stream), drawn for the whole global
batch at once, so a run is reproducible across resumes and process counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_NORMALISATION = "sum over masked tokens of CE/t, divided by the number of masked tokens in the global batch"
NOISE, ATTENTION, DROPOUT = 0, 1, 2  # generator streams


def stream_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for one random stream of one optimizer step."""
    return ((seed * 1_000_003 + step) * 8 + stream) % (2**63)


def generator(seed: int, step: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seed(seed, step, stream))


def sample_noise(gen: torch.Generator, n: int, seq_len: int, min_t: float,
                 stratified: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence t ~ U(min_t, 1) and per token u ~ U(0, 1); a token is masked when u < t.

    ``stratified`` gives each of the n sequences its own 1/n-wide stratum of [min_t, 1) in random
    order: every t is still uniform, but the batch covers all noise levels (lower-variance loss).
    """
    offset = torch.rand(n, generator=gen)
    unit = (torch.randperm(n, generator=gen) + offset) / n if stratified else offset
    u = torch.rand(n, seq_len, generator=gen)
    return min_t + (1 - min_t) * unit, u


def protected_positions(loss_start: torch.Tensor, seq_len: int, shift: bool) -> torch.Tensor:
    """[n, seq_len] bool: prompt positions, and position 0 when shifted (no logit predicts it)."""
    start = loss_start.clamp(min=1) if shift else loss_start
    return torch.arange(seq_len)[None, :] < start[:, None]


def per_token(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Masking rates as [n, N]: per sequence ([n], the full-attention recipe) or already per token
    ([n, N], the block recipe's per-block rates, ``harness.train.blocks``)."""
    return t[:, None].expand_as(like) if t.ndim == 1 else t


def mask_tokens(input_ids: torch.Tensor, t: torch.Tensor, u: torch.Tensor, protected: torch.Tensor,
                mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each unprotected token by ``mask_id`` with probability t; return (noisy ids, masked)."""
    masked = (u < per_token(t, u)) & ~protected
    return input_ids.masked_fill(masked, mask_id), masked


def anneal_ratio(step: int, anneal: bool, anneal_steps: int) -> float:
    """Share of non-causal (query, key) pairs opened at ``step``: 0 -> 1 linearly, then 1."""
    if not anneal or anneal_steps <= 0:
        return 1.0
    return min(step / anneal_steps, 1.0)


def attention_mask(seq_len: int, batch: int, ratio: float, gen: torch.Generator | None,
                   dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Additive [batch, 1, N, N] mask: causal OR Bernoulli(ratio) per pair; all zeros once ratio >= 1.

    0 attends, ``finfo(dtype).min`` blocks. One draw is shared by the whole global batch of a step.
    """
    if ratio >= 1:
        return torch.zeros(1, 1, seq_len, seq_len, dtype=dtype, device=device).expand(batch, 1, -1, -1)
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if ratio > 0:
        allowed |= torch.rand(seq_len, seq_len, generator=gen, device=device) < ratio
    mask = torch.zeros(seq_len, seq_len, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None].expand(batch, 1, -1, -1)


def masked_losses(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                  shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE/t, sum of CE) over masked tokens; shifted, token j is read from the logits at j-1.

    ``t``: [n] per sequence or [n, N] per token (see :func:`per_token`)."""
    rates = per_token(t, masked)
    if shift:
        logits, targets, masked, rates = logits[:, :-1], targets[:, 1:], masked[:, 1:], rates[:, 1:]
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    weight = 1.0 / rates.to(ce.device)[masked]
    return (ce * weight).sum(), ce.sum()
