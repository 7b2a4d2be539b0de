"""Prompt formats (plain, chat template, system instruction, multi-turn few-shot), few-shot draws
(seeded per document, lm-eval's sequential sampler), run-wide options and the CLI's lm-eval names."""
import random
import shutil

import pytest
from transformers import AutoTokenizer

from harness.catalog import catalog
from harness.errors import HarnessError
from harness.models.base import LoglikelihoodRequest
from harness.models.factory import build_model
from harness.plan import RunConfig, plan_run
from harness.runner import evaluate, set_prompt_format
from harness.tasks.prompt_format import PromptFormat

# a template that shows every turn and the generation prompt literally
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
             "{% endif %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_llama_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = {"default": TEMPLATE, "plain_turns": NO_SYSTEM}
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model(chat_model_dir):
    return build_model(str(chat_model_dir))


def task(name, data_dir, **options):
    return catalog().task(name, data_dir, options)


def bound(tasks, model, **fmt):
    set_prompt_format(tasks, PromptFormat(**fmt), model)
    return tasks


SHOTS = [("Q1", "A1"), ("Q2", "A2")]


def test_plain_text_is_lm_evals_concatenation():
    fmt = PromptFormat()
    assert fmt.context(SHOTS, "Q3") == "Q1 A1\n\nQ2 A2\n\nQ3"
    assert PromptFormat(system_instruction="Be brief.").context([], "Q3") == "Be brief.Q3"  # lm-eval: no delimiter
    assert fmt.answer_delimiter(" ") == " "


def test_chat_single_turn_multiturn_and_system(chat_model):
    render = lambda messages: chat_model.render_chat(messages, "default")  # noqa: E731
    single = PromptFormat("default", "Be brief.", renderer=render).context(SHOTS, "Q3")
    assert single == "<system>Be brief.</system><user>Q1 A1\n\nQ2 A2\n\nQ3</user><assistant>"
    multi = PromptFormat("default", fewshot_as_multiturn=True, renderer=render).context(SHOTS, "Q3")
    assert multi == "<user>Q1</user><assistant>A1</assistant><user>Q2</user><assistant>A2</assistant><user>Q3</user><assistant>"
    assert PromptFormat("default", renderer=render).answer_delimiter(" ") == ""


def test_a_template_without_system_role_is_retried_without_it(chat_model):
    assert chat_model.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                  "plain_turns") == "[U]>"


def test_unknown_template_name_and_no_template_are_one_line_errors(chat_model, tiny_llama_dir):
    with pytest.raises(HarnessError, match="has the templates default, plain_turns"):
        chat_model.chat_template("nope")
    with pytest.raises(HarnessError, match="has no chat template"):
        build_model(str(tiny_llama_dir)).chat_template("default")


def test_multiple_choice_and_generation_requests_under_the_chat_template(chat_model, data_dir):
    piqa, trivia = bound([task("piqa", data_dir), task("triviaqa", data_dir)], chat_model, chat_template="default")
    doc = piqa.docs()[0]
    # no target delimiter after the generation prompt
    assert piqa.requests(doc) == [LoglikelihoodRequest(f"<user>{doc['context']}</user><assistant>", choice, group="0")
                                  for choice in doc["choices"]]
    assert doc["context"].startswith("Question: ")
    (request,) = trivia.requests(trivia.docs()[0])
    assert request.context == ("<user>Question: Brunswick, Lancastrian and Pearl Pickler are types of which "
                               "vegetable??\nAnswer:</user><assistant>")
    assert (request.max_tokens, request.until) == (256, ("\n", ".", ","))


def test_winogrande_chat_contexts_per_option(chat_model, data_dir):
    (wino,) = bound([task("winogrande", data_dir)], chat_model, chat_template="default")
    doc = wino.docs()[0]
    requests = wino.requests(doc)
    assert [r.context for r in requests] == [f"<user>{c}</user><assistant>" for c in doc["contexts"]]
    assert {r.continuation for r in requests} == {doc["continuations"][0][1:]}


def test_seeded_fewshot_is_per_document_and_recorded(data_dir):
    gsm = task("gsm8k", data_dir)
    doc = gsm.docs()[7]
    pool, _ = gsm.fewshot_pool()
    expected = random.Random("1234:7").sample(range(len(pool)), 5)
    assert gsm.fewshot_indices(doc) == expected
    context = gsm.requests(doc)[0].context
    first = pool[expected[0]]
    assert context.startswith(f"Question: {first['question']}\nAnswer: {first['answer']}\n\nQuestion: ")
    assert task("gsm8k", data_dir, num_fewshot=2).fewshot_indices(doc) == random.Random("1234:7").sample(
        range(len(pool)), 2)


