"""Samplers that fill masked spans with a masked-diffusion denoiser: generation and infilling.

Each request becomes a canvas ``prefix + [mask] * n_tokens + suffix`` (generation: no suffix); the
canvases of a call are right-padded into one batch and go through the denoiser together (see
``estimators`` for the ``denoise(input_ids, attention_mask)`` contract). Samplers only write
still-masked positions of the fill region; prefix and suffix tokens never change.

* ``diffugpt_sample``: DiffuGPT/DiffuLLaMA's ``generate_samples`` (their
  ``LLaMA-Factory/src/llamafactory/train/ddm/trainer.py``): T model calls; after call k < T every
  fill position, revealed ones included, is ranked by the log-probability (after temperature) of
  the token the model now proposes there; the floor(n * (T - k) / T) lowest stay (or become
  eligible to stay) masked and every still-masked position outside them is revealed with its
  proposal, so one step may reveal more than n / T tokens. After the last call the positions
  still masked take their proposals. Unlike the other samplers it may propose the mask token
  (theirs does) and calls the model T times even when nothing is left masked.
* ``llada_sample``: LLaDA's semi-autoregressive sampler: blocks of ``block_length`` left to right,
  ``steps`` split evenly over the blocks and each block's tokens split evenly over its steps
  (remainders to the earliest); Gumbel-max proposals in float64; remasking by low confidence or at
  random; only the current block can be revealed.
* ``threshold_sample``: Fast-dLLM's parallel decoding: each step reveals every masked position of
  the current block whose confidence exceeds ``threshold`` (at least the most confident one).

The mask token is never proposed (its probability is spread over the others). Confidence is the
model's probability of the proposed token (before temperature). Row ``b`` draws
its randomness from a generator seeded by ``(seed, key)`` (key defaults to the row's index), and a
row draws only at steps where it changes, so with keys given a row's output does not depend on
the other rows of the batch (up to floating-point differences between batch shapes).

Classifier-free guidance (``cfg_scale`` w > 0) adds, in the same denoiser call, an unconditional
copy of each canvas with the prefix AND suffix masked (SMDM masks the prompt; infilling also masks
the suffix) and combines them as in ``estimators.guided_logprobs``. ``nfe`` counts forward passes
per row: one per denoiser call, two with guidance; ``steps`` counts denoiser calls. Steps at which
no row would reveal anything are skipped and not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch

from harness.models.diffusion.estimators import Denoiser, guided_logprobs, right_pad, seeded_generator

REMASKING = ("low_confidence", "random")


class FillRequest(NamedTuple):
    """Fill ``n_tokens`` masked positions between ``prefix_ids`` and ``suffix_ids``."""

    prefix_ids: Sequence[int]
    n_tokens: int
    suffix_ids: Sequence[int] = ()
    key: str = ""


@dataclass(frozen=True)
class SampleOutput:
    tokens: list[list[int]]  # the fill region of each request
    nfe: int
    steps: int


# One scheduled step of a row: reveal ``count`` tokens among fill positions [start, stop).
class _Step(NamedTuple):
    start: int
    stop: int
    count: int


# Proposes tokens and confidences for one row from its float32 log-probs [n, V].
Proposer = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class _Canvas:
    """The right-padded canvases of a batch, which fill positions are still masked, and the calls."""

    def __init__(self, requests: Sequence[FillRequest], mask_id: int, seed: int) -> None:
        self.mask_id = mask_id
        self.starts = [len(r.prefix_ids) for r in requests]
        self.sizes = [r.n_tokens for r in requests]
        self.keys = [r.key or str(row) for row, r in enumerate(requests)]
        self.seed = seed
        self.ids, self.attention = right_pad(
            [list(r.prefix_ids) + [mask_id] * r.n_tokens + list(r.suffix_ids) for r in requests], mask_id
        )
        self.masked = [torch.ones(n, dtype=torch.bool) for n in self.sizes]
        self.generators: list[torch.Generator] = []
        self.calls = 0

    def region(self, row: int) -> slice:
        return slice(self.starts[row], self.starts[row] + self.sizes[row])

    def logprobs(self, denoise: Denoiser, cfg_scale: float, rows: Sequence[int],
                 propose_mask: bool = False) -> dict[int, torch.Tensor]:
        """One denoiser call on the whole batch; for each of ``rows``, guided float32 log-probs
        [n_b, V] over its fill region, the mask token's probability moved to the others (unless
        ``propose_mask``)."""
        ids, attention = self.ids, self.attention
        if cfg_scale:
            uncond = torch.full_like(ids, self.mask_id)
            for row in range(len(self.sizes)):
                uncond[row, self.region(row)] = ids[row, self.region(row)]
            ids, attention = torch.cat([ids, uncond]), torch.cat([attention, attention])
        logits = denoise(ids, attention)
        self.calls += 1
        if not self.generators:
            self.generators = [seeded_generator(self.seed, key, logits.device) for key in self.keys]
        batch, logps = len(self.sizes), {}
        for row in rows:
            uncond = logits[row + batch, self.region(row)] if cfg_scale else None
            logp = guided_logprobs(logits[row, self.region(row)], uncond, cfg_scale)
            if not propose_mask and self.mask_id < logp.shape[-1]:  # never propose the mask token
                logp = logp.index_fill(-1, torch.tensor([self.mask_id], device=logp.device), -torch.inf)
                logp = logp.log_softmax(-1)
            logps[row] = logp
        return logps

    def reveal(self, row: int, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """Write ``tokens`` at fill ``positions`` (indices into the row's fill region)."""
        positions = positions.cpu()
        self.ids[row, self.starts[row] + positions] = tokens.cpu()
        self.masked[row][positions] = False

    def output(self, cfg_scale: float) -> SampleOutput:
        tokens = [self.ids[row, self.region(row)].tolist() for row in range(len(self.sizes))]
        return SampleOutput(tokens, nfe=self.calls * (2 if cfg_scale else 1), steps=self.calls)


def _split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal counts, the remainder going to the first parts (LLaDA)."""
    base, extra = divmod(total, max(parts, 1))
    return [base + 1 if part < extra else base for part in range(parts)]


def _block_bounds(n_tokens: int, block_length: int | None) -> list[tuple[int, int]]:
    length = block_length or max(n_tokens, 1)
    return [(start, min(start + length, n_tokens)) for start in range(0, n_tokens, length)]


def _sample_tokens(
    logp: torch.Tensor, gen: torch.Generator, *, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from softmax(logp / temperature) cut to its top-p nucleus (argmax at temperature 0).
    Returns the tokens and the model's probability of each."""
    if temperature == 0:
        tokens = logp.argmax(-1)
    else:
        probs = (logp / temperature).softmax(-1)
        if top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1).exp()


