"""What every likelihood estimator shares: the request and result types, the plan an estimator
returns, the registry and the seeded generator.

An estimator is a plan function registered as ``@ESTIMATORS.register("name")``:
``plan(length, samples, eps, generator) -> Plan`` lays out the masked copies of one continuation of
``length`` tokens (``samples`` and ``eps`` as given to ``estimate``; ``generator`` is the request's
own, see :func:`seeded_generator`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from harness.registry import Registry

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LikelihoodRequest(NamedTuple):
    """Score ``continuation_ids`` after ``context_ids``; ``key`` seeds this request's masks."""

    context_ids: Sequence[int]
    continuation_ids: Sequence[int]
    key: str


@dataclass(frozen=True)
class Estimate:
    """``logprob``: the estimate; ``stderr``: std of the sample values / sqrt(samples) (0 for
    ``chain_rule``, NaN for a single sample); ``nfe``: model rows this request spent (CFG doubles)."""

    logprob: float
    stderr: float
    is_greedy: bool
    n_tokens: int
    nfe: int


@dataclass(frozen=True)
class Plan:
    """The masked copies of one continuation and how their log-probs combine into the estimate."""

    inputs: torch.Tensor  # bool [K, L]: continuation positions masked in each model row
    targets: torch.Tensor  # bool [K, L]: positions whose log-probs a row's value sums
    weights: torch.Tensor  # float64 [K]: row value = weight * sum of its target log-probs
    exact: bool  # True: estimate = sum of row values; False: their mean (Monte Carlo)

    def combine(self, token_logp: torch.Tensor) -> tuple[float, float]:
        """(estimate, stderr) from the float64 log-probs [K, L] of every row's true tokens."""
        values = self.weights * torch.where(self.targets, token_logp, 0.0).sum(dim=1)
        if self.exact:
            return values.sum().item(), 0.0
        k = len(values)
        return values.mean().item(), values.std().item() / math.sqrt(k) if k > 1 else math.nan


ESTIMATORS: Registry[Callable[[int, int, float, torch.Generator], Plan]] = Registry(
    "likelihood estimator", ordered=True)


def seeded_generator(seed: int, key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from a stable hash of ``f"{seed}:{key}"`` (not Python's ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