def test_lm_eval_sampler_reproduces_lm_evals_context_sampler(data_dir):
    samplers = pytest.importorskip("lm_eval.api.samplers")
    gsm = task("gsm8k", data_dir, fewshot_sampler="lm-eval")
    pool, _ = gsm.fewshot_pool()
    reference = samplers.ContextSampler(pool, rnd=1234)
    expected = [[pool.index(shot) for shot in reference.sample(5)] for _ in range(12)]
    # asked out of order (a resume): each document still gets its place in the sequence
    assert [gsm.fewshot_indices(gsm.docs()[i]) for i in (11, 3, 0)] == [expected[11], expected[3], expected[0]]
    # the evaluated split as the pool (lm-eval draws k + 1 and drops the document)
    sat = task("sat_math", data_dir, num_fewshot=3, fewshot_sampler="lm-eval")
    docs = sat.docs()
    reference = samplers.ContextSampler(docs, rnd=1234)
    for doc in docs[:6]:
        assert sat.fewshot_indices(doc) == [d["id"] for d in reference.sample(3, eval_doc=doc)]


def test_tasks_without_examples_refuse_fewshot_before_loading(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("harness.models.factory.build_model", no_loading)
    for name, message in (("triviaqa", "has no few-shot examples"), ("wikitext2", "takes no few-shot examples"),
                          ("piqa_diffugpt", r"unknown option\(s\) num_fewshot")):
        with pytest.raises(HarnessError, match=message):
            evaluate(RunConfig(model=str(tiny_llama_dir), tasks=[name], limit=1, data_dir=data_dir, output=tmp_path,
                               num_fewshot=1))
    with pytest.raises(HarnessError, match="fewshot_sampler must be one of seeded, lm-eval"):
        task("gsm8k", data_dir, fewshot_sampler="random")


def test_num_fewshot_gen_kwargs_and_suites_in_the_plan(tiny_llama_dir, tiny_dlm_dir):
    plan = plan_run(RunConfig(model=str(tiny_llama_dir), tasks=["piqa", "gsm8k"], num_fewshot=2,
                              gen_kwargs={"max_gen_toks": 7, "until": ["\n\n"]}))
    assert plan.task_options == {"piqa": {"num_fewshot": 2},
                                 "gsm8k": {"num_fewshot": 2, "gen_kwargs": {"max_gen_toks": 7, "until": ["\n\n"]}}}
    gsm = catalog().task("gsm8k", None, plan.task_options["gsm8k"])
    assert (gsm.options["max_tokens"], gsm.options["until"]) == (7, ["\n\n"])
    # a suite named in --tasks, mixed with a task
    mixed = plan_run(RunConfig(model=str(tiny_llama_dir), tasks=["accuracy-quick", "gsm8k"]))
    assert mixed.suite == "accuracy-quick" and mixed.tasks[-1] == "gsm8k"
    assert set(catalog().suites.get("accuracy-quick").tasks) <= set(mixed.tasks)
    with pytest.raises(HarnessError, match="one suite a run"):
        plan_run(RunConfig(model=str(tiny_llama_dir), tasks=["accuracy-quick", "generation-quick"]))
    with pytest.raises(HarnessError, match="decodes greedily"):
        plan_run(RunConfig(model=str(tiny_llama_dir), tasks=["gsm8k"], gen_kwargs={"temperature": 0.7}))
    sampled = plan_run(RunConfig(model=str(tiny_dlm_dir), tasks=["gsm8k"], gen_kwargs={"temperature": 0.7, "top_p": 0.9}))
    request = catalog().task("gsm8k", None, sampled.task_options["gsm8k"])
    assert request.gen_kwargs() == {"temperature": 0.7, "top_p": 0.9}
    with pytest.raises(HarnessError, match="unknown gen_kwargs max_tokens"):
        catalog().task("gsm8k", None, {"gen_kwargs": {"max_tokens": 3}})


@pytest.mark.parametrize("limit, count", [(0.001, 2), (0.5, 919), (3, 3), (3.0, 3)])
def test_fractional_limit_rounds_up_like_lm_eval(data_dir, limit, count):
    assert len(task("piqa", data_dir).selected_docs(limit)) == count


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limits_are_refused(tiny_llama_dir, limit):
    with pytest.raises(HarnessError, match="--limit must be a positive integer or a fraction"):
        plan_run(RunConfig(model=str(tiny_llama_dir), tasks=["piqa"], limit=limit))


def test_chat_run_records_the_format_and_changes_the_run(chat_model_dir, data_dir, tmp_path):
    plain = evaluate(RunConfig(model=str(chat_model_dir), tasks=["piqa"], limit=2, data_dir=data_dir, output=tmp_path))
    chat = evaluate(RunConfig(model=str(chat_model_dir), tasks=["piqa"], limit=2, data_dir=data_dir, output=tmp_path,
                              chat_template="default", system_instruction="Be brief."))
    assert plain["harness"]["run_id"] != chat["harness"]["run_id"]
    assert chat["harness"]["cached_records"] == {"piqa": 0}  # other prompts: nothing to reuse
    assert chat["chat_template"] == TEMPLATE and plain["chat_template"] is None
    assert chat["system_instruction"] == "Be brief." and len(chat["system_instruction_sha"]) == 64
    assert chat["configs"]["piqa"]["prompt_format"] == {"chat_template": "default", "system_instruction": "Be brief.",
                                                        "fewshot_as_multiturn": False}
    assert chat["n-shot"] == {"piqa": 0} and float(chat["total_evaluation_time_seconds"]) > 0
