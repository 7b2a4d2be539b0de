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

Methods:

* ``mc_time``: t_s = eps + (1 - eps) * (s + u_s) / S (stratified, u_s ~ U(0, 1)), each token masked
  with probability t_s, sample value f(S) / t_s. Since C(L, k) * integral of t^(k-1) (1-t)^(L-k) dt
  over (0, 1) is 1/k, the expectation is E, up to an O(eps) bias from cutting t at ``eps``
  (default 1e-3, which keeps the weight 1/t bounded by 1000).
* ``mc_count``: l uniform in 1..L, a uniformly random subset of l tokens masked, value (L / l) * f(S);
  the expectation is sum_l (1/L) (L/l) mean f = E exactly.
* ``paper_grid``: the DiffuGPT/DiffuLLaMA multiple-choice protocol (``eval_forward`` in their
  ``LLaMA-Factory/src/llamafactory/train/ddm/trainer.py``): for t = T/T, (T-1)/T, ..., 1/T with
  T = ``samples``, every continuation token is masked independently with probability t; the step's
  value is the mean log-prob over the masked tokens, and a step that masks nothing contributes 0
  and still counts: the score is the sum over the grid divided by T, i.e. minus the average
  unweighted denoising loss. It ranks choices ("lowest loss wins") and is NOT a log-likelihood or
  a bound. For a one-token choice its expectation is log p * (T + 1) / (2T).
