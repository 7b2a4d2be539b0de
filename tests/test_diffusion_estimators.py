"""Masked-diffusion likelihood estimators, on a tiny random bidirectional denoiser."""
from __future__ import annotations

import itertools
import math
import pytest
import torch

from harness.errors import HarnessError
from harness.models.diffusion.estimators import LikelihoodRequest, estimate

from conftest import TINY_MASK as MASK, Spy


@pytest.fixture(scope="module")
def model(tiny_denoiser_model):
    return tiny_denoiser_model


CONTEXT, CONTINUATION = [3, 1, 4, 1, 5], [9, 2, 6, 5]


def token_logprobs(model, context: list[int], continuation: list[int], masked: set[int]) -> torch.Tensor:
    ids = context + [MASK if i in masked else tok for i, tok in enumerate(continuation)]
    logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, len(context) :]
    return logits.double().log_softmax(-1).gather(1, torch.tensor(continuation)[:, None]).squeeze(1)


def exact_elbo(model, context: list[int], continuation: list[int]) -> float:
    """E = sum_k (1/k) mean over |S| = k of sum_{i in S} log p(x_i | x with S masked)."""
    length, total = len(continuation), 0.0
    for k in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), k))
        f = [token_logprobs(model, context, continuation, set(s))[list(s)].sum().item() for s in subsets]
        total += sum(f) / len(f) / k
    return total


@pytest.mark.parametrize("method", ["mc_time", "mc_count"])
def test_monte_carlo_mean_matches_exact_elbo(model, method):
    request = LikelihoodRequest(CONTEXT, CONTINUATION, "q0")
    [est] = estimate(model, [request], mask_id=MASK, method=method, samples=2000, batch_size=512)
    exact = exact_elbo(model, CONTEXT, CONTINUATION)
    assert est.stderr > 0
    assert abs(est.logprob - exact) < 4 * est.stderr, (est, exact)
    assert est.n_tokens == 4


def test_chain_rule_is_the_left_to_right_product(model):
    by_hand = sum(
        token_logprobs(model, CONTEXT, CONTINUATION, set(range(j, len(CONTINUATION))))[j].item()
        for j in range(len(CONTINUATION))
    )
    [est] = estimate(model, [LikelihoodRequest(CONTEXT, CONTINUATION, "q")], mask_id=MASK, method="chain_rule")
    assert est.logprob == pytest.approx(by_hand, abs=1e-5)
    assert est.stderr == 0.0 and est.nfe == len(CONTINUATION)


def test_paper_grid_forced_on_one_token_is_its_fully_masked_logprob(model):
    [est] = estimate(model, [LikelihoodRequest(CONTEXT, [7], "q")], mask_id=MASK, method="paper_grid_forced",
                     samples=8)
    assert est.logprob == pytest.approx(token_logprobs(model, CONTEXT, [7], {0}).item(), abs=1e-5)
    assert est.stderr == pytest.approx(0.0, abs=1e-6) and est.nfe == 8


REQUESTS = [
    LikelihoodRequest([1, 2, 3], [4, 5], "a"),
    LikelihoodRequest([1, 2, 3], [6, 7, 8], "b"),
    LikelihoodRequest([9], [10, 11, 12, 13, 14], "c"),
    LikelihoodRequest([2, 2, 2, 2, 2, 2], [3], "d"),
]


@pytest.mark.parametrize("method", ["mc_time", "mc_count", "paper_grid", "chain_rule"])
def test_batch_size_and_order_do_not_change_estimates(model, method):
    one = estimate(model, REQUESTS, mask_id=MASK, method=method, samples=6, seed=3, batch_size=1)
    seven = estimate(model, REQUESTS, mask_id=MASK, method=method, samples=6, seed=3, batch_size=7)
    reversed_ = estimate(model, REQUESTS[::-1], mask_id=MASK, method=method, samples=6, seed=3, batch_size=5)[::-1]
    for a, b, c in zip(one, seven, reversed_):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) == pytest.approx(c.logprob, abs=1e-5)
        assert a.stderr == pytest.approx(b.stderr, abs=1e-5)
        assert a.is_greedy == b.is_greedy == c.is_greedy and a.nfe == b.nfe == c.nfe


@pytest.mark.parametrize("method", ["mc_time", "mc_count", "paper_grid"])
def test_seeds_change_monte_carlo_estimates(model, method):
    first = estimate(model, REQUESTS, mask_id=MASK, method=method, samples=6, seed=0)
    second = estimate(model, REQUESTS, mask_id=MASK, method=method, samples=6, seed=1)
    assert any(abs(a.logprob - b.logprob) > 1e-6 for a, b in zip(first, second))


@pytest.mark.parametrize("method", ["mc_time", "mc_count", "paper_grid", "chain_rule"])
def test_context_is_never_masked(model, method):
    spy = Spy(model)
    request = LikelihoodRequest(CONTEXT, CONTINUATION, "q")
    estimate(spy, [request], mask_id=MASK, method=method, samples=16, batch_size=4)
    rows = torch.cat([ids for ids, _ in spy.batches])
    assert (rows[:, : len(CONTEXT)] == torch.tensor(CONTEXT)).all()
    assert (rows[:, len(CONTEXT) :] == MASK).any()


def test_cfg_zero_is_no_guidance_and_positive_cfg_adds_unconditional_rows(model):
    plain = estimate(model, REQUESTS, mask_id=MASK, method="mc_count", samples=4)
    zero = estimate(model, REQUESTS, mask_id=MASK, method="mc_count", samples=4, cfg_scale=0.0)
    assert plain == zero
    spy = Spy(model)
    guided = estimate(spy, REQUESTS[:1], mask_id=MASK, method="chain_rule", cfg_scale=1.5, batch_size=4)
    [ids] = [ids for ids, _ in spy.batches]  # cond and uncond rows in the same call
    assert (ids[:2, :3] == torch.tensor([1, 2, 3])).all() and (ids[2:, :3] == MASK).all()
    assert (ids[:2, 3:] == ids[2:, 3:]).all()
    assert guided[0].nfe == 4
    unguided = estimate(model, REQUESTS[:1], mask_id=MASK, method="chain_rule")
    assert abs(guided[0].logprob - unguided[0].logprob) > 1e-4


def test_is_greedy_means_one_pass_argmax_reproduces_the_continuation(model):
    ids = CONTEXT + [MASK] * 3
    greedy = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, len(CONTEXT) :].argmax(-1)
    greedy = greedy.tolist()
    other = greedy[:2] + [(greedy[2] + 1) % MASK]
    for method in ("mc_time", "mc_count", "paper_grid", "chain_rule"):
        hit, miss = estimate(
            model, [LikelihoodRequest(CONTEXT, greedy, "g"), LikelihoodRequest(CONTEXT, other, "g")],
            mask_id=MASK, method=method, samples=4,
        )
        assert hit.is_greedy and not miss.is_greedy


def test_empty_continuation_and_unknown_method(model):
    [est] = estimate(model, [LikelihoodRequest([1, 2], [], "e")], mask_id=MASK)
    assert (est.logprob, est.n_tokens, est.nfe, est.is_greedy) == (0.0, 0, 0, True)
    with pytest.raises(HarnessError, match="mc_time"):
        estimate(model, REQUESTS, mask_id=MASK, method="mc_tme")


def test_single_sample_has_undefined_stderr(model):
    [est] = estimate(model, REQUESTS[:1], mask_id=MASK, method="mc_count", samples=1)
    assert math.isfinite(est.logprob) and math.isnan(est.stderr)
