"""The diffusion backend behind the scorer interface: alignment, runs through the store, bad input."""
import json
import subprocess
import sys

import pytest
import torch

from harness.config import load_model_card
from harness.errors import HarnessError
from harness.models.base import GenerateRequest, InfillRequest, LoglikelihoodRequest
from harness.models.factory import build_model
from harness.runner import RunConfig, evaluate


def test_shifted_logits_are_aligned_to_the_token_they_predict(tiny_dlm_dir):
    lm = build_model(str(tiny_dlm_dir))
    ids = torch.tensor([[1, 5, 7, lm.denoiser.mask_id, 9]])
    mask = torch.ones_like(ids)
    raw = lm.denoiser.model(ids, mask)
    aligned = lm.denoise(ids, mask)
    assert torch.equal(aligned[:, 1:], raw[:, :-1])


def test_full_attention_later_token_changes_earlier_logits(tiny_dlm_dir):
    lm = build_model(str(tiny_dlm_dir))
    a = torch.tensor([[1, 5, 7, 8, 9]])
    b = torch.tensor([[1, 5, 7, 8, 10]])
    mask = torch.ones_like(a)
    assert not torch.allclose(lm.denoise(a, mask)[0, 2], lm.denoise(b, mask)[0, 2])


def test_same_seed_same_estimate_at_any_batch_size(tiny_dlm_dir):
    requests = [LoglikelihoodRequest("The quick brown", " fox jumps"), LoglikelihoodRequest("Answer:", " yes")]
    small = build_model(str(tiny_dlm_dir), batch_size=1, model_args={"samples": 8}).loglikelihood(requests)
    large = build_model(str(tiny_dlm_dir), batch_size=64, model_args={"samples": 8}).loglikelihood(requests)
    for a, b in zip(small, large):
        assert abs(a.logprob - b.logprob) < 1e-4 and a.stderr == pytest.approx(b.stderr, abs=1e-4)


def test_run_stores_estimator_settings_and_per_example_stderr(tiny_dlm_dir, data_dir, tmp_path):
    config = RunConfig(model=str(tiny_dlm_dir), tasks=["hellaswag", "piqa"], limit=4, data_dir=data_dir,
                       output=tmp_path, model_args={"estimator": "mc_time", "samples": 4})
    results = evaluate(config)
    fingerprint = results["config"]["model_fingerprint"]
    assert fingerprint["estimator"] == {"method": "mc_time", "samples": 4, "eps": 1e-3, "cfg_scale": 0.0,
                                          "greedy": "parallel"}
    samples = (tmp_path / results["harness"]["run_id"] / "samples_piqa.jsonl").read_text().splitlines()
    stderrs = json.loads(samples[0])["loglikelihood_stderrs"]
    assert len(stderrs) == 2 and all(s > 0 for s in stderrs)


def test_generation_and_infill_keep_context(tiny_dlm_dir):
    lm = build_model(str(tiny_dlm_dir), model_args={"sampler": "llada", "steps": 4})
    gen = lm.generate([GenerateRequest("The quick brown", max_tokens=4)])[0]
    assert gen.nfe == 4 and gen.n_tokens <= 4
    fill = lm.infill([InfillRequest("def add(a, b):", "\n", n_tokens=3)])[0]
    assert fill.n_tokens == 3 and fill.extra["sampler"] == "llada"


def test_continuation_longer_than_context_is_a_clear_error(tiny_dlm_dir):
    lm = build_model(str(tiny_dlm_dir))
    with pytest.raises(HarnessError, match="does not fit"):
        lm.loglikelihood([LoglikelihoodRequest("a", " b" * 600)])


def test_card_without_mask_id_is_rejected(tmp_path):
    card = tmp_path / "bad.yaml"
    card.write_text("name: bad\nbackend: diffusion\nweights: {hub: x/y}\ndiffusion: {kind: shifted}\n")
    with pytest.raises(HarnessError, match="mask_id"):
        load_model_card(card)


def test_cli_run_on_dlm_reports_unknown_estimator(tiny_dlm_dir, data_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--model", str(tiny_dlm_dir), "--tasks", "piqa",
                           "--limit", "2", "--data-dir", str(data_dir), "--output", str(tmp_path),
                           "--model-args", "estimator=mc_tim"], capture_output=True, text=True)
    assert done.returncode == 2 and "mc_tim" in done.stderr and "Traceback" not in done.stderr
