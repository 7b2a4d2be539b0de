"""``threshold``: Fast-dLLM's parallel decoding (their ``llada/generate.py``), block by block: each
step proposes a token for every position of the current block and reveals, among its masked
positions, either

* every one whose confidence exceeds ``threshold`` (at least the most confident one), or, with
  ``factor`` f set, their factor rule (``get_transfer_index_dynamic``): with the block's masked
  confidences sorted c_1 >= c_2 >= ... >= c_m, the n most confident for the largest n such that
  every c_k with 2 <= k <= n has c_k >= 1 - f / (k + 1), i.e. (k + 1) * (1 - c_k) <= f (c_1
  always passes). As in their loop, when the first failure is the last one (k = m) all m are
  revealed anyway, so the last two masked positions of a block are always revealed together.

Proposals and confidences as ``common.sample_tokens``; EOS options as ``common.EosOptions``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from harness.models.diffusion.estimators import Denoiser
from harness.models.diffusion.samplers.common import (SAMPLERS, Canvas, EosOptions, FillRequest, SampleOutput,
                                                      decode_adaptively, sample_tokens)


def threshold_rule(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions whose confidence exceeds ``threshold``, else the most confident one (-inf: not masked)."""
    chosen = (confidence > threshold).nonzero().squeeze(-1)
    return chosen if len(chosen) else confidence.argmax()[None]


def factor_count(ordered: torch.Tensor, factor: float) -> int:
    """Fast-dLLM's factor rule on the masked confidences sorted high to low: how many to reveal."""
    m = len(ordered)
    limit = 1 - factor / torch.arange(2, m + 2, dtype=torch.float64, device=ordered.device)
    passes = (ordered.double() >= limit) & (ordered >= 0)  # demoted proposals (below 0) never pass
    passes[0] = True
    failures = (~passes).nonzero()
    count = int(failures[0]) if len(failures) else m
    return m if count == m - 1 else count


def factor_rule(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """The ``factor_count`` most confident masked positions (-inf: not masked)."""
    ordered = confidence[confidence > -torch.inf].sort(descending=True).values
    return confidence.topk(factor_count(ordered, factor)).indices


@SAMPLERS.register("threshold")
def threshold_sample(
    denoise: Denoiser,
    requests: Sequence[FillRequest],
    *,
    mask_id: int,
    threshold: float = 0.9,
    factor: float | None = None,
    block_length: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    cfg_scale: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
    eot_id: int | None = None,
    eos_stop: bool = False,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    aligned_blocks: bool = False,
) -> SampleOutput:
    """Fast-dLLM parallel decoding; at most n_tokens steps per row, one per block at ``threshold``
    0. ``factor``: use the factor rule instead of the threshold (None: the threshold rule).
    ``block_length``: default the whole fill region (one block)."""
    if factor is not None and factor <= 0:
        raise ValueError(f"factor must be > 0 or None, got {factor!r}")
    eos = EosOptions(eos_id, eot_id, eos_stop, logits_eos_inf, confidence_eos_eot_inf)

    def choose(logp: torch.Tensor, masked: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, confidence = sample_tokens(logp, gen, temperature=temperature, top_p=top_p)
        confidence = eos.rank(tokens, confidence).masked_fill(~masked.to(confidence.device), -torch.inf)
        chosen = threshold_rule(confidence, threshold) if factor is None else factor_rule(confidence, factor)
        return chosen, tokens[chosen]

    return decode_adaptively(denoise, Canvas(requests, mask_id, seed, block_length, aligned_blocks), eos, cfg_scale,
                             choose)
