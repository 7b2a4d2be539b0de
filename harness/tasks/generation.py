"""Generation tasks: the model writes an answer, which is extracted and compared with the gold one.

Every option has a default in the task class and the YAML spec may override it; the effective
options (prompt template, stop sequences, token budget, length protocol, few-shot count and
seed) are what ``settings()`` records and hashes.

Length protocol (``length``): ``fixed`` gives every request the same budget (``max_tokens``;
stop sequences and EOS may end it early); ``oracle`` gives it the token count of the reference
answer under the model's own tokenizer plus ``oracle_slack`` tokens (the backend counts: the
request carries the reference); ``chars`` gives it as many tokens as the reference has
characters (the DiffuLLaMA ``eval-llm.py`` AR baselines), with no reference in the request.
With several gold answers the reference is the longest one in characters, or, where a task
passes them all, the longest in tokens; a reference gets a leading space unless the prompt
ends in whitespace.

``gen_kwargs()`` turns the options ``diffusion_steps``, ``max_input_tokens``, ``temperature`` and
``top_p`` (where a task has them; None: unset) into the request's per-task sampler settings
(``harness.models.base.GEN_KWARGS``). The option ``gen_kwargs`` (``--gen_kwargs``, lm-eval's names:
``max_gen_toks``, ``until``, ``do_sample``, ``temperature``, ``top_p``) overrides the budget, the
stop sequences and the sampling of every request.

Few-shot examples come from ``Task.shots`` (``num_fewshot``, ``fewshot_seed``, ``fewshot_sampler``)
and are laid out by the run's prompt format (plain text or the chat template).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

from harness.config import TaskSpec
from harness.errors import HarnessError
from harness.models.base import GenerateRequest, GenerationResult
from harness.tasks.answers import (clean_number_text, contains_match, exact_match, extract_choice, f1,
                                   gsm8k_exact_match, gsm8k_flexible, gsm8k_strict, lm_eval_exact_match,
                                   numeric_match)
from harness.scoring.metric import fraction_metrics
from harness.tasks.base import Task
from harness.tasks.data import hub_rows
from harness.tasks.likelihood import read_jsonl

LENGTH_PROTOCOLS = ("fixed", "oracle", "chars")
GEN_KWARG_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


class GenerationTask(Task):
    """Options with defaults, the length protocol, seeded few-shot examples; one request per document."""

    output_type = "generate_until"
    formats_prompts = True
    defaults: ClassVar[dict[str, Any]] = {}
    budget_option: ClassVar[str] = "max_tokens"  # the option holding the fixed budget

    def __init__(self, spec: TaskSpec, data_dir: Path | None, options: dict[str, Any] | None = None):
        super().__init__(spec, data_dir, options)
        self.options = self.with_gen_kwargs(self.options_with(self.defaults))
        if self.options.get("length", "fixed") not in LENGTH_PROTOCOLS:
            raise HarnessError(f"task '{self.name}': length must be one of {', '.join(LENGTH_PROTOCOLS)}, "
                               f"not '{self.options['length']}'")

    def with_gen_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with the ``gen_kwargs`` option applied (see the module docstring)."""
        given = options.pop("gen_kwargs", None) or {}
        unknown = sorted(set(given) - set(GEN_KWARG_KEYS))
        if unknown:
            raise HarnessError(f"task '{self.name}': unknown gen_kwargs {', '.join(unknown)} "
                               f"(known: {', '.join(GEN_KWARG_KEYS)})")
        if "max_gen_toks" in given:
            if type(given["max_gen_toks"]) is not int or given["max_gen_toks"] < 1:
                raise HarnessError(f"task '{self.name}': max_gen_toks must be a positive integer, "
                                   f"not {given['max_gen_toks']!r}")
            options[self.budget_option] = given["max_gen_toks"]
        if "until" in given:
            until = given["until"]
            options["until"] = [until] if isinstance(until, str) else list(until)
        if given.get("do_sample") is False:
            options["temperature"] = 0.0
        for key in ("temperature", "top_p"):
            if key in given:
                if not isinstance(given[key], (int, float)) or isinstance(given[key], bool) or given[key] < 0:
                    raise HarnessError(f"task '{self.name}': {key} must be a non-negative number, not {given[key]!r}")
                options[key] = float(given[key])
        return options

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings["options"] = {k: v for k, v in self.options.items() if k != "allow_code_exec"}
        return settings

    def budget(self, reference: str | Sequence[str], prompt: str = "") -> tuple[int, str | tuple[str, ...] | None]:
        """(tokens, reference) of a request under the length protocol. Several references go to the
        backend as a tuple (it takes the longest in tokens); each gets a leading space when it
        follows a ``prompt`` that does not end in whitespace."""
        length = self.options.get("length", "fixed")
        if length == "fixed":
            return self.options[self.budget_option], None
        references = [reference] if isinstance(reference, str) else list(reference)
        if length == "chars":
            return max(len(r) for r in references), None
        spaced = [r if not prompt or prompt[-1].isspace() else " " + r for r in references]
        return self.options.get("oracle_slack", 0), spaced[0] if isinstance(reference, str) else tuple(spaced)

    def gen_kwargs(self) -> dict[str, Any]:
        """Per-request sampler settings from the options (see the module docstring)."""
        pairs = {"steps": "diffusion_steps", "max_input_tokens": "max_input_tokens", "temperature": "temperature",
                 "top_p": "top_p"}
        return {key: self.options[option] for key, option in pairs.items() if self.options.get(option) is not None}

    def prompt(self, doc: dict[str, Any]) -> str:
        return self.options["prompt"].format(**doc)

    def context(self, doc: dict[str, Any], answer: Any = lambda example: example["answer"]) -> str:
        """The prompt of ``doc`` after its few-shot examples (each answered by ``answer``), laid out by
        the run's prompt format."""
        shots = [(self.prompt(example), answer(example)) for example in self.shots(doc)]
        return self.prompt_format.context(shots, self.prompt(doc))


