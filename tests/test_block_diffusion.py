"""Block diffusion: block-causal attention, the exact cache of finished blocks, block-aligned
decoding and the block ELBO, on a tiny harness-format checkpoint with ``block_size`` 4."""
from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch

from harness.errors import HarnessError
from harness.models.base import GenerateRequest, InfillRequest, LoglikelihoodRequest
from harness.models.diffusion.attention import block_causal
from harness.models.diffusion.estimators import LikelihoodRequest
from harness.models.diffusion.estimators.blockwise import continuation_blocks, estimate_blockwise
from harness.models.diffusion.samplers import FillRequest
from harness.models.diffusion.samplers.common import block_bounds
from harness.models.factory import build_model

BLOCK = 4


@pytest.fixture(scope="module", params=["shifted", "unshifted"])
def block_dir(request, tiny_dlm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-block-{request.param}")
    shutil.copytree(tiny_dlm_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "diffusion_config.json").read_text())
    (path / "diffusion_config.json").write_text(json.dumps({**config, "kind": request.param, "block_size": BLOCK}))
    return path


def test_block_causal_mask_matches_its_definition():
    keep = torch.tensor([[1] * 7 + [0] * 2, [1] * 9]).bool()
    allowed = block_causal(keep, 3)[:, 0]
    for b, i, j in itertools.product(range(2), range(9), range(9)):
        assert bool(allowed[b, i, j]) == (bool(keep[b, j]) and j // 3 <= i // 3)


def test_block_bounds_align_to_the_sequence_start():
    assert block_bounds(10, 4, offset=3) == [(0, 1), (1, 5), (5, 9), (9, 10)]
    assert block_bounds(10, 4, offset=0) == [(0, 4), (4, 8), (8, 10)]
    assert block_bounds(10, 4, offset=4) == block_bounds(10, 4)
    assert continuation_blocks(3, 10, 4) == [(0, 1), (1, 5), (5, 9), (9, 10)]
    assert continuation_blocks(8, 3, 4) == [(0, 3)]


def test_a_later_block_never_changes_an_earlier_one_and_a_block_sees_itself(block_dir):
    lm = build_model(str(block_dir))
    assert lm.block_size == BLOCK and lm.fingerprint["block_size"] == BLOCK
    ids = torch.randint(0, 200, (1, 12))
    mask = torch.ones_like(ids)
    base = lm.denoiser.model(ids, mask)
    later = ids.clone()
    later[0, 8:] = torch.randint(0, 200, (4,))
    changed = lm.denoiser.model(later, mask)
    assert torch.equal(base[0, :8], changed[0, :8])  # blocks 0 and 1: bit for bit
    assert not torch.allclose(base[0, 8:], changed[0, 8:])
    inside = ids.clone()
    inside[0, 7] = (ids[0, 7] + 1) % 200  # the last token of block 1
    seen = lm.denoiser.model(inside, mask)
    assert torch.equal(base[0, :4], seen[0, :4]) and not torch.allclose(base[0, 4], seen[0, 4])


class Checked:
    """A cache that compares every answer with recomputation by the plain denoiser."""

    takes_positions = True

    def __init__(self, cache, reference) -> None:
        self.cache, self.reference, self.largest = cache, reference, 0.0

    def __call__(self, ids, mask, positions):
        out = self.cache(ids, mask, positions)
        self.largest = max(self.largest, float((out - self.reference(ids, mask, positions)).abs().max()))
        return out


@pytest.mark.parametrize("sampler, extra, same_text", [
    ("llada", {"steps": 12}, True), ("threshold", {"threshold": 0.3}, True),
    ("entropy_bounded", {"gamma": 0.5}, False),  # its entropy sums flip on float-level ties (1e-7 here)
    ("llada", {"steps": 12, "block_length": 2, "cfg_scale": 1.5}, True)])
def test_the_exact_cache_reproduces_recomputation(block_dir, sampler, extra, same_text, monkeypatch):
    args = {"sampler": sampler, **extra}
    requests = [GenerateRequest("The quick brown fox", 10), GenerateRequest("Answer:", 10)]  # padded rows
    plain = build_model(str(block_dir), model_args=args, batch_size=4)
    cached = build_model(str(block_dir), model_args={**args, "cache": "prefix"}, batch_size=4)
    made = []
    original = cached.block_cache
    monkeypatch.setattr(cached, "block_cache",
                        lambda fills, s: made.append(Checked(original(fills, s), plain.denoise)) or made[-1])
    expected, got = plain.generate(requests), cached.generate(requests)
    if same_text:
        assert [r.text for r in got] == [r.text for r in expected]
        assert [r.nfe for r in got] == [r.nfe for r in expected]
    [checked] = made
    cache = checked.cache
    assert checked.largest < 1e-5  # every cached answer is the recomputed one, to float rounding
    blocks_reached = sum(len(block_bounds(10, BLOCK, start % BLOCK)) for start in cache.starts)
    assert cache.full_passes == 1 and cache.cached_passes > 0  # one full pass starts the cache
    assert 0 < cache.extensions <= blocks_reached - len(cache.starts)  # one per row moving to a new block
    if same_text:
        infills = [InfillRequest("def add(a, b):", "\n", 6)]
        assert [r.text for r in cached.infill(infills)] == [r.text for r in plain.infill(infills)]


def test_cached_logits_equal_recomputed_logits(block_dir):
    lm = build_model(str(block_dir), model_args={"sampler": "llada", "cache": "prefix"})
    mask_id = lm.denoiser.mask_id
    prompt = [3, 9, 27, 81, 5, 6]  # 6 tokens: the fill starts inside block 1
    cache = lm.block_cache([FillRequest(prompt, 6, (), "a")], lm.sampler)
    ids = torch.tensor([prompt + [mask_id] * 6])
    mask = torch.ones_like(ids)
    positions = torch.tensor([[6, 7]])  # the first (partial) block of the fill
    first = cache(ids, mask, positions)
    ids[0, 6] = 11  # reveal one token: the same block, so a cached pass
    second = cache(ids, mask, positions)
    assert (cache.full_passes, cache.cached_passes) == (1, 1)
    reference = lm.denoise(ids, mask, positions)
    assert torch.allclose(second, reference, atol=1e-5)
    assert not torch.allclose(first, second)


def brute_force_block_elbo(lm, context: list[int], continuation: list[int]) -> float:
    """sum over blocks of sum_k (1/k) mean_{|S|=k} f(S), by enumerating every mask S of the block."""
    total = 0.0
    for lo, hi in continuation_blocks(len(context), len(continuation), lm.block_size):
        prefix, part = context + continuation[:lo], continuation[lo:hi]
        by_size: dict[int, list[float]] = {}
        for size in range(1, len(part) + 1):
            for subset in itertools.combinations(range(len(part)), size):
                ids = torch.tensor([prefix + [lm.denoiser.mask_id if i in subset else t for i, t in enumerate(part)]])
                logp = lm.denoise(ids, torch.ones_like(ids)).float().log_softmax(-1)[0]
                by_size.setdefault(size, []).append(sum(float(logp[len(prefix) + i, part[i]]) for i in subset))
        total += sum(sum(values) / len(values) / size for size, values in by_size.items())
    return total


def test_the_block_elbo_matches_brute_force_enumeration(block_dir):
    lm = build_model(str(block_dir))
    context, continuation = [5, 17, 33], [40, 41, 42, 43, 44, 45]  # blocks of the continuation: 1, 4, 1 tokens
    exact = brute_force_block_elbo(lm, context, continuation)
    [estimate_] = estimate_blockwise(lm.denoise, [LikelihoodRequest(context, continuation, "k")], block_size=BLOCK,
                                     mask_id=lm.denoiser.mask_id, method="mc_count", samples=400, seed=0)
    assert abs(estimate_.logprob - exact) < 4 * estimate_.stderr
    assert estimate_.n_tokens == 6


def test_block_size_one_gives_the_exact_left_to_right_likelihood(block_dir):
    lm = build_model(str(block_dir))
    context, continuation = [5, 17, 33], [40, 41, 42, 43]
    [one] = estimate_blockwise(lm.denoise, [LikelihoodRequest(context, continuation, "k")], block_size=1,
                               mask_id=lm.denoiser.mask_id, method="mc_count", samples=3, seed=0)
    direct = 0.0
    for i, token in enumerate(continuation):  # token i masked after the clean prefix, nothing after it
        ids = torch.tensor([context + continuation[:i] + [lm.denoiser.mask_id]])
        direct += float(lm.denoise(ids, torch.ones_like(ids)).float().log_softmax(-1)[0, -1, token])
    assert one.stderr == 0 and math.isclose(one.logprob, direct, rel_tol=1e-5)
    assert one.nfe == 3 * len(continuation)  # one block per token, each scored by all 3 draws


def test_the_backend_scores_with_the_block_elbo(block_dir):
    lm = build_model(str(block_dir), model_args={"estimator": "chain_rule"})
    request = LoglikelihoodRequest("The quick brown", " fox jumps over")
    [result] = lm.loglikelihood([request])
    context, continuation = lm.encode_pair(request)
    [expected] = estimate_blockwise(lm.denoise, [LikelihoodRequest(context, continuation, "k")], block_size=BLOCK,
                                    mask_id=lm.denoiser.mask_id, method="chain_rule")
    assert math.isclose(result.logprob, expected.logprob, rel_tol=1e-6)


@pytest.mark.parametrize("args, message", [
    ({"block_length": 3}, "does not divide the model's block size"),
    ({"sampler": "diffugpt"}, "decodes block by block"),
])
def test_bad_block_settings_fail_in_one_line(block_dir, args, message):
    with pytest.raises(HarnessError, match=message):
        build_model(str(block_dir), model_args=args)


def test_the_dual_cache_is_refused_for_block_models(block_dir):
    lm = build_model(str(block_dir), model_args={"cache": "dual"})
    with pytest.raises(HarnessError, match="exact cache is cache=prefix"):
        lm.generate([GenerateRequest("Hi", 4)])


def test_a_bad_block_size_in_the_checkpoint_fails(block_dir, tmp_path):
    shutil.copytree(block_dir, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "diffusion_config.json").read_text())
    (tmp_path / "bad" / "diffusion_config.json").write_text(json.dumps({**config, "block_size": 0}))
    with pytest.raises(HarnessError, match="block_size must be a positive integer"):
        build_model(str(tmp_path / "bad"))


