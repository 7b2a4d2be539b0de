"""``mc_count``: l uniform in 1..L, a uniformly random subset of l tokens masked, value (L / l) * f(S);
the expectation is sum_l (1/L) (L/l) mean f = E exactly."""
from __future__ import annotations

import torch

from harness.models.diffusion.estimators.common import ESTIMATORS, Plan


@ESTIMATORS.register("mc_count")
def plan_mc_count(length: int, samples: int, eps: float, gen: torch.Generator) -> Plan:
    n_masked = torch.randint(1, length + 1, (samples,), generator=gen)
    ranks = torch.rand(samples, length, generator=gen).argsort(dim=1).argsort(dim=1)
    masked = ranks < n_masked[:, None]
    return Plan(masked, masked, length / n_masked.double(), exact=False)
