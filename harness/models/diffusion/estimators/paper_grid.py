"""The DiffuGPT/DiffuLLaMA multiple-choice protocol and its earlier reading.

* ``paper_grid``: ``eval_forward`` in their ``LLaMA-Factory/src/llamafactory/train/ddm/trainer.py``:
  for t = T/T, (T-1)/T, ..., 1/T with T = ``samples``, every continuation token is masked
  independently with probability t; the step's value is the mean log-prob over the masked tokens,
  and a step that masks nothing contributes 0 and still counts: the score is the sum over the grid
  divided by T, i.e. minus the average unweighted denoising loss. It ranks choices ("lowest loss
  wins") and is NOT a log-likelihood or a bound. For a one-token choice its expectation is
  log p * (T + 1) / (2T).
* ``paper_grid_forced``: the same grid, but a step that would mask nothing masks one uniformly
  drawn token instead (the harness's earlier reading of the protocol; for a one-token choice the
  expectation is log p, about twice ``paper_grid``'s).
"""
from __future__ import annotations

import torch

from harness.models.diffusion.estimators.common import ESTIMATORS, Plan


@ESTIMATORS.register("paper_grid")
def plan_paper_grid(length: int, samples: int, eps: float, gen: torch.Generator) -> Plan:
    return _grid(length, samples, gen, forced=False)


@ESTIMATORS.register("paper_grid_forced")
def plan_paper_grid_forced(length: int, samples: int, eps: float, gen: torch.Generator) -> Plan:
    return _grid(length, samples, gen, forced=True)


def _grid(length: int, steps: int, gen: torch.Generator, forced: bool) -> Plan:
    t = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    masked = torch.rand(steps, length, generator=gen, dtype=torch.float64) < t[:, None]
    if forced:
        fallback = torch.randint(0, length, (steps,), generator=gen)
        empty = ~masked.any(dim=1)
        masked[empty, fallback[empty]] = True
    counts = masked.sum(dim=1).double()
    # an empty step's value is 0 (weight 0, no target); it still counts in the mean over the grid
    return Plan(masked, masked, torch.where(counts > 0, 1 / counts.clamp(min=1), 0.0), exact=False)
