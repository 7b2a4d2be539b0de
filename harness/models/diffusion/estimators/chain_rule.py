"""``chain_rule``: exact log p(x | context) of the left-to-right unmasking order: the j-th of L rows
reveals x_<j, masks x_>=j and scores x_j."""
from __future__ import annotations

import torch

from harness.models.diffusion.estimators.common import ESTIMATORS, Plan


@ESTIMATORS.register("chain_rule")
def plan_chain_rule(length: int, samples: int, eps: float, gen: torch.Generator) -> Plan:
    positions = torch.arange(length)
    masked = positions[None, :] >= positions[:, None]
    targets = torch.eye(length, dtype=torch.bool)
    return Plan(masked, targets, torch.ones(length, dtype=torch.float64), exact=True)
