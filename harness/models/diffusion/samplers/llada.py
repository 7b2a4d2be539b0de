"""``llada``: LLaDA's semi-autoregressive sampler: blocks of ``block_length`` left to right,
``steps`` split evenly over the blocks and each block's tokens split evenly over its steps
(remainders to the earliest); Gumbel-max proposals in float64; remasking by low confidence or at
random; only the current block can be revealed. Step s of every row shares one denoiser call;
a step at which no row reveals anything is skipped. LLaDA's instruct options
(``logits_eos_inf``, ``confidence_eos_eot_inf``) and ``eos_stop`` are ``common.EosOptions``."""
from __future__ import annotations

from typing import Sequence

import torch

from harness.models.diffusion.estimators import Denoiser
from harness.models.diffusion.samplers.common import (SAMPLERS, Canvas, EosOptions, FillRequest, SampleOutput, Step,
                                                      block_bounds, split_evenly, stop_at_eos)

REMASKING = ("low_confidence", "random")


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


def _schedule(n_tokens: int, steps: int | None, block_length: int | None, offset: int) -> list[Step]:
    bounds = block_bounds(n_tokens, block_length, offset)
    schedule = []
    for (start, stop), block_steps in zip(bounds, split_evenly(steps or n_tokens, len(bounds))):
        schedule += [Step(start, stop, count) for count in split_evenly(stop - start, max(block_steps, 1))]
    return schedule


@SAMPLERS.register("llada")
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
    eos_id: int | None = None,
    eot_id: int | None = None,
    eos_stop: bool = False,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    aligned_blocks: bool = False,
) -> SampleOutput:
    """LLaDA sampling. ``steps``: per row (default its n_tokens), each block getting at least one;
    ``block_length``: default the whole fill region (one block)."""
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    eos = EosOptions(eos_id, eot_id, eos_stop, logits_eos_inf, confidence_eos_eot_inf)
    canvas = Canvas(requests, mask_id, seed, block_length, aligned_blocks)
    schedules = [_schedule(n, steps, block_length, offset) for n, offset in zip(canvas.sizes, canvas.offsets)]
    for step in range(max(map(len, schedules), default=0)):
        work = {row: plan[step] for row, plan in enumerate(schedules)
                if step < len(plan) and plan[step].count and canvas.masked[row].any()}
        if not work:
            continue
        logps = canvas.logprobs(denoise, cfg_scale, list(work), by_block=True)
        for row, (start, stop, count) in work.items():
            tokens, confidence = _gumbel_tokens(eos.proposable(logps[row]), canvas.generators[row],
                                                temperature=temperature, remasking=remasking)
            still_masked = canvas.masked[row][start:stop].to(confidence.device)
            confidence = eos.rank(tokens, confidence).masked_fill(~still_masked, -torch.inf)
            chosen = confidence.topk(count).indices
            canvas.reveal(row, start + chosen, tokens[chosen])
        stop_at_eos(canvas, eos)
    return canvas.output(cfg_scale)
