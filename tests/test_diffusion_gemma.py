"""DiffusionGemma through transformers' own classes, on a tiny random DiffusionGemmaConfig model.

The backend must give what the model's own ``generate`` gives under the request's seed, count its
decoder passes, refuse likelihood tasks with one line and run through ``harness run`` and
``harness bench``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import build_tokenizer
from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.models.base import GenerateRequest, InfillRequest, LoglikelihoodRequest, RollingRequest
from harness.models.diffusion.estimators import seeded_generator
from harness.models.factory import build_model, resolve_card
from harness.store import Store

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CANVAS = 8
PROMPT = "The quick brown fox"


def tiny_config(tokenizer):
    """3.3 MB of weights: text hidden 64, two layers (sliding, full), 4 experts (top 2), a one-layer vision tower."""
    from transformers import DiffusionGemmaConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                layer_types=["sliding_attention", "full_attention"], sliding_window=16, num_experts=4,
                top_k_experts=2, moe_intermediate_size=32, per_layer_config={}, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id)
    vision = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, position_embedding_size=64)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    from transformers import DiffusionGemmaForBlockDiffusion

    path = tmp_path_factory.mktemp("tiny-diffusiongemma")
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.chat_template = CHAT
    torch.manual_seed(0)
    DiffusionGemmaForBlockDiffusion(tiny_config(tokenizer)).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(gemma_dir):
    """The checkpoint loaded straight from transformers, apart from the backend's copy."""
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    return (DiffusionGemmaForBlockDiffusion.from_pretrained(gemma_dir).eval(),
            AutoTokenizer.from_pretrained(gemma_dir))


@pytest.fixture(scope="module")
def lm(gemma_dir):
    return build_model(str(gemma_dir), model_args={"max_denoising_steps": 3})


def direct(reference, ids, budget, seed, **settings):
    """The model's own generate on ``ids`` under ``seed``: (new tokens, tokens_per_forward)."""
    model, tok = reference
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens=budget, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **settings)
    return out.sequences[0, len(ids):].tolist(), float(out.tokens_per_forward[0])


def chat_ids(tok, text):
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def kept(tokens, budget, eos):
    tokens = tokens[:budget]
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def seed_of(run_seed, *key):
    return seeded_generator(run_seed, stable_hash(list(key))).initial_seed()


def test_a_diffusiongemma_directory_resolves_to_the_backend(gemma_dir):
    from transformers import DiffusionGemmaConfig

    assert json.loads((gemma_dir / "config.json").read_text())["model_type"] == DiffusionGemmaConfig.model_type
    card = resolve_card(str(gemma_dir))
    assert (card.backend, card.weights) == ("diffusion_gemma", {"path": str(gemma_dir)})


def test_generate_is_the_models_own_generate_under_the_request_seed(gemma_dir, reference):
    model = build_model(str(gemma_dir))  # every sampler setting from the checkpoint / transformers' defaults
    model.seed = 1234
    (result,) = model.generate([GenerateRequest(PROMPT, max_tokens=12)])
    ids = chat_ids(reference[1], PROMPT)
    tokens, tpf = direct(reference, ids, 12, seed_of(1234, PROMPT, 12))
    expected = kept(tokens, 12, reference[1].eos_token_id)
    assert result.text == reference[1].decode(expected, skip_special_tokens=True)
    assert result.n_tokens == len(expected) == 12
    # two 8-token canvases, each 48 decoder passes: a random model never meets the adaptive stop
    assert (result.nfe, result.extra["canvas_tokens"]) == (96, 16)
    assert result.extra["tokens_per_forward"] == tpf == pytest.approx(16 / 96)  # a float32 tensor
    assert model.fingerprint["sampler"] == {"name": "entropy_bound", "steps": 48, "t_min": 0.4, "t_max": 0.8,
                                            "entropy_bound": 0.1, "stability_threshold": 1,
                                            "confidence_threshold": 0.005}
    assert model.fingerprint["chat_template"] is True and model.fingerprint["canvas_length"] == CANVAS


def test_seeds_and_batch_order(lm, reference):
    lm.seed = 7
    requests = [GenerateRequest(PROMPT, max_tokens=10), GenerateRequest("Sarah was a surgeon", max_tokens=6)]
    first = lm.generate(requests)
    assert [r.text for r in lm.generate(requests[::-1])] == [r.text for r in first][::-1]
    tokens, _ = direct(reference, chat_ids(reference[1], PROMPT), 10, seed_of(7, PROMPT, 10), max_denoising_steps=3)
    assert first[0].text == reference[1].decode(kept(tokens, 10, reference[1].eos_token_id), skip_special_tokens=True)
    lm.seed = 8
    assert lm.generate(requests[:1])[0].text != first[0].text
    state = torch.get_rng_state()
    lm.generate(requests[:1])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was


