"""What every sampler shares: the request and output types, the registry, the canvas and the
proposal and scheduling helpers.

A sampler is registered as ``@SAMPLERS.register("name")`` and called as
``sample(denoise, requests, *, mask_id, seed, **settings) -> SampleOutput``; the backend passes it
the settings its signature names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from harness.models.diffusion.estimators import Denoiser, guided_logprobs, right_pad, seeded_generator
from harness.models.diffusion.estimators.scoring import logits_at, span_positions
from harness.registry import Registry


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


SAMPLERS: Registry[Callable[..., SampleOutput]] = Registry("sampler", ordered=True)


# One scheduled step of a row: reveal ``count`` tokens among fill positions [start, stop).
class Step(NamedTuple):
    start: int
    stop: int
    count: int


# Proposes tokens and confidences for one row from its float32 log-probs [n, V].
Proposer = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class Canvas:
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
        spans = [(self.starts[row], self.starts[row] + self.sizes[row]) for row in range(len(self.sizes))]
        logits = logits_at(denoise, ids, attention, span_positions(spans * (2 if cfg_scale else 1)))
        self.calls += 1
        if not self.generators:
            self.generators = [seeded_generator(self.seed, key, logits.device) for key in self.keys]
        batch, logps = len(self.sizes), {}
        for row in rows:
            region = slice(0, self.sizes[row])
            uncond = logits[row + batch, region] if cfg_scale else None
            logp = guided_logprobs(logits[row, region], uncond, cfg_scale)
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


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal counts, the remainder going to the first parts (LLaDA)."""
    base, extra = divmod(total, max(parts, 1))
    return [base + 1 if part < extra else base for part in range(parts)]


def block_bounds(n_tokens: int, block_length: int | None) -> list[tuple[int, int]]:
    length = block_length or max(n_tokens, 1)
    return [(start, min(start + length, n_tokens)) for start in range(0, n_tokens, length)]


def sample_tokens(
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


def run_schedules(
    denoise: Denoiser,
    canvas: Canvas,
    schedules: list[list[Step]],
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