def longest(answers: list[str]) -> str:
    return max(answers, key=len)


def was_skipped(results: Sequence[GenerationResult]) -> bool:
    """The backend skipped the request (``max_input_tokens``): the document gets no metric."""
    return any(r.extra.get("skipped") for r in results)


def skip_record(results: Sequence[GenerationResult]) -> dict[str, Any]:
    """The sample-record fields of a skipped document: the flag and the backend's reason."""
    reasons = [r.extra["skipped"] for r in results if isinstance(r.extra.get("skipped"), str)]
    return {"skipped": True, **({"skip_reason": "; ".join(reasons)} if reasons else {})}


# ---- question answering -------------------------------------------------------------------------
class QATask(GenerationTask):
    """Short answers: exact match and F1 over the gold answers (SQuAD normalisation) and "contains"."""

    metrics = fraction_metrics("exact_match", "f1", "contains")

    def requests(self, doc):
        prompt = self.context(doc)
        tokens, reference = self.budget(longest(doc["answers"]), prompt)
        return [GenerateRequest(prompt, tokens, tuple(self.options["until"]), reference=reference,
                                gen_kwargs=self.gen_kwargs())]

    def process(self, doc, results: list[GenerationResult]):
        prediction = results[0].text.strip()
        golds = doc["answers"]
        metrics = {"exact_match": exact_match(prediction, golds), "f1": f1(prediction, golds),
                   "contains": contains_match(prediction, golds)}
        return metrics, {"prediction": prediction, "target": golds, "length": self.options["length"]}


class TriviaQAFoundry(QATask):
    """Closed-book TriviaQA as llm-foundry prompts it ("Question: …\nAnswer:"), 32 tokens, lm-eval's
    stops; exact match, F1 and "contains" under SQuAD's normalisation over the aliases and the answer."""

    defaults = {"prompt": "Question: {question}\nAnswer:", "until": ["\n", ".", ","], "max_tokens": 32,
                "length": "fixed", "oracle_slack": 0, "max_docs": None}

    def read_local(self, paths):
        docs = []
        for row in read_jsonl(paths["rows"]):
            found = re.fullmatch(r"Question: (.*)\nAnswer:", row["context"], flags=re.S)
            if not found:
                raise HarnessError(f"{paths['rows']}: unexpected context {row['context'][:60]!r}")
            docs.append({"question": found.group(1), "aliases": row["aliases"],
                         "answers": unique([row["answer"], *row["aliases"]])})
        return docs

    def from_hub(self, row):
        answer = row["answer"]
        return {"question": row["question"], "aliases": list(answer["aliases"]),
                "answers": unique([answer["value"], *answer["aliases"]])}


