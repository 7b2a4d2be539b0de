"""``diffugpt``: DiffuGPT/DiffuLLaMA's ``generate_samples`` (their
``LLaMA-Factory/src/llamafactory/train/ddm/trainer.py``): T model calls; after call k < T every
fill position, revealed ones included, is ranked by the log-probability (after temperature) of
the token the model now proposes there; the floor(n * (T - k) / T) lowest stay (or become
eligible to stay) masked and every still-masked position outside them is revealed with its
proposal, so one step may reveal more than n / T tokens. After the last call the positions
still masked take their proposals. Unlike the other samplers it may propose the mask token
(theirs does) and calls the model T times even when nothing is left masked.
"""
from __future__ import annotations

from typing import Sequence

import torch

from harness.models.diffusion.estimators import Denoiser
from harness.models.diffusion.samplers.common import SAMPLERS, Canvas, FillRequest, SampleOutput


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


@SAMPLERS.register("diffugpt")
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
    canvas = Canvas(requests, mask_id, seed)
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
