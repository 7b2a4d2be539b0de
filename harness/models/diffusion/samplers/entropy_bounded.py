"""``entropy_bounded``: the EB-sampler (Ben-Hamu et al., "Accelerated Sampling from Masked
Diffusion Models via Entropy Bounded Unmasking", arXiv 2505.24857; the entropy-bound sampler of
DiffusionGemma in transformers / diffusers), block by block like ``threshold``.

Each step proposes a token for every position of the current block (as ``common.sample_tokens``:
argmax at temperature 0, else drawn from the tempered, top-p cut distribution; never the mask
token) and computes each position's entropy H of softmax(logp / temperature) (of softmax(logp) at
temperature 0; before the top-p cut). With the block's masked entropies sorted
H_1 <= H_2 <= ... <= H_m it reveals the k lowest for the largest k with
H_1 + ... + H_k - max(H_1..H_k) = H_1 + ... + H_(k-1) <= ``gamma`` (so at least one). ``gamma``
0 reveals one token per step (unless entropies are exactly 0: a one-hot distribution adds
nothing to the sum). Ties keep position order. EOS options as ``common.EosOptions``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from harness.models.diffusion.estimators import Denoiser
from harness.models.diffusion.samplers.common import (SAMPLERS, Canvas, EosOptions, FillRequest, SampleOutput,
                                                      decode_adaptively, sample_tokens)


def token_entropy(logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy (nats) [n] of each row of log-probs [n, V], tempered when ``temperature`` > 0."""
    probs = (logp / temperature).softmax(-1) if temperature else logp.exp()
    return torch.special.entr(probs.double()).sum(-1)


def entropy_bounded_count(ordered: torch.Tensor, gamma: float) -> int:
    """How many of the entropies ``ordered`` (ascending) to reveal: the largest k whose first k - 1
    sum to at most ``gamma``, at least one; an infinite entropy (a demoted proposal) only as the first."""
    before = torch.cat([ordered.new_zeros(1), ordered[:-1].cumsum(0)])
    accept = (before <= gamma) & (ordered < torch.inf)
    return max(1, int(accept.long().cumprod(0).sum()))


def entropy_bounded_positions(entropy: torch.Tensor, masked: torch.Tensor, demoted: torch.Tensor,
                              gamma: float) -> torch.Tensor:
    """Block positions to reveal: masked ones by ascending entropy, demoted ones after all others
    (by their own entropy) and counted as +inf."""
    candidates = masked.nonzero().squeeze(-1)
    entropy, demoted = entropy[candidates], demoted[candidates]
    order = entropy.sort(stable=True).indices
    order = order[demoted[order].int().sort(stable=True).indices]
    count = entropy_bounded_count(entropy.masked_fill(demoted, torch.inf)[order], gamma)
    return candidates[order[:count]]


@SAMPLERS.register("entropy_bounded")
def entropy_bounded_sample(
    denoise: Denoiser,
    requests: Sequence[FillRequest],
    *,
    mask_id: int,
    gamma: float = 0.1,
    block_length: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    cfg_scale: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
    eot_id: int | None = None,
    eos_stop: bool = False,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    aligned_blocks: bool = False,
) -> SampleOutput:
    """EB-sampler decoding; at most n_tokens steps per row. ``gamma``: the entropy bound (nats,
    >= 0). ``block_length``: default the whole fill region (one block)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    eos = EosOptions(eos_id, eot_id, eos_stop, logits_eos_inf, confidence_eos_eot_inf)

    def choose(logp: torch.Tensor, masked: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, _ = sample_tokens(logp, gen, temperature=temperature, top_p=top_p)
        chosen = entropy_bounded_positions(token_entropy(logp, temperature), masked.to(tokens.device),
                                           eos.demoted(tokens), gamma)
        return chosen, tokens[chosen]

    return decode_adaptively(denoise, Canvas(requests, mask_id, seed, block_length, aligned_blocks), eos, cfg_scale,
                             choose)