class TriviaQA(TriviaQAFoundry):
    """lm-eval's ``triviaqa``: "Question: {question}?\nAnswer:", its stops, its backends' default budget
    (256 tokens); ``exact_match`` is lm-eval's: the stripped answer, lower-cased and without
    punctuation, equals an alias (the aliases only) treated the same way."""

    metrics = fraction_metrics("exact_match")
    defaults = {**TriviaQAFoundry.defaults, "prompt": "Question: {question}?\nAnswer:", "max_tokens": 256}

    def process(self, doc, results: list[GenerationResult]):
        prediction = results[0].text.strip()
        score = lm_eval_exact_match(prediction, doc["aliases"], ignore_case=True, ignore_punctuation=True)
        return {"exact_match": score}, {"prediction": prediction, "target": doc["aliases"],
                                        "length": self.options["length"]}


def unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


class SQuAD(QATask):
    """SQuAD v1.1 dev with the passage in the prompt (lm-eval's squadv2 layout)."""

    defaults = {"prompt": "Title: {title}\n\nBackground: {context}\n\nQuestion: {question}\n\nAnswer:",
                "until": ["\n"], "max_tokens": 32, "length": "fixed", "oracle_slack": 0, "max_docs": None}

    def read_local(self, paths):
        data = json.loads(paths["rows"].read_text(encoding="utf-8"))["data"]
        return [{"title": article["title"], "context": paragraph["context"], "question": qa["question"],
                 "answers": [a["text"] for a in qa["answers"]]}
                for article in data for paragraph in article["paragraphs"] for qa in paragraph["qas"]]

    def from_hub(self, row):
        return {"title": row["title"], "context": row["context"], "question": row["question"],
                "answers": list(row["answers"]["text"])}


# ---- math word problems -------------------------------------------------------------------------
class GSM8K(GenerationTask):
    """lm-eval's gsm8k: few-shot "Question: …\\nAnswer: …" from train; strict and flexible extraction."""

    metrics = fraction_metrics("exact_match_strict", "exact_match_flexible")
    defaults = {"prompt": "Question: {question}\nAnswer:", "until": ["Question:", "</s>", "<|im_end|>"],
                "max_tokens": 256, "num_fewshot": 5, "fewshot_seed": 1234, "fewshot_sampler": "seeded",
                "max_docs": None}

    def __init__(self, spec, data_dir, options=None):
        super().__init__(spec, data_dir, options)
        self._train_path: Path | None = None
        self._pool: list[dict[str, Any]] | None = None

    def read_local(self, paths):
        self._train_path = paths["train"]
        return [self.from_hub(row) for row in read_jsonl(paths["rows"])]

    def from_hub(self, row):
        return {"question": row["question"], "answer": row["answer"]}

    def train_rows(self) -> list[dict[str, Any]]:
        """The local train file, or the hub's train split."""
        self.docs()  # sets the train path when the data is local
        if self._train_path:
            return read_jsonl(self._train_path)
        return hub_rows({**self.spec.hub, "split": "train"}, self.name)

    def example(self, row: dict[str, Any]) -> dict[str, Any]:
        """A train row as a few-shot example."""
        return self.from_hub(row)

    def fewshot_pool(self):
        if self._pool is None:
            self._pool = [self.example(row) for row in self.train_rows()]
        return self._pool, False

    def requests(self, doc):
        return [GenerateRequest(self.context(doc), self.options["max_tokens"], tuple(self.options["until"]),
                                gen_kwargs=self.gen_kwargs())]

    def process(self, doc, results: list[GenerationResult]):
        text = results[0].text
        scores = gsm8k_exact_match(text, doc["answer"])
        return {f"exact_match_{name}": score for name, score in scores.items()}, \
            {"prediction": extractions(text), "target": clean_number_text(doc["answer"])}


def extractions(text: str) -> dict[str, str | None]:
    return {"strict": gsm8k_strict(text), "flexible": gsm8k_flexible(text)}


def symbolic_answer(solution: str) -> str:
    """A GSM8K solution in DiffuLLaMA's fine-tuning format: its <<calculations>> then "#### answer"."""
    return " ".join(re.findall(r"<<[^>]*>>", solution)) + " #### " + solution.split("#### ")[-1].strip()