def test_nfe_and_tokens_per_forward_match_a_count_of_decoder_calls(lm):
    lm.seed = 1234
    calls = []
    handle = lm.model.model.decoder.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        (result,) = lm.generate([GenerateRequest(PROMPT, max_tokens=12)])
    finally:
        handle.remove()
    assert result.nfe == len(calls) == 2 * 3  # two canvases of three steps (max_denoising_steps=3)
    assert result.extra["tokens_per_forward"] == pytest.approx(result.extra["canvas_tokens"] / len(calls)) \
        == pytest.approx(16 / 6)


def test_stop_sequences_cut_the_text(lm):
    lm.seed = 1234
    (free,) = lm.generate([GenerateRequest(PROMPT, max_tokens=12)])
    stop = free.text[3:5]
    (cut,) = lm.generate([GenerateRequest(PROMPT, max_tokens=12, until=(stop,))])
    assert cut.text == free.text[:free.text.index(stop)] and cut.nfe == free.nfe


def test_chat_template_off_prompts_the_raw_text_after_bos(gemma_dir, reference):
    model = build_model(str(gemma_dir), model_args={"chat_template": False, "max_denoising_steps": 2})
    model.seed = 3
    (result,) = model.generate([GenerateRequest(PROMPT, max_tokens=8)])
    tok = reference[1]
    ids = [tok.bos_token_id] + tok(PROMPT, add_special_tokens=False)["input_ids"]
    tokens, _ = direct(reference, ids, 8, seed_of(3, PROMPT, 8), max_denoising_steps=2)
    assert result.text == tok.decode(kept(tokens, 8, tok.eos_token_id), skip_special_tokens=True)
    assert model.fingerprint["chat_template"] is False and model.fingerprint["sampler"]["steps"] == 2


def test_infill_generates_after_the_prefix(lm, reference, gemma_dir):
    tok = reference[1]
    lm.seed = 5
    request = InfillRequest("def add(a, b):\n", "\n    return c\n", n_tokens=5)
    (result,) = lm.infill([request])
    ids = [tok.bos_token_id] + tok(request.prefix, add_special_tokens=False)["input_ids"]
    tokens, _ = direct(reference, ids, 5, seed_of(5, request.prefix, request.suffix, 5), max_denoising_steps=3)
    assert result.text == tok.decode(kept(tokens, 5, tok.eos_token_id), skip_special_tokens=True)
    assert (result.n_tokens, result.nfe, result.extra["infill_mode"]) == (5, 3, "prefix")
    reorder = build_model(str(gemma_dir), model_args={"max_denoising_steps": 3, "infill_mode": "reorder"})
    reorder.seed = 5
    (moved,) = reorder.infill([request])
    ids = [tok.bos_token_id] + tok(f"{request.suffix}\n\n{request.prefix}", add_special_tokens=False)["input_ids"]
    tokens, _ = direct(reference, ids, 5, seed_of(5, request.prefix, request.suffix, 5), max_denoising_steps=3)
    assert moved.text == tok.decode(kept(tokens, 5, tok.eos_token_id), skip_special_tokens=True)
    assert moved.extra["infill_mode"] == "reorder"


def test_max_input_tokens_skips_a_request(lm):
    (result,) = lm.generate([GenerateRequest(PROMPT, max_tokens=12, gen_kwargs={"max_input_tokens": 10})])
    assert (result.text, result.nfe) == ("", 0) and result.extra["skipped"].endswith("> 10")


def test_likelihood_is_refused_with_one_line(lm):
    with pytest.raises(HarnessError, match="^DiffusionGemma's uniform-noise process defines no ELBO"):
        lm.loglikelihood([LoglikelihoodRequest("a", " b")])
    with pytest.raises(HarnessError, match="defines no ELBO"):
        lm.loglikelihood_rolling([RollingRequest("a b c")])


def test_bad_settings_are_one_line_errors(gemma_dir):
    with pytest.raises(HarnessError, match="unknown model argument.*steps for a DiffusionGemma model"):
        build_model(str(gemma_dir), model_args={"steps": 3})
    with pytest.raises(HarnessError, match="t_max must be > t_min"):
        build_model(str(gemma_dir), model_args={"t_min": 0.9})  # t_max: transformers' 0.8
    with pytest.raises(HarnessError, match="entropy_bound must be > 0"):
        build_model(str(gemma_dir), model_args={"entropy_bound": 0})


