"""Micro-benchmarks of the hot paths (pytest-benchmark), kept out of the default test run.

    make bench-micro     # pytest benchmarks/micro -m benchmark --benchmark-enable -o addopts=""

* ``test_ar_scoring_batch``: ``HFCausalLM.loglikelihood`` on 4 questions x 4 choices (packed rows).
* ``test_dlm_sampler_step``: one ``llada`` step (a denoiser call, the proposal and the reveal) on a
  batch of 4 canvases of 16 prompt + 32 masked positions.
* ``test_training_step``: ``AdaptRecipe.train_step`` of ``harness.train`` (masking, annealed
  attention, CE/t, backward, clipping, AdamW) on 4 sequences of 64 tokens.

The models are the tiny random ones of ``tests/conftest.py``, so the numbers track the code around
the model (packing, masks, sampling) more than the matmuls. Every test is marked ``benchmark``,
which ``pyproject.toml`` deselects by default.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import CORPUS, build_tiny_model, build_tokenizer  # noqa: E402

pytestmark = pytest.mark.benchmark


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_tiny_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_ar_scoring_batch(benchmark, tiny_dir):
    from harness.models.base import LoglikelihoodRequest
    from harness.models.factory import build_model

    lm = build_model(str(tiny_dir), batch_size=16)
    requests = [LoglikelihoodRequest(question, " " + choice) for question in CORPUS[:4] for choice in CORPUS[1:5]]
    results = benchmark(lm.loglikelihood, requests)
    assert len(results) == 16


def test_dlm_sampler_step(benchmark):
    from harness.models.diffusion.backend import DiffusionLM
    from harness.models.diffusion.formats import Denoiser, FullAttention
    from harness.models.diffusion.samplers import FillRequest, llada_sample
    from harness.train.recipe import add_mask_token

    tokenizer = build_tokenizer()
    model = build_tiny_model("llama", len(tokenizer))
    mask_id = add_mask_token(model, tokenizer)
    lm = DiffusionLM(Denoiser(FullAttention(model), tokenizer, mask_id, True, "harness", "tiny", 512), name="tiny")
    prompt = lm.encode(" ".join(CORPUS))[:16]
    fills = [FillRequest(prompt, 32, (), str(row)) for row in range(4)]
    out = benchmark(lambda: llada_sample(lm.denoise, fills, mask_id=mask_id, steps=1))
    assert out.steps == 1 and all(mask_id not in row for row in out.tokens)


def test_training_step(benchmark, tiny_dir, tmp_path):
    from harness.train.config import build_config
    from harness.train.recipe import AdaptRecipe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 40))
    config = build_config(base=str(tiny_dir), data=str(corpus), output_dir=str(tmp_path / "adapt"), steps=100_000,
                          seq_len=64, batch_size=4, warmup_steps=1)
    recipe = AdaptRecipe(config, str(tiny_dir))
    recipe.setup()
    steps = itertools.count()
    loss, _ = benchmark(lambda: recipe.train_step(next(steps)))
    assert loss > 0
