"""lm-eval's own triviaqa and gsm8k (on the local data, harness.lm_eval_tasks) and the harness's tasks
of those names: the same documents, prompts, stops, budgets and per-document scores."""
import json
import re

import pytest

pytest.importorskip("lm_eval")

from harness.catalog import catalog  # noqa: E402
from harness.lm_eval_import import metric_name  # noqa: E402
from harness.models.base import GenerationResult  # noqa: E402
from harness.models.lm_eval_bridge import generate_request  # noqa: E402

TRIVIAQA_DOCS, GSM8K_DOCS, GSM8K_PROMPTS = 30, 10, 30
TRICKY = ["", " ", "\n", "Paris", " paris", "PARIS!", "The answer is 42.", "#### 1,234", "#### 1234", "$5.",
          "5", " 5 ", "-3.", "don't", "Mr. Smith", "  Onion  ", "onion\n", "18", "#### 18", "#### $18.",
          "so 16 - 3 - 4 = 9 and 9 * 2 = 18.\n#### 18\n\nQuestion:", "3,000 and then 4,000"]


@pytest.fixture(scope="module")
def folder(data_dir, tmp_path_factory):
    from harness.lm_eval_tasks import task_folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield task_folder(data_dir)


@pytest.fixture(scope="module")
def manager(folder):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder))


@pytest.fixture(scope="module")
def lm_eval_tasks(manager):
    return manager.load(["triviaqa", "gsm8k"])["tasks"]


def built(task, limit: int) -> list:
    """The task's instances as lm-eval's simple_evaluate and evaluate build them (default few-shot count,
    fewshot seed 1234, rank 0 of 1)."""
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return sorted(task.instances, key=lambda inst: inst.doc_id)


def lm_eval_scores(task, instances: list, response: str) -> list[dict[str, float]]:
    """Per document: lm-eval's metrics of ``response`` under every filter, named as the import names them."""
    for inst in task.instances:
        inst.resps = [response]
    task.apply_filters()
    filters = set(instances[0].filtered_resps)
    return [{metric_name(metric, key, filters): value for key in instances[0].filtered_resps
             for metric, value in task.process_results(inst.doc, [inst.filtered_resps[key]]).items()}
            for inst in instances]


def harness_scores(task, docs: list, response: str) -> list[dict[str, float]]:
    return [task.process(doc, [GenerationResult(text=response, n_tokens=0, nfe=0)])[0] for doc in docs]