def cli(*args):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_cli_run_lambada_gen_stores_results(gemma_dir, data_dir, tmp_path):
    done = cli("run", "--model", str(gemma_dir), "--tasks", "lambada_gen", "--limit", "2", "--data-dir",
               str(data_dir), "--output", str(tmp_path), "--model-args", "max_denoising_steps=2")
    assert done.returncode == 0, done.stderr
    (run,) = Store(tmp_path / "store.sqlite").runs()
    assert run["status"] == "complete" and run["model_fingerprint"]["backend"] == "diffusion_gemma"
    assert run["model_fingerprint"]["sampler"]["steps"] == 2
    saved = json.loads((tmp_path / run["run_id"] / "results.json").read_text())
    assert saved["n-samples"]["lambada_gen"]["effective"] == 2
    assert saved["results"]["lambada_gen"]["acc,none"] == 0.0  # random weights
    lines = (tmp_path / run["run_id"] / "samples_lambada_gen.jsonl").read_text().splitlines()
    first = json.loads(lines[0])["resps"][0]
    assert len(lines) == 2 and first["n_tokens"] == len(build_tokenizer()(" signs")["input_ids"]) == 4
    # one 8-token canvas in two decoder passes (max_denoising_steps=2)
    assert (first["nfe"], first["extra"]["canvas_tokens"], first["extra"]["tokens_per_forward"]) == (2, 8, 4.0)


def test_cli_refuses_a_likelihood_task_before_loading(gemma_dir, data_dir, tmp_path):
    done = cli("run", "--model", str(gemma_dir), "--tasks", "piqa", "--limit", "2", "--data-dir", str(data_dir),
               "--output", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: DiffusionGemma's uniform-noise process defines no ELBO the harness "
                                   "implements; likelihood tasks need an AR or masked-diffusion model (piqa score "
                                   "log-likelihoods)")
    assert not (tmp_path / "store.sqlite").exists()


def test_cli_bench_records_nfe_and_tokens_per_forward(gemma_dir, tmp_path):
    done = cli("bench", "--model", str(gemma_dir), "--output", str(tmp_path), "--gen-length", "8", "--steps", "2",
               "--prompt-length", "6", "--repeats", "2", "--warmup", "0")
    assert done.returncode == 0, done.stderr
    (run,) = Store(tmp_path / "store.sqlite").runs(kind="throughput")
    lines = (tmp_path / run["run_id"] / "measurements.jsonl").read_text().splitlines()
    (record,) = [json.loads(line) for line in lines]
    assert (record["variant"], record["backend"], record["first_token_kind"]) == ("entropy_bound", "diffusion_gemma",
                                                                                 "first_step")
    assert record["setting"] == {"gen_length": 8, "prompt_length": 6, "batch_size": 1, "steps": 2}
    # one 8-token canvas, two decoder passes over its 8 positions
    assert (record["nfe"], record["processed_tokens"]) == (2.0, 16.0)
    assert (record["generated_tokens"], record["tpf"]) == (8.0, 4.0)  # no EOS drawn: all 8 tokens in 2 passes
    assert record["fingerprint"]["sampler"]["steps"] == 2


def test_reports_count_it_as_a_dlm(lm):
    from harness.report.collect import family, scoring

    run = {"model_fingerprint": lm.fingerprint}
    assert family(run) == "DLM"
    assert scoring(run, "generate_until") == "entropy_bound, 3 steps"


def test_the_card_and_its_settings():
    from harness.catalog import catalog
    from harness.plan import RunConfig, plan_run

    card = catalog().models.get("diffusiongemma-26b-a4b-it")
    assert (card.backend, card.weights, card.dtype, card.defaults) == (
        "diffusion_gemma", {"hub": "google/diffusiongemma-26B-A4B-it"}, "bfloat16", {"chat_template": True})
    plan = plan_run(RunConfig(model=card.name, tasks=["lambada_gen"], model_args={"max_denoising_steps": 16}))
    assert (plan.family, plan.settings.chat_template, plan.settings.max_denoising_steps) == (
        "diffusion_gemma", True, 16)
    # a suite's masked-diffusion arguments (family "diffusion") do not reach it
    bench = plan_run(RunConfig(model=card.name, tasks=[], suite="throughput-quick"), require_tasks=False)
    assert bench.model_args == {}


def test_from_pretrained_keeps_the_buffers_and_logits(gemma_dir, reference):
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(0)
    built = DiffusionGemmaForBlockDiffusion(tiny_config(reference[1])).eval()
    loaded = reference[0]
    assert all(torch.equal(a, b) for a, b in zip(built.buffers(), loaded.buffers()))  # rotary inv_freq included
    ids, canvas = torch.tensor([[5, 6, 7, 8]]), torch.arange(1, CANVAS + 1)[None]
    with torch.no_grad():
        assert torch.equal(built(input_ids=ids, decoder_input_ids=canvas).logits,
                           loaded(input_ids=ids, decoder_input_ids=canvas).logits)


def test_bfloat16_generates(gemma_dir):
    model = build_model(str(gemma_dir), dtype="bfloat16", model_args={"max_denoising_steps": 2})
    (result,) = model.generate([GenerateRequest(PROMPT, max_tokens=8)])
    assert next(model.model.parameters()).dtype == torch.bfloat16 and model.fingerprint["dtype"] == "bfloat16"
    assert (result.nfe, result.extra["canvas_tokens"]) == (2, 8)