class GSM8KSymbolic(GSM8K):
    """DiffuLLaMA's GSM8K test format ("<<16-3-4=9>> <<9*2=18>> #### 18"), zero-shot by default (the
    papers fine-tune on this format); few-shot examples are train solutions turned into it."""

    defaults = {**GSM8K.defaults, "until": ["Question:", "\n\n"], "max_tokens": 128, "num_fewshot": 0}

    def read_local(self, paths):
        self._train_path = paths["train"]
        rows = json.loads(paths["rows"].read_text(encoding="utf-8"))
        return [{"question": row["instruction"], "answer": row["output"]} for row in rows]

    def example(self, row):
        return {"question": row["question"], "answer": symbolic_answer(row["answer"])}


def format_number(value: float) -> str:
    return f"{value:.10g}"


class MAWPS(GSM8K):
    """MAWPS (MWPToolkit test split); few-shot examples from its valid split, answered in the symbolic
    format ("<<3+4=7>> #### 7"); numbers compared within a relative tolerance."""

    metrics = fraction_metrics("acc_strict", "acc_flexible")
    defaults = {**GSM8K.defaults, "until": ["Question:", "\n\n"], "max_tokens": 64, "num_fewshot": 4,
                "rel_tol": 1e-4}

    def read_local(self, paths):
        self._train_path = paths["train"]
        return [self.example(row) for row in json.loads(paths["rows"].read_text(encoding="utf-8"))]

    def train_rows(self):
        self.docs()
        return json.loads(self._train_path.read_text(encoding="utf-8"))

    def example(self, row):
        value = float(row["ans"])
        expression = row["equation"].split("=", 1)[1]
        return {"question": row["original_text"], "value": value,
                "answer": f"<<{expression}={format_number(value)}>> #### {format_number(value)}"}

    def process(self, doc, results: list[GenerationResult]):
        text = results[0].text
        scores = numeric_match(text, doc["value"], self.options["rel_tol"])
        return {f"acc_{name}": score for name, score in scores.items()}, \
            {"prediction": extractions(text), "target": doc["value"]}


class SATMath(GenerationTask):
    """AGIEval SAT-Math, answered by generation: AGIEval's zero-shot English prompt, first option letter.
    Few-shot examples (off by default) are other questions of the same set with their answer letter."""

    metrics = fraction_metrics("acc")
    defaults = {"prompt": "{passage}Q: {question} Answer Choices: {choices}\nA: Among A through D, the answer is",
                "until": ["\n"], "max_tokens": 16, "num_fewshot": 0, "fewshot_seed": 1234, "max_docs": None}

    def read_local(self, paths):
        return [{"passage": row["passage"] or "", "question": row["question"], "choices": " ".join(row["options"]),
                 "label": row["label"]} for row in read_jsonl(paths["rows"])]

    def fewshot_pool(self):
        return self.docs(), True

    def requests(self, doc):
        context = self.context(doc, answer=lambda example: f"{example['label']}.")
        return [GenerateRequest(context, self.options["max_tokens"], tuple(self.options["until"]),
                                gen_kwargs=self.gen_kwargs())]

    def process(self, doc, results: list[GenerationResult]):
        prediction = extract_choice(results[0].text)
        return {"acc": float(prediction == doc["label"])}, {"prediction": prediction, "target": doc["label"]}


# ---- LAMBADA by generation ----------------------------------------------------------------------
class LambadaGeneration(GenerationTask):
    """DiffuGPT's LAMBADA protocol: generate the last word in as many tokens as it has (oracle length;
    a diffusion sampler's default steps = tokens), exact match of the stripped text with the word."""

    metrics = fraction_metrics("acc")
    defaults = {"length": "oracle", "oracle_slack": 0, "max_tokens": 8, "max_docs": None}

    def read_local(self, paths):
        lines = paths["text"].read_text(encoding="utf-8").splitlines()
        return [{"text": line.strip()} for line in lines if line.strip()]

    def requests(self, doc):
        context, word = doc["text"].rsplit(" ", 1)
        context = self.prompt_format.context([], context)
        tokens, reference = self.budget(word, context)
        return [GenerateRequest(context, tokens, (), reference=reference, gen_kwargs=self.gen_kwargs())]

    def process(self, doc, results: list[GenerationResult]):
        text = results[0].text.strip()
        # with a fixed budget the model may write on: keep its first word
        prediction = text if self.options["length"] == "oracle" else (text.split() or [""])[0]
        target = doc["text"].rsplit(" ", 1)[1]
        return {"acc": float(prediction == target)}, {"prediction": prediction, "target": target,
                                                      "length": self.options["length"]}