def test_local_task_folder_loads_offline(folder, manager, lm_eval_tasks, data_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert sorted(p.name for p in folder.iterdir()) == ["gsm8k", "lambada_openai", "piqa", "social_iqa", "triviaqa",
                                                        "winogrande"]
    for name in ("triviaqa", "gsm8k"):
        assert manager.task_index[name].yaml_path == folder / name / f"{name}.yaml"
    # lm-eval's tag keeps its tasks (a tag in the include path would replace it)
    assert {"gsm8k", "gsm8k_cot_zeroshot", "mathqa", "aime"} <= manager.task_index["math_word_problems"].tags
    trivia, gsm8k = lm_eval_tasks["triviaqa"], lm_eval_tasks["gsm8k"]
    local = [json.loads(line) for line in (data_dir / "triviaqa/triviaqa_sm_sub.jsonl").open()]
    assert len(trivia.eval_docs) == len(local) == 3000
    assert dict(trivia.eval_docs[0]) == {"question": "Brunswick, Lancastrian and Pearl Pickler are types of which "
                                                     "vegetable?", "answer": {"aliases": local[0]["aliases"],
                                                                              "value": "Onion"}}
    tests = [json.loads(line) for line in (data_dir / "gsm8k/test.jsonl").open()]
    train = [json.loads(line) for line in (data_dir / "gsm8k/train.jsonl").open()]
    assert [dict(gsm8k.eval_docs[i]) for i in (0, 1318)] == [tests[0], tests[1318]]
    assert (len(gsm8k.eval_docs), len(gsm8k.fewshot_docs()), dict(gsm8k.fewshot_docs()[0])) == (1319, 7473, train[0])


def test_local_task_folder_is_cached(folder, data_dir):
    from harness.lm_eval_tasks import task_folder

    before = (folder / "triviaqa" / "validation.jsonl").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_CACHE_DIR", str(folder.parent.parent))
        assert task_folder(data_dir) == folder
        assert (folder / "triviaqa" / "validation.jsonl").stat().st_mtime_ns == before


def test_triviaqa_prompts_and_scores_match(lm_eval_tasks, data_dir):
    lm_task = lm_eval_tasks["triviaqa"]
    instances = built(lm_task, TRIVIAQA_DOCS)
    task = catalog().task("triviaqa", data_dir, None)
    docs = task.docs()[:TRIVIAQA_DOCS]
    assert [inst.doc_id for inst in instances] == list(range(TRIVIAQA_DOCS))
    assert instances[0].args == ("Question: Brunswick, Lancastrian and Pearl Pickler are types of which vegetable??"
                                 "\nAnswer:", {"until": ["\n", ".", ","], "do_sample": False, "temperature": 0.0})
    for inst, doc in zip(instances, docs):
        (request,) = task.requests(doc)
        assert generate_request(*inst.args, can_sample=False) == request  # context, 256 tokens, stops
    for response in TRICKY:
        assert lm_eval_scores(lm_task, instances, response) == harness_scores(task, docs, response), response
    for i, doc in enumerate(docs):  # the gold aliases, dressed up
        for alias in doc["aliases"][:4]:
            for response in (alias, f" {alias.lower()}", f"{alias.upper()}!!", f"{alias} ", f"'{alias}'",
                             alias.replace(" ", "  ")):
                assert lm_eval_scores(lm_task, instances, response)[i] == \
                    harness_scores(task, [doc], response)[0], (i, response)
    hits = [harness_scores(task, [doc], f" {doc['aliases'][0].upper()}!")[0]["exact_match"] for doc in docs]
    assert hits == [1.0] * TRIVIAQA_DOCS


def test_gsm8k_prompts_and_scores_match(lm_eval_tasks, data_dir):
    lm_task = lm_eval_tasks["gsm8k"]
    instances = built(lm_task, GSM8K_PROMPTS)
    options = {"fewshot_sampler": "lm-eval"}
    task = catalog().task("gsm8k", data_dir, options)
    docs = task.docs()[:GSM8K_PROMPTS]
    assert instances[0].args[1] == {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                    "temperature": 0.0}
    assert instances[0].args[0].count("Question: ") == 6 and instances[0].args[0].endswith(
        f"Question: {docs[0]['question']}\nAnswer:")
    for inst, doc in zip(instances, docs):
        (request,) = task.requests(doc)
        assert generate_request(*inst.args, can_sample=False) == request, doc["id"]
    fresh = catalog().task("gsm8k", data_dir, options)  # document 25 first: its examples do not depend on the limit
    assert fresh.requests(fresh.docs()[25])[0].context == instances[25].args[0]
    instances, docs = instances[:GSM8K_DOCS], docs[:GSM8K_DOCS]
    for response in TRICKY:
        assert lm_eval_scores(lm_task, instances, response) == harness_scores(task, docs, response), response
    for i, doc in enumerate(docs):
        gold = doc["answer"].split("#### ")[-1]
        number = int(gold)
        for response in (f"#### {gold}", f"The answer is {gold}.", gold, f" ${gold}.", f"{number:,}",
                         f"#### {number:,}", f"2 + 2 = 4\n#### {gold}", f"#### {number + 1}",
                         f"{gold} apples, {gold}0"):
            assert lm_eval_scores(lm_task, instances, response)[i] == \
                harness_scores(task, [doc], response)[0], (i, response)
    assert [harness_scores(task, [doc], "#### " + doc["answer"].split("#### ")[-1])[0] for doc in docs] == \
        [{"exact_match_strict": 1.0, "exact_match_flexible": 1.0}] * GSM8K_DOCS
    assert all(re.fullmatch(r"-?\d+", doc["answer"].split("#### ")[-1]) for doc in docs)
