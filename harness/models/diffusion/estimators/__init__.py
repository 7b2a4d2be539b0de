"""Log-likelihood estimators for masked diffusion language models.

The model is reached through a denoiser callable, ``denoise(input_ids, attention_mask) -> logits``:

* ``input_ids``: LongTensor[B, N] on the CPU; some positions hold ``mask_id``. Rows are right-padded
  to the longest row of the call, and padding positions also hold ``mask_id``.
* ``attention_mask``: LongTensor[B, N], 1 for real tokens and 0 for padding. The backend must keep
  padding out of the attention keys; real tokens attend to each other fully (bidirectionally).
* returns logits FloatTensor[B, N, V] (any device or dtype) whose position ``i`` predicts the clean
  token at position ``i``; an AR-adapted ("shifted") model is un-shifted by the backend.

A request scores a continuation x (length L) after a context that is never masked. Write
f(S) = sum over i in S of log p(x_i | context, x with the positions S masked). The two Monte Carlo
estimators are unbiased for the absorbing-state diffusion ELBO (a lower bound on log p(x | context))

    E = sum_{k=1..L} (1/k) * mean over subsets S with |S| = k of f(S).

Methods, one module each (their docstrings give the details): ``mc_time`` and ``mc_count`` (Monte
Carlo estimates of E), ``paper_grid`` and ``paper_grid_forced`` (the DiffuGPT/DiffuLLaMA ranking
score, not a likelihood), ``chain_rule`` (exact, left to right). ``is_greedy`` comes from a greedy
check, ``parallel`` or ``sequential`` (module ``greedy``).

The random masks of a request come from a generator seeded by a hash of ``(seed, key)``, so an
estimate does not depend on the batch size, the order of requests or a resumed run.

Each method module registers its plan function with ``@ESTIMATORS.register("name")`` (see
``common``) and is imported below, which is what registers it: a new estimator is one new file
plus its import line here. ``METHODS`` is the registry itself, listed in import order.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import torch

from harness.errors import unknown_name
from harness.models.diffusion.estimators import mc_time, mc_count, paper_grid, chain_rule  # noqa: F401
from harness.models.diffusion.estimators.common import (ESTIMATORS, Denoiser, Estimate, LikelihoodRequest, Plan,
                                                        seeded_generator)
from harness.models.diffusion.estimators.greedy import GREEDY_CHECKS, sequential_greedy, with_parallel_row
from harness.models.diffusion.estimators.scoring import Row, guided_logprobs, right_pad, score_rows

__all__ = ["ESTIMATORS", "GREEDY_CHECKS", "METHODS", "Denoiser", "Estimate", "LikelihoodRequest", "Plan",
           "estimate", "guided_logprobs", "right_pad", "seeded_generator", "sequential_greedy"]

METHODS = ESTIMATORS


class _Planned(NamedTuple):
    plan: Plan
    first: int  # its first row
    greedy_row: int  # its fully masked row (-1: none)


def estimate(
    denoise: Denoiser,
    requests: Sequence[LikelihoodRequest],
    *,
    mask_id: int,
    method: str = "mc_time",
    samples: int = 32,
    seed: int = 0,
    batch_size: int = 32,
    eps: float = 1e-3,
    cfg_scale: float = 0.0,
    greedy: str = "parallel",
) -> list[Estimate]:
    """Estimate log p(continuation | context) for each request (see the module docstring).

    ``samples``: mask draws per request (the grid size T for ``paper_grid``; unused by
    ``chain_rule``). ``batch_size``: model rows per denoiser call; the rows of all requests are
    batched together. ``cfg_scale`` w > 0 adds an unconditional row per row (context masked).
    ``greedy``: how ``is_greedy`` is decided (``parallel`` | ``sequential``).
    """
    make_plan = ESTIMATORS.get(method)
    if greedy not in GREEDY_CHECKS:
        raise unknown_name("greedy check", greedy, GREEDY_CHECKS)
    if samples < 1 or not 0 <= eps < 1:
        raise ValueError(f"need samples >= 1 and 0 <= eps < 1, got samples={samples}, eps={eps}")
    plans: list[_Planned | None] = []
    rows: list[Row] = []
    for context, continuation, key in requests:
        if len(continuation) == 0:
            plans.append(None)
            continue
        plan = make_plan(len(continuation), samples, eps, seeded_generator(seed, key))
        inputs, greedy_row = with_parallel_row(plan.inputs, greedy)
        plans.append(_Planned(plan, len(rows), greedy_row))
        rows.extend(Row(context, continuation, masked) for masked in inputs)
    scored = score_rows(denoise, rows, mask_id=mask_id, batch_size=batch_size, cfg_scale=cfg_scale)
    sequential = iter(sequential_greedy(denoise, [r for r in requests if len(r.continuation_ids)], mask_id=mask_id,
                                        batch_size=batch_size, cfg_scale=cfg_scale)) if greedy == "sequential" else None
    copies = 2 if cfg_scale else 1
    return [_estimate(planned, len(continuation), rows, scored, sequential, copies)
            for (_, continuation, _), planned in zip(requests, plans)]


def _estimate(planned: _Planned | None, length: int, rows: list[Row], scored: list[tuple[torch.Tensor, torch.Tensor]],
              sequential: Iterator[bool] | None, copies: int) -> Estimate:
    """One request's estimate from its scored rows (and its ``sequential`` verdict, if checked so)."""
    if planned is None:
        return Estimate(0.0, 0.0, True, 0, 0)
    plan, first, greedy_row = planned
    n_rows = max(len(plan.inputs), greedy_row + 1)
    own = scored[first : first + n_rows]
    called = sum(bool(row.masked.any()) for row in rows[first : first + n_rows])
    logprob, stderr = plan.combine(torch.stack([logp for logp, _ in own[: len(plan.inputs)]]))
    if sequential is not None:
        is_greedy = next(sequential)
        called += length
    else:
        is_greedy = bool(own[greedy_row][1].all())
    return Estimate(logprob, stderr, is_greedy, length, called * copies)
