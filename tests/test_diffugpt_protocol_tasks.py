"""The DiffuGPT/DiffuLLaMA script protocols (HKUNLP/DiffuLLaMA evaluation/eval-diffugpt.py for DLMs,
evaluation/eval-llm.py for AR baselines): prompts, segments and token ids pinned on real documents,
the rankings, the "TriviaQA" budgets and metrics, skipping and the ``chars`` length protocol."""
from __future__ import annotations

import pytest

from harness.catalog import catalog
from harness.errors import HarnessError
from harness.models.base import (GenerationResult, InfillRequest, LoglikelihoodResult, encode_segments, split_pair,
                                 token_budget)
from harness.scoring.metrics import aggregate
from harness.scoring.sandbox import SandboxLimits


def task(name, data_dir, **options):
    return catalog().task(name, data_dir, options)


@pytest.fixture(scope="module")
def encode(tiny_tokenizer):
    return lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


SIQA_PROMPT = ("Question: Tracy didn't go home that evening and resisted Riley's attacks. "
               "What does Tracy need to do before this?\nAnswer: ")
PIQA_PROMPT = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer: "
PIQA_SOL1 = ("Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
             "you will also need to supply it with a water bottle and a food dish.")
WINO_PREFIX = "Sarah was a much better surgeon than Maria so "
HELLASWAG_CONTEXT = "Roof shingle removal: A man is sitting on a roof. He"

# (task, script, choice index) -> (context, segments) of document 0 of the local data
PINNED = {
    # both scripts: the cleaned query, the ending alone without a leading space
    ("hellaswag_diffugpt", "eval-diffugpt", 0): (HELLASWAG_CONTEXT, ("is using wrap to wrap a pair of skis.",)),
    ("hellaswag_diffugpt", "eval-llm", 3): (HELLASWAG_CONTEXT, ("starts pulling up roofing on a roof.",)),
    # eval-diffugpt.py: option and stripped rest encoded separately; eval-llm.py: "option rest" in one piece
    ("winogrande_diffugpt", "eval-diffugpt", 0): (WINO_PREFIX, ("Sarah", "always got the easier cases.")),
    ("winogrande_diffugpt", "eval-diffugpt", 1): (WINO_PREFIX, ("Maria", "always got the easier cases.")),
    ("winogrande_diffugpt", "eval-llm", 1): (WINO_PREFIX, ("Maria always got the easier cases.",)),
    # both scripts: "Question: ... \nAnswer: " (trailing space kept) and the answer alone
    ("social_iqa_diffugpt", "eval-diffugpt", 0): (SIQA_PROMPT, ("make a new plan",)),
    ("social_iqa_diffugpt", "eval-llm", 2): (SIQA_PROMPT, ("Find somewhere to go",)),
    # eval-diffugpt.py: " " + solution; eval-llm.py: the solution
    ("piqa_diffugpt", "eval-diffugpt", 0): (PIQA_PROMPT, (" " + PIQA_SOL1,)),
    ("piqa_diffugpt", "eval-llm", 0): (PIQA_PROMPT, (PIQA_SOL1,)),
}


@pytest.mark.parametrize("name, script, index", PINNED, ids=[f"{n}-{s}-{i}" for n, s, i in PINNED])
def test_choice_prompts_segments_and_ids(data_dir, encode, name, script, index):
    # eval-diffugpt.py / eval-llm.py: context and segments tokenised alone, segment ids concatenated
    t = task(name, data_dir, script=script)
    request = t.requests(t.docs()[0])[index]
    context, segments = PINNED[(name, script, index)]
    assert (request.context, request.segments) == (context, segments)
    assert request.continuation == "".join(segments) and request.group == "0"
    expected = [token for segment in segments for token in encode(segment)]
    assert encode_segments(encode, request.context, request.segments) == (encode(context), expected)


def test_separate_encoding_differs_from_lm_eval_split(data_dir, encode):
    # eval-diffugpt.py (SIQA, WinoGrande): the scripts' ids are not lm-eval's split of the joined text
    for name in ("social_iqa_diffugpt", "winogrande_diffugpt"):
        t = task(name, data_dir)
        request = t.requests(t.docs()[0])[0]
        ours = encode_segments(encode, request.context, request.segments)
        assert ours != split_pair(encode, request.context, request.continuation)
    siqa = task("social_iqa_diffugpt", data_dir).requests(task("social_iqa_diffugpt", data_dir).docs()[0])[0]
    context_ids, continuation_ids = split_pair(encode, siqa.context, siqa.continuation)
    assert continuation_ids == encode(" make a new plan")  # lm-eval moves the trailing space