def _gumbel_tokens(
    logp: torch.Tensor, gen: torch.Generator, *, temperature: float, remasking: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's proposal: argmax of exp(logits) / (-log U) ** temperature in float64 (plain argmax at
    temperature 0), which samples softmax(logits / temperature); log-probs stand in for the logits
    (same argmax, no overflow). Confidence: the token's probability, or uniform noise (``random``)."""
    logp = logp.double()
    if temperature == 0:
        tokens = logp.argmax(-1)
    else:
        noise = torch.rand(logp.shape, generator=gen, dtype=torch.float64, device=logp.device)
        tokens = (logp.exp() / (-noise.log()) ** temperature).argmax(-1)
    if remasking == "random":
        confidence = torch.rand(len(tokens), generator=gen, dtype=torch.float64, device=logp.device)
    else:
        confidence = logp.gather(-1, tokens[:, None]).squeeze(-1).exp()
    return tokens, confidence


def _run_schedules(
    denoise: Denoiser,
    canvas: _Canvas,
    schedules: list[list[_Step]],
    propose: Proposer,
    cfg_scale: float,
) -> SampleOutput:
    """Step s of row b reveals the ``count`` most confident masked positions of its span."""
    for step in range(max(map(len, schedules), default=0)):
        work = {row: plan[step] for row, plan in enumerate(schedules) if step < len(plan)}
        work = {row: todo for row, todo in work.items() if todo.count}
        if not work:
            continue
        logps = canvas.logprobs(denoise, cfg_scale, list(work))
        for row, (start, stop, count) in work.items():
            tokens, confidence = propose(logps[row][start:stop], canvas.generators[row])
            still_masked = canvas.masked[row][start:stop].to(confidence.device)
            confidence = confidence.masked_fill(~still_masked, -torch.inf)
            chosen = confidence.topk(count).indices
            canvas.reveal(row, start + chosen, tokens[chosen])
    return canvas.output(cfg_scale)


