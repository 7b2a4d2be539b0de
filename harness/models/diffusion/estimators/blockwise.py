"""The block-diffusion likelihood (BD3-LM): log p(x | context) >= sum over blocks b of the ELBO of
x's part in block b given everything before it clean.

Blocks are the model's, ``block_size`` positions from the sequence's first token, so the first
block of a continuation after a context of c tokens holds ``block_size - c % block_size`` tokens
(context tokens sharing it stay clean). Block b's term is any estimator of ``estimate`` run on the
sub-request (context + x before b, x in b): its rows end at the block, since a block-causal model
never attends to anything later. Each block's masks come from its own generator (the request's
key and the block's index), so every estimator keeps its meaning per block: ``mc_time`` and
``mc_count`` are unbiased for the block ELBO, ``chain_rule`` is exact, and with ``block_size`` 1
the block ELBO is the exact left-to-right log-likelihood.

The parts combine as: log-probs and NFE add, standard errors add in quadrature, and a request is
greedy when every block is.
"""
from __future__ import annotations

import math
from typing import Sequence

from harness.models.diffusion.estimators.common import Denoiser, Estimate, LikelihoodRequest


def continuation_blocks(context_length: int, length: int, block_size: int) -> list[tuple[int, int]]:
    """The continuation's parts [lo, hi) in the model's blocks (see the module docstring)."""
    first = block_size - context_length % block_size
    edges = [0] + list(range(first, length, block_size)) + [length]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if lo < hi]


def block_requests(requests: Sequence[LikelihoodRequest], block_size: int) -> tuple[list[LikelihoodRequest], list[int]]:
    """Every request's per-block sub-requests, and which request each belongs to."""
    parts, owners = [], []
    for index, (context, continuation, key) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        for number, (lo, hi) in enumerate(continuation_blocks(len(context), len(continuation), block_size)):
            parts.append(LikelihoodRequest(context + continuation[:lo], continuation[lo:hi], f"{key}:block{number}"))
            owners.append(index)
    return parts, owners


def estimate_blockwise(denoise: Denoiser, requests: Sequence[LikelihoodRequest], *, block_size: int,
                       **settings) -> list[Estimate]:
    """``estimate`` (same ``settings``) of the block ELBO of each request."""
    from harness.models.diffusion.estimators import estimate

    parts, owners = block_requests(requests, block_size)
    estimates = estimate(denoise, parts, **settings) if parts else []
    grouped: list[list[Estimate]] = [[] for _ in requests]
    for owner, part in zip(owners, estimates):
        grouped[owner].append(part)
    return [combine(group) for group in grouped]


def combine(parts: list[Estimate]) -> Estimate:
    """One request's estimate from its blocks' (see the module docstring)."""
    if not parts:
        return Estimate(0.0, 0.0, True, 0, 0)
    variance = sum(p.stderr ** 2 for p in parts)
    return Estimate(sum(p.logprob for p in parts), math.sqrt(variance) if variance == variance else math.nan,
                    all(p.is_greedy for p in parts), sum(p.n_tokens for p in parts), sum(p.nfe for p in parts))
