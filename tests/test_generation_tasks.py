"""Generation tasks: metric cases as data, prompts from the real files, oracle lengths, runs on tiny models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from harness.catalog import catalog
from harness.errors import HarnessError
from harness.models.base import GenerateRequest, GenerationResult
from harness.models.factory import build_model
from harness.registry import import_string
from harness.runner import RunConfig, evaluate

torch.set_num_threads(1)

CASES_DIR = Path(__file__).parent / "metric_cases"
CASES = [(path.stem, case) for path in sorted(CASES_DIR.glob("*.yaml")) for case in yaml.safe_load(path.read_text())]


def matches(value, expected, tolerance: float) -> bool:
    if isinstance(expected, dict):
        return set(value) == set(expected) and all(matches(value[k], expected[k], tolerance) for k in expected)
    if isinstance(expected, float) and not isinstance(value, bool):
        return value is not None and math.isclose(value, expected, rel_tol=0.0, abs_tol=tolerance)
    return value == expected


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[f"{f}: {c['name']}" for f, c in CASES])
def test_metric_case(case):
    """One case: metric(output, **input) equals expected within tolerance."""
    value = import_string(case["metric"])(case["output"], **case["input"])
    assert matches(value, case["expected"], case.get("tolerance", 0.0)), value


def task(name, data_dir, **options):
    return catalog().task(name, data_dir, options)


@pytest.mark.parametrize("name, count, field", [
    ("triviaqa", 3000, "Question: Brunswick, Lancastrian and Pearl Pickler are types of which vegetable??\nAnswer:"),
    ("triviaqa_foundry", 3000, "Question: Brunswick, Lancastrian and Pearl Pickler are types of which vegetable?\nAnswer:"),
    ("squad", 10570, "\n\nQuestion: Which NFL team represented the AFC at Super Bowl 50?\n\nAnswer:"),
    ("triviaqa_diffugpt", 2000, "\nQuesionWhich NFL team represented the AFC at Super Bowl 50??\nAnswer: "),
    ("gsm8k", 1319, "\n\nQuestion: Janet’s ducks lay 16 eggs per day."),
    ("gsm8k_symbolic", 1319, "Question: Janet’s ducks lay 16 eggs per day."),
    ("mawps", 238, "\n\nQuestion: Nicole found an orange caterpillar"),
    ("sat_math", 220, "Q: If $\\frac{x-1}{3}=k$ and $k=3$, what is the value of $x ?$ "
                      "Answer Choices: (A)2 (B)4 (C)9 (D)10\nA: Among A through D, the answer is"),
    ("lambada_gen", 5153, "in my palm is a clear stone"),
])
def test_first_prompt_from_real_data(data_dir, name, count, field):
    t = task(name, data_dir)
    docs = t.selected_docs()
    assert len(docs) == count
    (request,) = t.requests(docs[0])
    assert isinstance(request, GenerateRequest) and field in request.context


def test_prompt_shapes_and_targets(data_dir):
    (gsm,) = task("gsm8k", data_dir).requests(task("gsm8k", data_dir).docs()[0])
    assert gsm.context.count("Question: ") == 6 and gsm.context.count("#### ") == 5 and gsm.context.endswith("Answer:")
    assert gsm.until == ("Question:", "</s>", "<|im_end|>") and gsm.max_tokens == 256
    mawps = task("mawps", data_dir)
    (request,) = mawps.requests(mawps.docs()[0])
    assert request.context.count(" #### ") == 4 and mawps.docs()[0]["value"] == pytest.approx(1.8333333333333335)
    lambada = task("lambada_gen", data_dir)
    (request,) = lambada.requests(lambada.docs()[0])
    assert request.max_tokens == 0 and request.reference == " signs" and not request.context.endswith(" ")
    squad = task("triviaqa_diffugpt", data_dir)
    (request,) = squad.requests(squad.docs()[0])
    # eval-diffugpt.py: every distinct gold answer, the longest in tokens, no slack (see test_diffugpt_protocol_tasks)
    assert request.reference == ("Denver Broncos",) and request.max_tokens == 0 and request.until == ()


def test_fewshot_is_seeded_per_document(data_dir):
    a, b = task("gsm8k", data_dir), task("gsm8k", data_dir)
    docs = a.docs()
    assert a.requests(docs[3]) == b.requests(b.docs()[3])
    shots = [a.requests(doc)[0].context.rsplit("\n\nQuestion: ", 1)[0] for doc in docs[3:5]]
    assert shots[0] != shots[1]
    other_seed = task("gsm8k", data_dir, fewshot_seed=7)
    assert other_seed.requests(other_seed.docs()[3]) != a.requests(docs[3])
    assert other_seed.task_hash() != a.task_hash()
    zero = task("gsm8k", data_dir, num_fewshot=0)
    assert zero.requests(zero.docs()[0])[0].context.startswith("Question: Janet")


def test_sat_math_fewshot_never_shows_the_question_itself(data_dir):
    t = task("sat_math", data_dir, num_fewshot=3)
    for doc in t.docs()[:20]:
        (request,) = t.requests(doc)
        assert request.context.count(doc["question"]) == 1 and request.context.count("the answer is") == 4


def test_settings_record_every_generation_option(data_dir):
    settings = task("gsm8k", data_dir, allow_code_exec=True).settings()
    assert settings["options"] == {"prompt": "Question: {question}\nAnswer:",
                                   "until": ["Question:", "</s>", "<|im_end|>"], "max_tokens": 256,
                                   "num_fewshot": 5, "fewshot_seed": 1234, "fewshot_sampler": "seeded", "max_docs": None}


def test_unknown_option_and_bad_length_are_clear_errors(data_dir):
    with pytest.raises(HarnessError, match="unknown option.*num_fewshots"):
        task("gsm8k", data_dir, num_fewshots=3)
    with pytest.raises(HarnessError, match="length must be one of fixed, oracle, chars"):
        task("squad", data_dir, length="exact")


def test_process_extracts_and_scores(data_dir):
    gsm = task("gsm8k", data_dir)
    doc = gsm.docs()[0]
    metrics, extra = gsm.process(doc, [GenerationResult(" 16 - 3 - 4 = 9 and 9 * 2 = 18\n#### 18", 20, 20)])
    assert metrics == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0} and extra["target"] == "18"
    trivia = task("triviaqa", data_dir)
    assert trivia.process(trivia.docs()[0], [GenerationResult(" onions", 2, 2)])[0] == {"exact_match": 1.0}
    # lm-eval's definition: no article removal, no space collapsing
    assert trivia.process(trivia.docs()[0], [GenerationResult(" the onions", 2, 2)])[0] == {"exact_match": 0.0}
    foundry = task("triviaqa_foundry", data_dir)
    metrics, _ = foundry.process(foundry.docs()[0], [GenerationResult(" the onions", 2, 2)])
    assert metrics == {"exact_match": 1.0, "f1": 1.0, "contains": 1.0}
    sat = task("sat_math", data_dir)
    assert sat.process(sat.docs()[0], [GenerationResult(" (D)10", 3, 3)])[0] == {"acc": 1.0}


def test_backends_count_oracle_tokens(tiny_llama_dir, tiny_dlm_dir, tiny_tokenizer):
    reference = " statuette angel"
    n = len(tiny_tokenizer(reference, add_special_tokens=False)["input_ids"])
    ar = build_model(str(tiny_llama_dir))
    (out,) = ar.generate([GenerateRequest("The quick brown", 0, reference=reference)])
    assert out.n_tokens <= n
    dlm = build_model(str(tiny_dlm_dir))
    (out,) = dlm.generate([GenerateRequest("The quick brown", 0, reference=reference)])
    assert out.extra["steps"] == n  # one diffusion step per token, as DiffuGPT's LAMBADA protocol
    (slack,) = dlm.generate([GenerateRequest("The quick brown", 3, reference=reference)])
    assert slack.extra["steps"] == n + 3


def samples(results, output, task_name):
    path = output / results["harness"]["run_id"] / f"samples_{task_name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_dlm_dir"])
def test_end_to_end_generation_run(model_fixture, request, data_dir, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    config = RunConfig(model=str(model_dir), tasks=["lambada_gen", "triviaqa"], limit=2, data_dir=data_dir,
                       output=tmp_path, task_options={"triviaqa": {"max_tokens": 6}})
    results = evaluate(config)
    assert set(results["results"]["triviaqa"]) >= {"exact_match,none", "exact_match_stderr,none"}
    assert results["configs"]["lambada_gen"]["options"]["length"] == "oracle"
    assert results["configs"]["triviaqa"]["options"]["max_tokens"] == 6
    records = samples(results, tmp_path, "lambada_gen")
    assert len(records) == 2
    for record in records:
        assert record["arguments"][0]["reference"] == " " + record["target"]
        assert isinstance(record["resps"][0]["text"], str) and record["length"] == "oracle"
        if model_fixture == "tiny_dlm_dir":
            assert record["resps"][0]["extra"]["sampler"] == "llada"
    trivia = samples(results, tmp_path, "triviaqa")
    assert all(r["resps"][0]["n_tokens"] <= 6 for r in trivia)