* ``paper_grid_forced``: the same grid, but a step that would mask nothing masks one uniformly
  drawn token instead (the harness's earlier reading of the protocol; for a one-token choice the
  expectation is log p, about twice ``paper_grid``'s).
* ``chain_rule``: exact log p(x | context) of the left-to-right unmasking order: the j-th of L rows
  reveals x_<j, masks x_>=j and scores x_j.

``is_greedy`` (every method) by ``greedy``:

* ``parallel``: one row with the whole continuation masked; the argmax at every continuation
  position equals the continuation (one-pass parallel greedy decoding reproduces it).
* ``sequential``: SMDM's and LLaDA's ``suffix_greedy_prediction`` (SMDM ``evaluate_diff.py``, LLaDA
  ``evaluation/eval_llada.py``): the continuation starts fully masked and each of L passes reveals
  only the most confident masked position with its argmax (the mask token included, as theirs:
  a position that receives it stays masked); the result must equal the continuation. L rows.

The random masks of a request come from a generator seeded by a hash of ``(seed, key)``, so an
estimate does not depend on the batch size, the order of requests or a resumed run.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from harness.errors import unknown_name

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("mc_time", "mc_count", "paper_grid", "paper_grid_forced", "chain_rule")
GREEDY_CHECKS = ("parallel", "sequential")


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
class _Plan:
    """The masked copies of one continuation and how their log-probs combine into the estimate."""

    inputs: torch.Tensor  # bool [K, L]: continuation positions masked in each model row
    targets: torch.Tensor  # bool [K, L]: positions whose log-probs a row's value sums
    weights: torch.Tensor  # float64 [K]: row value = weight * sum of its target log-probs
    exact: bool  # True: estimate = sum of row values; False: their mean (Monte Carlo)


class _Row(NamedTuple):
    context_ids: Sequence[int]
    continuation_ids: Sequence[int]
    masked: torch.Tensor  # bool [L]


def seeded_generator(seed: int, key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from a stable hash of ``f"{seed}:{key}"`` (not Python's ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def guided_logprobs(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None, cfg_scale: float
) -> torch.Tensor:
    """Float32 log-probs; with an unconditional pass, SMDM's guidance
    log_softmax((1 + w) * logp_cond - w * logp_uncond)."""
    cond = cond_logits.float().log_softmax(-1)
    if uncond_logits is None:
        return cond
    uncond = uncond_logits.float().log_softmax(-1)
    return ((1 + cfg_scale) * cond - cfg_scale * uncond).log_softmax(-1)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack id lists into (input_ids, attention_mask), right-padded with ``pad_id``."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    return ids, attention


def _plan_mc_time(length: int, samples: int, eps: float, gen: torch.Generator) -> _Plan:
    strata = torch.arange(samples, dtype=torch.float64)
    t = eps + (1 - eps) * (strata + torch.rand(samples, generator=gen, dtype=torch.float64)) / samples
    masked = torch.rand(samples, length, generator=gen, dtype=torch.float64) < t[:, None]
    return _Plan(masked, masked, 1 / t, exact=False)


def _plan_mc_count(length: int, samples: int, gen: torch.Generator) -> _Plan:
    n_masked = torch.randint(1, length + 1, (samples,), generator=gen)
    ranks = torch.rand(samples, length, generator=gen).argsort(dim=1).argsort(dim=1)
    masked = ranks < n_masked[:, None]
    return _Plan(masked, masked, length / n_masked.double(), exact=False)


def _plan_paper_grid(length: int, steps: int, gen: torch.Generator, forced: bool = False) -> _Plan:
    t = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    masked = torch.rand(steps, length, generator=gen, dtype=torch.float64) < t[:, None]
    if forced:
        fallback = torch.randint(0, length, (steps,), generator=gen)
        empty = ~masked.any(dim=1)
        masked[empty, fallback[empty]] = True
    counts = masked.sum(dim=1).double()
    # an empty step's value is 0 (weight 0, no target); it still counts in the mean over the grid
    return _Plan(masked, masked, torch.where(counts > 0, 1 / counts.clamp(min=1), 0.0), exact=False)


def _plan_chain_rule(length: int) -> _Plan:
    positions = torch.arange(length)
    masked = positions[None, :] >= positions[:, None]
    targets = torch.eye(length, dtype=torch.bool)
    return _Plan(masked, targets, torch.ones(length, dtype=torch.float64), exact=True)


def _make_plan(method: str, length: int, samples: int, eps: float, gen: torch.Generator) -> _Plan:
    if method == "mc_time":
        return _plan_mc_time(length, samples, eps, gen)
    if method == "mc_count":
        return _plan_mc_count(length, samples, gen)
    if method in ("paper_grid", "paper_grid_forced"):
        return _plan_paper_grid(length, samples, gen, forced=method == "paper_grid_forced")
    return _plan_chain_rule(length)


def _score_rows(
    denoise: Denoiser, rows: Sequence[_Row], *, mask_id: int, batch_size: int, cfg_scale: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: float64 log-prob of each true continuation token, and whether it is the argmax.

    Rows go through the model longest first, ``batch_size`` model rows per call; with guidance a
    row's unconditional copy (context replaced by ``mask_id``) shares its call.
    """
    copies = 2 if cfg_scale else 1
    per_call = max(1, batch_size // copies)
    lengths = [len(row.context_ids) + len(row.continuation_ids) for row in rows]
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for r, row in enumerate(rows):  # a row that masks nothing needs no model call: its value is 0
        if not row.masked.any():
            n = len(row.continuation_ids)
            results[r] = (torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.bool))
    order = sorted((r for r in range(len(rows)) if r not in results), key=lambda r: -lengths[r])
    for start in range(0, len(order), per_call):
        chunk = [rows[r] for r in order[start : start + per_call]]
        continuations = [
            [mask_id if hidden else token for token, hidden in zip(row.continuation_ids, row.masked.tolist())]
            for row in chunk
        ]
        inputs = [list(row.context_ids) + cont for row, cont in zip(chunk, continuations)]
        if cfg_scale:
            inputs += [[mask_id] * len(row.context_ids) + cont for row, cont in zip(chunk, continuations)]
        logits = denoise(*right_pad(inputs, mask_id))
        for j, (r, row) in enumerate(zip(order[start : start + per_call], chunk)):
            span = slice(len(row.context_ids), len(row.context_ids) + len(row.continuation_ids))
            uncond = logits[j + len(chunk), span] if cfg_scale else None
            logp = guided_logprobs(logits[j, span], uncond, cfg_scale)
            target = torch.as_tensor(row.continuation_ids, dtype=torch.long, device=logp.device)
            token_logp = logp.gather(1, target[:, None]).squeeze(1)
            results[r] = (token_logp.double().cpu(), (logp.argmax(-1) == target).cpu())
    return [results[r] for r in range(len(rows))]


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
    if method not in METHODS:
        raise unknown_name("likelihood estimator", method, METHODS)
    if greedy not in GREEDY_CHECKS:
        raise unknown_name("greedy check", greedy, GREEDY_CHECKS)
    if samples < 1 or not 0 <= eps < 1:
        raise ValueError(f"need samples >= 1 and 0 <= eps < 1, got samples={samples}, eps={eps}")
    plans: list[tuple[_Plan, int, int] | None] = []  # plan, its first row, its greedy row
    rows: list[_Row] = []
    for context, continuation, key in requests:
        length = len(continuation)
        if length == 0:
            plans.append(None)
            continue
        plan = _make_plan(method, length, samples, eps, seeded_generator(seed, key))
        inputs = plan.inputs
        all_masked = inputs.all(dim=1).nonzero()
        if len(all_masked) or greedy == "sequential":
            greedy_row = int(all_masked[0]) if len(all_masked) else -1
        else:
            inputs = torch.cat([inputs, torch.ones(1, length, dtype=torch.bool)])
            greedy_row = len(inputs) - 1
        plans.append((plan, len(rows), greedy_row))
        rows.extend(_Row(context, continuation, masked) for masked in inputs)
    scored = _score_rows(denoise, rows, mask_id=mask_id, batch_size=batch_size, cfg_scale=cfg_scale)
    copies = 2 if cfg_scale else 1
    sequential = iter(sequential_greedy(denoise, [r for r in requests if len(r.continuation_ids)], mask_id=mask_id,
                                        batch_size=batch_size, cfg_scale=cfg_scale)) if greedy == "sequential" else None
    estimates = []
    for (_, continuation, _), planned in zip(requests, plans):
        if planned is None:
            estimates.append(Estimate(0.0, 0.0, True, 0, 0))
            continue
        plan, first, greedy_row = planned
        n_rows = max(len(plan.inputs), greedy_row + 1)
        own = scored[first : first + n_rows]
        called = sum(bool(row.masked.any()) for row in rows[first : first + n_rows])
        token_logp = torch.stack([logp for logp, _ in own[: len(plan.inputs)]])
        values = plan.weights * torch.where(plan.targets, token_logp, 0.0).sum(dim=1)
        if plan.exact:
            logprob, stderr = values.sum().item(), 0.0
        else:
            k = len(values)
            logprob = values.mean().item()
            stderr = values.std().item() / math.sqrt(k) if k > 1 else math.nan
        if sequential is not None:
            is_greedy = next(sequential)
            called += len(continuation)
        else:
            is_greedy = bool(own[greedy_row][1].all())
        estimates.append(Estimate(logprob, stderr, is_greedy, len(continuation), called * copies))
    return estimates


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
            logits = denoise(*right_pad(inputs, mask_id))
            for j, r in enumerate(chunk):
                span = slice(starts[r], len(states[r]))
                uncond = logits[j + len(chunk), span] if cfg_scale else None
                logp = guided_logprobs(logits[j, span], uncond, cfg_scale)
                masked = torch.tensor(states[r][span], device=logp.device) == mask_id
                if not masked.any():
                    continue
                confidence, tokens = logp.max(-1)
                best = int(confidence.masked_fill(~masked, -torch.inf).argmax())
                states[r][starts[r] + best] = int(tokens[best])
    return [states[r][starts[r]:] == list(continuation) for r, (_, continuation, _) in enumerate(requests)]