def _tempered_proposal(
    logp: torch.Tensor, gen: torch.Generator, *, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffuGPT's proposal: tokens drawn from softmax(logp / temperature) (cut to its top-p
    nucleus), scored by their log-probability under that distribution; argmax and plain log-probs
    at temperature 0."""
    if temperature == 0:
        scores, tokens = logp.max(-1)
        return tokens, scores
    tempered = (logp / temperature).log_softmax(-1)
    if top_p < 1:
        sorted_logp, order = tempered.sort(-1, descending=True)
        drop = sorted_logp.exp().cumsum(-1) - sorted_logp.exp() >= top_p
        tempered = tempered.scatter(-1, order, sorted_logp.masked_fill(drop, -torch.inf)).log_softmax(-1)
    tokens = torch.multinomial(tempered.exp(), 1, generator=gen).squeeze(-1)
    return tokens, tempered.gather(-1, tokens[:, None]).squeeze(-1)


def diffugpt_sample(
    denoise: Denoiser,
    requests: Sequence[FillRequest],
    *,
    mask_id: int,
    steps: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    cfg_scale: float = 0.0,
    seed: int = 0,
) -> SampleOutput:
    """DiffuGPT/DiffuLLaMA sampling (see the module docstring); ``steps`` T: model calls per row
    (default: each row's n_tokens)."""
    canvas = _Canvas(requests, mask_id, seed)
    calls = [steps or n for n in canvas.sizes]
    proposals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k in range(max(calls, default=0)):
        live = [row for row, total in enumerate(calls) if k < total and canvas.sizes[row]]
        if not live:
            break
        for row in (r for r in live if k):
            tokens, scores = proposals[row]
            n = canvas.sizes[row]
            cutoff = n * (calls[row] - k) // calls[row]
            keep = scores < scores.sort().values[cutoff] if cutoff < n else torch.ones_like(scores, dtype=torch.bool)
            reveal = (canvas.masked[row].to(keep.device) & ~keep).nonzero().squeeze(-1)
            canvas.reveal(row, reveal, tokens[reveal])
        logps = canvas.logprobs(denoise, cfg_scale, live, propose_mask=True)
        for row in live:
            proposals[row] = _tempered_proposal(logps[row], canvas.generators[row], temperature=temperature,
                                                top_p=top_p)
    for row, (tokens, _) in proposals.items():
        still = canvas.masked[row].nonzero().squeeze(-1)
        canvas.reveal(row, still, tokens[still.to(tokens.device)])
    return canvas.output(cfg_scale)


def llada_sample(
    denoise: Denoiser,
    requests: Sequence[FillRequest],
    *,
    mask_id: int,
    steps: int | None = None,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    seed: int = 0,
) -> SampleOutput:
    """LLaDA sampling. ``steps``: per row (default its n_tokens), each block getting at least one;
    ``block_length``: default the whole fill region (one block)."""
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")

    def blockwise(n_tokens: int) -> list[_Step]:
        bounds = _block_bounds(n_tokens, block_length)
        schedule = []
        for (start, stop), block_steps in zip(bounds, _split_evenly(steps or n_tokens, len(bounds))):
            counts = _split_evenly(stop - start, max(block_steps, 1))
            schedule += [_Step(start, stop, count) for count in counts]
        return schedule

    canvas = _Canvas(requests, mask_id, seed)
    propose = partial(_gumbel_tokens, temperature=temperature, remasking=remasking)
    return _run_schedules(denoise, canvas, [blockwise(n) for n in canvas.sizes], propose, cfg_scale)


def threshold_sample(
    denoise: Denoiser,
    requests: Sequence[FillRequest],
    *,
    mask_id: int,
    threshold: float = 0.9,
    block_length: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    cfg_scale: float = 0.0,
    seed: int = 0,
) -> SampleOutput:
    """Fast-dLLM confidence-threshold decoding; at most n_tokens steps per row, one per block at
    ``threshold`` 0. ``block_length``: default the whole fill region (one block)."""
    canvas = _Canvas(requests, mask_id, seed)
    while active := [row for row, masked in enumerate(canvas.masked) if masked.any()]:
        logps = canvas.logprobs(denoise, cfg_scale, active)
        for row in active:
            masked = canvas.masked[row]
            first_masked = int(masked.nonzero()[0])
            blocks = _block_bounds(len(masked), block_length)
            start, stop = next(bounds for bounds in blocks if bounds[1] > first_masked)
            tokens, confidence = _sample_tokens(
                logps[row][start:stop], canvas.generators[row], temperature=temperature, top_p=top_p
            )
            confidence = confidence.masked_fill(~masked[start:stop].to(confidence.device), -torch.inf)
            chosen = (confidence > threshold).nonzero().squeeze(-1)
            if len(chosen) == 0:
                chosen = confidence.argmax()[None]
            canvas.reveal(row, start + chosen, tokens[chosen])
    return canvas.output(cfg_scale)


SAMPLERS = {"diffugpt": diffugpt_sample, "llada": llada_sample, "threshold": threshold_sample}
