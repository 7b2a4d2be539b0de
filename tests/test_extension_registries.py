"""Samplers, likelihood estimators and checkpoint formats are found through registries."""
from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.models.diffusion.estimators import ESTIMATORS, METHODS, LikelihoodRequest, Plan, estimate
from harness.models.diffusion.formats import FORMATS, load_denoiser
from harness.models.diffusion.samplers import SAMPLERS, FillRequest, SampleOutput
from harness.registry import Registry

VOCAB, MASK = 8, 7


def denoise(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A fixed toy model: position i's logits favour token (i mod 7)."""
    logits = torch.zeros(*input_ids.shape, VOCAB)
    positions = torch.arange(input_ids.shape[1])
    logits[:, positions, positions % 7] = 2.0
    return logits


@pytest.fixture
def scratch(monkeypatch):
    """Registrations made in a test are dropped afterwards."""
    for registry in (ESTIMATORS, SAMPLERS, FORMATS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))


def test_the_registries_list_the_built_in_extensions():
    assert list(FORMATS) == ["diffugpt", "diffullama", "smdm", "llada", "harness", "bd3lm", "sdar", "fast_dllm_v2",
                             "dream", "llada2"]
    assert list(ESTIMATORS) == ["mc_time", "mc_count", "paper_grid", "paper_grid_forced", "chain_rule"]
    assert list(SAMPLERS) == ["diffugpt", "llada", "threshold", "entropy_bounded"]
    assert METHODS is ESTIMATORS and ", ".join(SAMPLERS) == "diffugpt, llada, threshold, entropy_bounded"


def test_a_registered_sampler_is_found(scratch):
    @SAMPLERS.register("toy")
    def toy_sample(denoise, requests, *, mask_id: int, seed: int = 0) -> SampleOutput:
        return SampleOutput([[0] * r.n_tokens for r in requests], nfe=0, steps=0)

    assert "toy" in SAMPLERS and SAMPLERS["toy"] is toy_sample and "toy" in list(SAMPLERS)
    out = SAMPLERS["toy"](denoise, [FillRequest([1], 3)], mask_id=MASK)
    assert out.tokens == [[0, 0, 0]]


def test_a_registered_estimator_is_used_by_estimate(scratch):
    @ESTIMATORS.register("all_masked")
    def plan_all_masked(length: int, samples: int, eps: float, gen: torch.Generator) -> Plan:
        masked = torch.ones(1, length, dtype=torch.bool)
        return Plan(masked, masked, torch.ones(1, dtype=torch.float64), exact=True)

    assert "all_masked" in METHODS
    [est] = estimate(denoise, [LikelihoodRequest([1, 2], [2, 3], "k")], mask_id=MASK, method="all_masked")
    logp = torch.log_softmax(torch.tensor([2.0] + [0.0] * (VOCAB - 1)), -1)[0].item()
    assert est.logprob == pytest.approx(2 * logp) and est.is_greedy and est.nfe == 1 and est.stderr == 0.0


@pytest.mark.parametrize(("registry", "call", "typo", "suggestion"), [
    (SAMPLERS, lambda name: SAMPLERS[name], "lada", "llada"),
    (ESTIMATORS, lambda name: estimate(denoise, [], mask_id=MASK, method=name), "mc_tim", "mc_time"),
    (FORMATS, lambda name: load_denoiser("anything", name), "smdn", "smdm"),
])
def test_unknown_names_suggest_and_list_the_known_ones(registry: Registry, call, typo: str, suggestion: str):
    with pytest.raises(HarnessError) as raised:
        call(typo)
    message = str(raised.value)
    assert f"unknown {registry.kind} '{typo}'; did you mean {suggestion}" in message
    assert f"(known: {', '.join(sorted(registry))})" in message
