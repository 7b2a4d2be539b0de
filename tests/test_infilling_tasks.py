"""Infilling and code tasks: real data, canonical solutions pass, code execution gated, runs on tiny models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from harness.catalog import catalog
from harness.errors import HarnessError
from harness.models.base import GenerationResult, InfillRequest
from harness.runner import RunConfig, evaluate

torch.set_num_threads(1)

CODE_TASKS = {"humaneval_infill_single": 1033, "humaneval_infill_multi": 5815, "humaneval_infill_span": 1640,
              "humaneval_infill_span_light": 164, "humaneval": 164}
# Canonical solutions run per task; HARNESS_CANONICAL_SAMPLE=0 runs every one (8,816, a few minutes).
SAMPLE = int(os.environ.get("HARNESS_CANONICAL_SAMPLE", 50))


def task(name, data_dir, **options):
    return catalog().task(name, data_dir, options)


def code_task(name, data_dir, **options):
    return task(name, data_dir, allow_code_exec=True, **options)


def test_rocstories_docs_and_request(data_dir):
    assert len(task("rocstories_infill", data_dir, max_docs=None).selected_docs()) == 1871
    t = task("rocstories_infill", data_dir)
    docs = t.selected_docs()
    assert len(docs) == 1000 and len(t.selected_docs(10)) == 10 and len(t.docs()) == 1871
    (request,) = t.requests(docs[0])
    assert request == InfillRequest(
        prefix="Rick grew up in a troubled household. He never found good support in family, and turned to gangs.",
        suffix=" The incident caused him to turn a new leaf. He is happy now.", n_tokens=0,
        reference=" It wasn't long before Rick got shot in a robbery.")
    assert docs[1]["suffix"].endswith("The brownies are so delicious Laverne eats two of them.")  # the right ending


def test_rocstories_scores_rouge(data_dir):
    t = task("rocstories_infill", data_dir)
    doc = t.docs()[0]
    metrics, extra = t.process(doc, [GenerationResult(" " + doc["middle"], 12, 12)])
    assert metrics == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rouge_avg": 100.0}
    fixed = task("rocstories_infill", data_dir, length="fixed")
    metrics, extra = fixed.process(doc, [GenerationResult(" " + doc["middle"] + " Then more text", 32, 32)])
    assert extra["prediction"] == doc["middle"] and metrics["rouge1"] == 100.0


@pytest.mark.parametrize("name, count", CODE_TASKS.items())
def test_code_task_counts_and_first_request(data_dir, name, count):
    t = code_task(name, data_dir)
    docs = t.docs()
    assert len(docs) == count and "HumanEval/0" in docs[0]["task_id"]
    (request,) = t.requests(docs[0])
    if name == "humaneval":
        assert request.context == docs[0]["prompt"] and request.until == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    else:
        assert (request.prefix, request.suffix) == (docs[0]["prompt"], docs[0]["suffix"])
        assert request.n_tokens == 0 and request.reference == docs[0]["canonical_solution"]


@pytest.mark.parametrize("name", CODE_TASKS)
def test_canonical_solutions_pass(data_dir, name):
    t = code_task(name, data_dir)
    docs = t.docs()
    sample = docs[::max(1, len(docs) // SAMPLE)][:SAMPLE] if SAMPLE else docs
    with ThreadPoolExecutor(2) as pool:
        scored = list(pool.map(lambda d: t.process(d, [GenerationResult(d["canonical_solution"], 0, 0)]), sample))
    failed = [(d["task_id"], extra["status"], extra["stderr"]) for d, (m, extra) in zip(sample, scored)
              if m["pass@1"] != 1.0]
    assert not failed


@pytest.mark.parametrize("name", CODE_TASKS)
def test_wrong_completion_scores_zero(data_dir, name):
    t = code_task(name, data_dir)
    doc = t.docs()[0]
    metrics, extra = t.process(doc, [GenerationResult("    return 'wrong'\n", 8, 8)])
    assert metrics == {"pass@1": 0.0} and extra["status"] == "failed"


def test_fixed_length_trims_single_line_completion(data_dir):
    t = code_task("humaneval_infill_single", data_dir, length="fixed", fixed_tokens=24)
    doc = t.docs()[0]
    (request,) = t.requests(doc)
    assert request.n_tokens == 24 and request.reference is None
    metrics, extra = t.process(doc, [GenerationResult(doc["canonical_solution"] + "    garbage(\n", 24, 24)])
    assert metrics["pass@1"] == 1.0 and extra["completion"] == doc["canonical_solution"]
    assert t.task_hash() != code_task("humaneval_infill_single", data_dir).task_hash()


def test_code_tasks_refuse_without_allow_code_exec(data_dir):
    for name in CODE_TASKS:
        with pytest.raises(HarnessError, match=f"{name} executes model-generated code; re-run with --allow-code-exec"):
            task(name, data_dir).docs()


def test_refusal_comes_before_the_model_is_built(data_dir, tmp_path, monkeypatch):
    import harness.models.factory as factory

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(factory, "build_model", never)
    with pytest.raises(HarnessError, match="--allow-code-exec"):
        evaluate(RunConfig(model="smollm2-135m", tasks=["humaneval"], limit=1, data_dir=data_dir, output=tmp_path))


def test_cli_refuses_code_tasks_without_the_flag(tiny_llama_dir, data_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--model", str(tiny_llama_dir), "--tasks",
                           "rocstories_infill,humaneval_infill_single", "--limit", "1", "--data-dir", str(data_dir),
                           "--output", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "humaneval_infill_single executes model-generated code; re-run with --allow-code-exec" in message
    assert "it runs in the sandbox:" in message


def samples(results, output, task_name):
    path = output / results["harness"]["run_id"] / f"samples_{task_name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("model_fixture, model_args, mode_key, mode", [
    ("tiny_llama_dir", {}, "infill_mode", "prefix"),
    ("tiny_llama_dir", {"infill_mode": "reorder"}, "infill_mode", "reorder"),
    ("tiny_dlm_dir", {"sampler": "diffugpt"}, "sampler", "diffugpt"),
])
def test_end_to_end_infilling_run(model_fixture, model_args, mode_key, mode, request, tiny_tokenizer, data_dir,
                                  tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    tasks = ["rocstories_infill", "humaneval_infill_single"]
    config = RunConfig(model=str(model_dir), tasks=tasks, limit=2, data_dir=data_dir, output=tmp_path,
                       model_args=model_args, task_options={t: {"allow_code_exec": True} for t in tasks})
    results = evaluate(config)
    assert results["results"]["humaneval_infill_single"]["pass@1,none"] == 0.0  # random weights
    assert 0.0 <= results["results"]["rocstories_infill"]["rouge_avg,none"] <= 100.0
    fingerprint = results["config"]["model_fingerprint"]
    assert (fingerprint["sampler"]["name"] if mode_key == "sampler" else fingerprint["infill_mode"]) == mode
    for name in tasks:
        for record in samples(results, tmp_path, name):
            response = record["resps"][0]
            assert record["length"] == "oracle" and response["extra"][mode_key] == mode
            reference = record["arguments"][0]["reference"]
            assert response["n_tokens"] == len(tiny_tokenizer(reference, add_special_tokens=False)["input_ids"])
            assert isinstance(response["text"], str)
    assert "status" in samples(results, tmp_path, "humaneval_infill_single")[0]


def test_suite_options_reach_the_tasks_and_the_run_identity(tiny_llama_dir):
    from harness.plan import plan_run

    config = RunConfig(model=str(tiny_llama_dir), tasks=["rocstories_infill", "humaneval"], suite="infilling",
                       task_options={"humaneval": {"allow_code_exec": True}})
    plan = plan_run(config)
    assert plan.task_options == {"humaneval": {"max_tokens": 256, "allow_code_exec": True}}
    bare = plan_run(RunConfig(model=str(tiny_llama_dir), tasks=["rocstories_infill", "humaneval"],
                              task_options={"humaneval": {"allow_code_exec": True}}))
    assert plan.identity({}) != bare.identity({})
    override = RunConfig(model=str(tiny_llama_dir), tasks=["humaneval"], suite="infilling",
                         task_options={"humaneval": {"max_tokens": 64}})
    assert plan_run(override).task_options["humaneval"] == {"max_tokens": 64}
    assert plan_run(RunConfig(model=str(tiny_llama_dir), tasks=["humaneval"])).task_options == {}


def test_suite_options_by_model_family(tiny_llama_dir, tiny_dlm_dir):
    from harness.plan import plan_run

    tasks = ["piqa_diffugpt", "rocstories_infill_diffugpt"]
    ar = plan_run(RunConfig(model=str(tiny_llama_dir), tasks=tasks, suite="diffugpt-table1"))
    dlm = plan_run(RunConfig(model=str(tiny_dlm_dir), tasks=tasks, suite="diffugpt-table1"))
    assert ar.task_options["piqa_diffugpt"] == {"script": "eval-llm"}
    assert ar.task_options["rocstories_infill_diffugpt"] == {"length": "chars"}
    assert "piqa_diffugpt" not in dlm.task_options  # the family keys hold AR options only
    assert dlm.settings.estimator.method == "paper_grid" and dlm.settings.sampler.temperature == 1.0