def test_bench_variants_give_a_block_model_its_exact_cache_only():
    from harness.perf.throughput import variant_caches

    assert variant_caches(["none", "dual"], "llada", None) == ["none", "dual"]
    assert variant_caches(["none", "dual", "prefix"], "threshold", 8) == ["none", "prefix"]
    assert variant_caches(["none", "dual"], "diffugpt", None) == ["none"]


@pytest.mark.parametrize("name", ["untrained-dlm:smollm2-135m:block0", "untrained-dlm:smollm2-135m:b8",
                                  "untrained-dlm:smollm2-135m:blockx"])
def test_a_bad_untrained_block_name_fails_in_one_line(name):
    from harness.perf.untrained import resolve_target

    with pytest.raises(HarnessError, match="blockB with B > 0"):
        resolve_target(name)


@pytest.mark.parametrize("card_block", [8, 2])
def test_a_card_whose_block_size_contradicts_the_checkpoint_fails(block_dir, card_block):
    from harness.config import DiffusionSpec, ModelCard

    kind = json.loads((block_dir / "diffusion_config.json").read_text())["kind"]
    card = ModelCard(name="card", backend="diffusion", weights={"path": str(block_dir)},
                     diffusion=DiffusionSpec(format="harness", kind=kind, block_size=card_block))
    with pytest.raises(HarnessError, match=f"says block size {card_block} but the harness checkpoint has block size 4"):
        build_model(card)
    matching = ModelCard(name="card", backend="diffusion", weights={"path": str(block_dir)},
                         diffusion=DiffusionSpec(format="harness", kind=kind, block_size=BLOCK))
    assert build_model(matching).block_size == BLOCK


def test_a_card_block_size_must_be_a_positive_integer(tmp_path):
    from harness.config import load_model_card

    card = tmp_path / "m.yaml"
    card.write_text("name: m\nbackend: diffusion\nweights: {path: x}\ndiffusion: {mask_id: 3, block_size: 0}\n")
    with pytest.raises(HarnessError, match="block_size must be a positive integer"):
        load_model_card(card)


def test_reports_name_the_cache_a_generation_ran_with():
    from harness.report.collect import scoring

    base = {"backend": "diffusion", "sampler": {"name": "llada", "steps": 16, "block_length": 8},
            "estimator": {"method": "mc_time", "samples": 32}}
    plain = {"model_fingerprint": {**base, "cache": {"mode": "none", "refresh": None}}}
    cached = {"model_fingerprint": {**base, "cache": {"mode": "dual", "refresh": None}}}
    assert scoring(plain, "generate_until") == "llada, 16 steps, block 8"
    assert scoring(cached, "generate_until") == "llada, 16 steps, block 8, dual cache"
