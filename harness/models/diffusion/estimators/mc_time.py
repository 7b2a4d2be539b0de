"""``mc_time``: t_s = eps + (1 - eps) * (s + u_s) / S (stratified, u_s ~ U(0, 1)), each token masked
with probability t_s, sample value f(S) / t_s. Since C(L, k) * integral of t^(k-1) (1-t)^(L-k) dt
over (0, 1) is 1/k, the expectation is E, up to an O(eps) bias from cutting t at ``eps``
(default 1e-3, which keeps the weight 1/t bounded by 1000)."""
from __future__ import annotations

import torch

from harness.models.diffusion.estimators.common import ESTIMATORS, Plan


@ESTIMATORS.register("mc_time")
def plan_mc_time(length: int, samples: int, eps: float, gen: torch.Generator) -> Plan:
    strata = torch.arange(samples, dtype=torch.float64)
    t = eps + (1 - eps) * (strata + torch.rand(samples, generator=gen, dtype=torch.float64)) / samples
    masked = torch.rand(samples, length, generator=gen, dtype=torch.float64) < t[:, None]
    return Plan(masked, masked, 1 / t, exact=False)
