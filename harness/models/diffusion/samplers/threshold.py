"""``threshold``: Fast-dLLM's parallel decoding: each step reveals every masked position of the
current block whose confidence exceeds ``threshold`` (at least the most confident one)."""
from __future__ import annotations

from typing import Sequence

import torch

from harness.models.diffusion.estimators import Denoiser
from harness.models.diffusion.samplers.common import (SAMPLERS, Canvas, FillRequest, SampleOutput, block_bounds,
                                                      sample_tokens)


@SAMPLERS.register("threshold")
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
    canvas = Canvas(requests, mask_id, seed)
    while active := [row for row, masked in enumerate(canvas.masked) if masked.any()]:
        logps = canvas.logprobs(denoise, cfg_scale, active)
        for row in active:
            masked = canvas.masked[row]
            first_masked = int(masked.nonzero()[0])
            blocks = block_bounds(len(masked), block_length)
            start, stop = next(bounds for bounds in blocks if bounds[1] > first_masked)
            tokens, confidence = sample_tokens(
                logps[row][start:stop], canvas.generators[row], temperature=temperature, top_p=top_p
            )
            confidence = confidence.masked_fill(~masked[start:stop].to(confidence.device), -torch.inf)
            chosen = (confidence > threshold).nonzero().squeeze(-1)
            if len(chosen) == 0:
                chosen = confidence.argmax()[None]
            canvas.reveal(row, start + chosen, tokens[chosen])
    return canvas.output(cfg_scale)
