"""``llada``: LLaDA's semi-autoregressive sampler: blocks of ``block_length`` left to right,
``steps`` split evenly over the blocks and each block's tokens split evenly over its steps
(remainders to the earliest); Gumbel-max proposals in float64; remasking by low confidence or at
random; only the current block can be revealed."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from harness.models.diffusion.estimators import Denoiser
from harness.models.diffusion.samplers.common import (SAMPLERS, Canvas, FillRequest, SampleOutput, Step,
                                                      block_bounds, run_schedules, split_evenly)

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
) -> SampleOutput:
    """LLaDA sampling. ``steps``: per row (default its n_tokens), each block getting at least one;
    ``block_length``: default the whole fill region (one block)."""
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")

    def blockwise(n_tokens: int) -> list[Step]:
        bounds = block_bounds(n_tokens, block_length)
        schedule = []
        for (start, stop), block_steps in zip(bounds, split_evenly(steps or n_tokens, len(bounds))):
            counts = split_evenly(stop - start, max(block_steps, 1))
            schedule += [Step(start, stop, count) for count in counts]
        return schedule

    canvas = Canvas(requests, mask_id, seed)
    propose = partial(_gumbel_tokens, temperature=temperature, remasking=remasking)
    return run_schedules(denoise, canvas, [blockwise(n) for n in canvas.sizes], propose, cfg_scale)