def test_default_script_and_option_checks(data_dir):
    t = task("piqa_diffugpt", data_dir)
    assert t.options == {"script": "eval-diffugpt"} and t.settings()["options"] == {"script": "eval-diffugpt"}
    assert t.task_hash() != task("piqa_diffugpt", data_dir, script="eval-llm").task_hash()
    assert task("piqa_diffugpt", data_dir, allow_code_exec=True).task_hash() == t.task_hash()
    with pytest.raises(HarnessError, match="script must be one of eval-diffugpt, eval-llm"):
        task("piqa_diffugpt", data_dir, script="lm-eval")
    with pytest.raises(HarnessError, match="unknown option.*scripts"):
        task("piqa_diffugpt", data_dir, scripts="eval-llm")
    assert {"acc_tokmean", "acc_norm"} & set(task("piqa", data_dir).metrics) == {"acc_norm"}  # lm-eval task as it was


def results(lls, counts):
    return [LoglikelihoodResult(ll, False, n) for ll, n in zip(lls, counts)]


def test_acc_and_acc_tokmean_rankings_disagree(data_dir):
    # eval-llm.py ranks HellaSwag (and WinoGrande) by log-likelihood per token; the sum ranking is acc
    llm = task("hellaswag_diffugpt", data_dir, script="eval-llm")
    doc = llm.docs()[0]
    assert doc["gold"] == 3
    hand = results([-12.0, -20.0, -25.0, -16.0], [4, 5, 5, 8])  # sums: choice 0; per token: choice 3
    metrics, extra = llm.process(doc, hand)
    assert metrics == {"acc": 0.0, "acc_tokmean": 1.0}
    assert (extra["prediction"], extra["prediction_tokmean"], extra["n_tokens"]) == (0, 3, [4, 5, 5, 8])
    # eval-diffugpt.py: a paper_grid logprob is already minus the mean loss; lowest loss wins, no tokmean
    dlm = task("hellaswag_diffugpt", data_dir)
    assert dlm.process(doc, results([-3.1, -2.9, -3.0, -2.5], [4, 5, 5, 8]))[0] == {"acc": 1.0}
    assert set(llm.metrics) == {"acc", "acc_tokmean"} and all(llm.higher_is_better.values())
    wino = task("winogrande_diffugpt", data_dir, script="eval-llm")
    assert wino.process(wino.docs()[0], results([-10.0, -11.0], [5, 11]))[0] == {"acc": 0.0, "acc_tokmean": 1.0}


def test_triviaqa_diffugpt_prompt_and_budget(data_dir, encode):
    # eval-diffugpt.py: SQuAD v1.1 validation in file order, first 2,000, the "Quesion" typo, budget =
    # the longest gold answer in tokens with no slack, no stop sequences
    t = task("triviaqa_diffugpt", data_dir)
    docs = t.selected_docs()
    assert len(docs) == 2000 and len(t.docs()) > 2000 and docs[0]["question"] == "Which NFL team represented the AFC at Super Bowl 50?"
    (request,) = t.requests(docs[15])
    question = "\nQuesionSuper Bowl 50 decided the NFL champion for what season??\nAnswer: "
    assert request.context == docs[15]["context"] + question
    assert request.reference == ("2015", "the 2015 season") and request.max_tokens == 0 and request.until == ()
    assert token_budget(request.max_tokens, request.reference, encode) == len(encode("the 2015 season"))
    by_words = lambda text: text.split()  # longest in tokens, not in characters
    assert token_budget(0, ("a b c", "abcdefgh"), by_words) == 3


@pytest.mark.parametrize("prediction, contains", [
    (" The Denver Broncos.", 1.0),  # normalised gold "denver broncos" occurs in the normalised prediction
    ("DENVER   broncos!\n", 1.0),
    ("Broncos", 0.0),
    ("the Carolina Panthers", 0.0),
])
def test_triviaqa_diffugpt_contains(data_dir, prediction, contains):
    # eval-diffugpt.py's "em acc" and F1 over the gold answers
    t = task("triviaqa_diffugpt", data_dir)
    metrics, extra = t.process(t.docs()[0], [GenerationResult(prediction, 3, 3)])
    assert metrics["contains"] == contains and set(metrics) == {"contains", "f1"}
    assert extra["prediction"] == prediction.strip()
    assert (metrics["f1"] > 0) == ("broncos" in prediction.lower())


