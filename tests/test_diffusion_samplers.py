"""Masked-diffusion samplers, on a tiny random bidirectional denoiser."""
from __future__ import annotations

import pytest
import torch

from harness.models.diffusion.samplers import (
    SAMPLERS,
    FillRequest,
    diffugpt_sample,
    llada_sample,
    threshold_sample,
)

from conftest import TINY_MASK as MASK, Spy


@pytest.fixture(scope="module")
def model(tiny_denoiser_model):
    return tiny_denoiser_model


REQUESTS = [
    FillRequest([1, 2, 3], 5, [4, 5], key="infill"),
    FillRequest([6], 3, key="generate"),
    FillRequest([7, 8, 9, 10], 8, [11], key="long"),
]
SETTINGS = [
    ("diffugpt", {}),
    ("diffugpt", {"steps": 3, "temperature": 1.0, "top_p": 0.9}),
    ("llada", {"steps": 4, "block_length": 2}),
    ("llada", {"temperature": 1.0, "remasking": "random"}),
    ("threshold", {"threshold": 0.5, "block_length": 3}),
    ("threshold", {"temperature": 1.0, "top_p": 0.8}),
]


def masked_counts(spy: Spy, request: FillRequest) -> list[int]:
    """The number of masked fill positions of ``request``, the first row, at each call."""
    start = len(request.prefix_ids)
    return [int((ids[0, start : start + request.n_tokens] == MASK).sum()) for ids, _ in spy.batches]


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
@pytest.mark.parametrize("method,options", SETTINGS)
def test_fills_only_the_masked_span_and_counts_passes(model, method, options, cfg_scale):
    spy = Spy(model)
    out = SAMPLERS[method](spy, REQUESTS, mask_id=MASK, seed=1, cfg_scale=cfg_scale, **options)
    assert [len(tokens) for tokens in out.tokens] == [r.n_tokens for r in REQUESTS]
    if method != "diffugpt":  # DiffuGPT's sampler may propose the mask token, as the authors' does
        assert all(MASK not in tokens for tokens in out.tokens)
    assert out.steps == len(spy.batches) and out.nfe == out.steps * (2 if cfg_scale else 1)
    for ids, attention in spy.batches:
        assert len(ids) == len(REQUESTS) * (2 if cfg_scale else 1)
        for row, request in enumerate(REQUESTS):
            fill_end = len(request.prefix_ids) + request.n_tokens
            real = int(attention[row].sum())
            assert ids[row, : len(request.prefix_ids)].tolist() == list(request.prefix_ids)
            assert ids[row, fill_end:real].tolist() == list(request.suffix_ids)
            if cfg_scale:  # unconditional copy: prefix and suffix masked, same fill region
                uncond = ids[row + len(REQUESTS)]
                assert (uncond[: len(request.prefix_ids)] == MASK).all() and (uncond[fill_end:real] == MASK).all()
                assert (uncond[len(request.prefix_ids) : fill_end] == ids[row, len(request.prefix_ids) : fill_end]).all()


def test_revealed_tokens_are_never_changed(model):
    spy = Spy(model)
    out = llada_sample(spy, REQUESTS, mask_id=MASK, steps=8, temperature=1.0, seed=2)
    start, n = len(REQUESTS[2].prefix_ids), REQUESTS[2].n_tokens
    final = torch.tensor(out.tokens[2])
    for ids, _ in spy.batches:
        span = ids[2, start : start + n]
        revealed = span != MASK
        assert (span[revealed] == final[revealed]).all()


def test_diffugpt_calls_the_model_t_times_per_row(model):
    spy = Spy(model)
    out = diffugpt_sample(spy, REQUESTS[2:], mask_id=MASK)
    assert out.steps == len(spy.batches) == 8 and masked_counts(spy, REQUESTS[2])[0] == 8
    spy = Spy(model)
    assert diffugpt_sample(spy, REQUESTS[2:], mask_id=MASK, steps=3).steps == 3


def test_llada_finishes_a_block_before_the_next_one(model):
    spy = Spy(model)
    out = llada_sample(spy, REQUESTS[2:], mask_id=MASK, steps=4, block_length=4)
    assert out.steps == 4 and masked_counts(spy, REQUESTS[2]) == [8, 6, 4, 2]  # 2 steps per block, 2 tokens each
    start = len(REQUESTS[2].prefix_ids)
    for ids, _ in spy.batches:
        first, second = ids[0, start : start + 4], ids[0, start + 4 : start + 8]
        assert (second == MASK).all() or (first != MASK).all()


def test_llada_spreads_remainders_to_early_steps_and_rows_keep_their_own_steps(model):
    spy = Spy(model)
    llada_sample(spy, REQUESTS[2:], mask_id=MASK, steps=3)
    assert masked_counts(spy, REQUESTS[2]) == [8, 5, 2]  # 3, 3, 2 tokens per step
    out = llada_sample(model, REQUESTS, mask_id=MASK)  # default: one token per step per row
    assert out.steps == max(r.n_tokens for r in REQUESTS)


def test_threshold_zero_takes_one_step_per_block_and_one_takes_one_token_per_step(model):
    out = threshold_sample(model, REQUESTS, mask_id=MASK, threshold=0.0, block_length=4)
    assert out.steps == 2  # the 8-token span has two blocks, the others fit in one or two
    spy = Spy(model)
    out = threshold_sample(spy, REQUESTS[2:], mask_id=MASK, threshold=1.0)
    assert out.steps == 8 and masked_counts(spy, REQUESTS[2]) == [8, 7, 6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_greedy_is_deterministic_and_seeded_sampling_is_reproducible(model, method):
    sampler = SAMPLERS[method]
    assert sampler(model, REQUESTS, mask_id=MASK, seed=0).tokens == sampler(model, REQUESTS, mask_id=MASK, seed=5).tokens
    batch = sampler(model, REQUESTS, mask_id=MASK, seed=7, temperature=1.5)
    assert batch.tokens == sampler(model, REQUESTS, mask_id=MASK, seed=7, temperature=1.5).tokens
    alone = [sampler(model, [r], mask_id=MASK, seed=7, temperature=1.5).tokens[0] for r in REQUESTS]
    assert alone == batch.tokens  # keyed rows do not depend on their batch
    seeds = {str(sampler(model, REQUESTS, mask_id=MASK, seed=s, temperature=1.5).tokens) for s in range(4)}
    assert len(seeds) > 1


def test_empty_fill_and_bad_remasking(model):
    for sampler in SAMPLERS.values():
        out = sampler(model, [FillRequest([1, 2], 0, [3])], mask_id=MASK)
        assert out.tokens == [[]] and out.nfe == 0
    with pytest.raises(ValueError, match="remasking"):
        llada_sample(model, REQUESTS, mask_id=MASK, remasking="lowest")
