"""Greedy checks: how ``Estimate.is_greedy`` is decided (every estimator), chosen by ``greedy``:

* ``parallel``: one row with the whole continuation masked; the argmax at every continuation
  position equals the continuation (one-pass parallel greedy decoding reproduces it).
* ``sequential``: SMDM's and LLaDA's ``suffix_greedy_prediction`` (SMDM ``evaluate_diff.py``, LLaDA
  ``evaluation/eval_llada.py``): the continuation starts fully masked and each of L passes reveals
  only the most confident masked position with its argmax (the mask token included, as theirs:
  a position that receives it stays masked); the result must equal the continuation. L rows.
"""
from __future__ import annotations

from typing import Sequence

import torch

from harness.models.diffusion.estimators.common import Denoiser, LikelihoodRequest
from harness.models.diffusion.estimators.scoring import guided_logprobs, logits_at, right_pad, span_positions

GREEDY_CHECKS = ("parallel", "sequential")


def with_parallel_row(inputs: torch.Tensor, greedy: str) -> tuple[torch.Tensor, int]:
    """A plan's masks, plus a fully masked row for the ``parallel`` check when the plan has none,
    and the index of the plan's (or the added) fully masked row; -1 if there is none."""
    all_masked = inputs.all(dim=1).nonzero()
    if len(all_masked) or greedy == "sequential":
        return inputs, int(all_masked[0]) if len(all_masked) else -1
    return torch.cat([inputs, torch.ones(1, inputs.shape[1], dtype=torch.bool)]), len(inputs)


def sequential_greedy(
    denoise: Denoiser, requests: Sequence[LikelihoodRequest], *, mask_id: int, batch_size: int = 32,
    cfg_scale: float = 0.0,
) -> list[bool]:
    """Per request: does one-token-at-a-time greedy unmasking reproduce the continuation? (See the
    module docstring.) Requests are batched; pass j runs every request with more than j tokens."""
    states = [list(context) + [mask_id] * len(continuation) for context, continuation, _ in requests]
    starts = [len(context) for context, _, _ in requests]
    copies = 2 if cfg_scale else 1
    per_call = max(1, batch_size // copies)
    for step in range(max((len(c) for _, c, _ in requests), default=0)):
        live = [r for r, (_, continuation, _) in enumerate(requests) if step < len(continuation)]
        for chunk_start in range(0, len(live), per_call):
            chunk = live[chunk_start : chunk_start + per_call]
            inputs = [states[r] for r in chunk]
            if cfg_scale:
                inputs += [[mask_id] * starts[r] + states[r][starts[r]:] for r in chunk]
            spans = [(starts[r], len(states[r])) for r in chunk]
            logits = logits_at(denoise, *right_pad(inputs, mask_id), span_positions(spans * copies))
            for j, r in enumerate(chunk):
                n = len(states[r]) - starts[r]
                uncond = logits[j + len(chunk), :n] if cfg_scale else None
                logp = guided_logprobs(logits[j, :n], uncond, cfg_scale)
                masked = torch.tensor(states[r][starts[r]:], device=logp.device) == mask_id
                if not masked.any():
                    continue
                confidence, tokens = logp.max(-1)
                best = int(confidence.masked_fill(~masked, -torch.inf).argmax())
                states[r][starts[r] + best] = int(tokens[best])
    return [states[r][starts[r]:] == list(continuation) for r, (_, continuation, _) in enumerate(requests)]