def test_triviaqa_paper_prompt_budget_and_match(data_dir, encode):
    # eval-llm.py's intended TriviaQA: "Question: {q}?\nAnswer: ", longest alias in tokens, no stops
    t = task("triviaqa_paper", data_dir)
    docs = t.selected_docs()
    (request,) = t.requests(docs[0])
    assert len(docs) == 2000 and request.until == () and request.max_tokens == 0
    assert request.context == ("Question: Brunswick, Lancastrian and Pearl Pickler are types of which vegetable??"
                               "\nAnswer: ")
    assert request.reference == tuple(docs[0]["answers"]) and "Spanish onion" in request.reference
    longest = max(len(encode(alias)) for alias in docs[0]["answers"])
    assert token_budget(request.max_tokens, request.reference, encode) == longest
    score = lambda text: t.process(docs[0], [GenerationResult(text, 2, 2)])[0]
    assert score(" Onions.")["contains"] == 1.0 and score(" Onions.")["exact_match"] == 1.0  # equals an alias
    assert score("It is a bulb onion, I think")["contains"] == 1.0  # contains one
    assert score("garlic") == {"contains": 0.0, "exact_match": 0.0, "f1": 0.0}


def test_rocstories_infill_diffugpt_request(data_dir, encode):
    # eval-diffugpt.py: middle and suffix without an added leading space, 32 diffusion steps
    t = task("rocstories_infill_diffugpt", data_dir)
    docs = t.selected_docs()
    (request,) = t.requests(docs[0])
    assert len(docs) == 1000 and request == InfillRequest(
        prefix="Rick grew up in a troubled household. He never found good support in family, and turned to gangs.",
        suffix="The incident caused him to turn a new leaf. He is happy now.", n_tokens=0,
        reference="It wasn't long before Rick got shot in a robbery.", gen_kwargs={"steps": 32})
    assert encode(request.reference) != encode(" " + request.reference)  # the variant changes the budget's ids
    default = task("rocstories_infill", data_dir)
    (plain,) = default.requests(default.docs()[0])
    assert plain.suffix.startswith(" ") and plain.reference.startswith(" ") and plain.gen_kwargs == {}
    assert t.settings()["options"]["leading_space"] is False and t.task_hash() != default.task_hash()


def test_chars_length_protocol(data_dir):
    # eval-llm.py (AR baselines): as many new tokens as the middle has characters, no reference
    roc = task("rocstories_infill", data_dir, length="chars")
    doc = roc.docs()[0]
    (request,) = roc.requests(doc)
    assert request.n_tokens == len(doc["middle"]) == 49 and request.reference is None
    text = " " + doc["middle"] + " And more."
    assert roc.process(doc, [GenerationResult(text, 49, 49)])[1]["prediction"] == text.strip()  # not trimmed
    code = task("humaneval_infill_single_diffugpt", data_dir, allow_code_exec=True, length="chars")
    problem = code.docs()[0]
    (request,) = code.requests(problem)
    assert request.n_tokens == len(problem["canonical_solution"]) and request.reference is None
    trivia = task("triviaqa_paper", data_dir, length="chars")
    question = trivia.docs()[0]
    (request,) = trivia.requests(question)
    assert request.max_tokens == max(map(len, question["answers"])) and request.reference is None


def test_humaneval_infill_diffugpt_skip_and_timeout(data_dir):
    # eval-diffugpt.py: 32 steps, problems over 1,000 tokens skipped (no metric), 3 s execution timeout
    t = task("humaneval_infill_single_diffugpt", data_dir, allow_code_exec=True)
    doc = t.docs()[0]
    (request,) = t.requests(doc)
    assert request.gen_kwargs == {"steps": 32, "max_input_tokens": 1000}
    assert request.reference == doc["canonical_solution"]
    skipped = GenerationResult("", 0, 0, extra={"skipped": "1,203 tokens > 1000"})  # the backend's reason
    metrics, extra = t.process(doc, [skipped])
    assert metrics == {} and extra["skipped"] is True and extra["skip_reason"] == "1,203 tokens > 1000"
    passed, _ = t.process(doc, [GenerationResult(doc["canonical_solution"], 8, 8)])
    assert passed == {"pass@1": 1.0}
    assert aggregate([metrics, passed], t.metrics)["pass@1"] == 1.0  # the skipped problem is left out
    assert t.limits.timeout_s == 3.0 and t.settings()["sandbox"]["timeout_s"] == 3.0
    default = task("humaneval_infill_single", data_dir, allow_code_exec=True)
    assert default.settings()["sandbox"]["timeout_s"] == SandboxLimits().timeout_s
    assert default.requests(default.docs()[0])[0].gen_kwargs == {}
    assert t.settings()["options"]["max_input_tokens"] == 1000 and t.task_hash() != default.task_hash()
