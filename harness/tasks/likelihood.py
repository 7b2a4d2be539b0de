"""Zero-shot likelihood tasks with lm-eval's prompts: LAMBADA, HellaSwag, WinoGrande, SIQA, PIQA."""
from __future__ import annotations

import bz2
import json
import re
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.models.base import LoglikelihoodRequest, LoglikelihoodResult
from harness.scoring.metric import Metric, Metrics
from harness.tasks.base import MultipleChoiceTask, Task


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise HarnessError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return rows


def read_labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


class Lambada(Task):
    """Last-word prediction: context = all but the last word, continuation = " " + last word."""

    metrics = Metrics(Metric("acc", "mean", True, "fraction", primary=True),
                      Metric("perplexity", "perplexity", False, "perplexity"))
    formats_prompts = True

    def read_local(self, paths):
        path = paths["text"]
        if path.suffix == ".jsonl":
            return [{"text": row["text"]} for row in read_jsonl(path)]
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [{"text": line} for line in lines]

    def from_hub(self, row):
        return {"text": row["text"]}

    def requests(self, doc):
        context, word = doc["text"].rsplit(" ", 1)
        return [LoglikelihoodRequest(self.prompt_format.context([], context), " " + word, group=str(doc["id"]))]

    def process(self, doc, results: list[LoglikelihoodResult]):
        result = results[0]
        extra = {"target": " " + doc["text"].rsplit(" ", 1)[1], "loglikelihoods": [result.logprob],
                 "prediction": result.is_greedy}
        if result.stderr is not None:
            extra["loglikelihood_stderrs"] = [result.stderr]
        return {"acc": float(result.is_greedy), "perplexity": result.logprob}, extra


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(MultipleChoiceTask):
    """The local file holds the cleaned query, gold index and four endings, six lines an example.

    It joins the context without lm-eval's ``ctx_b.capitalize()``; the first letter of the final
    fragment is restored to upper case so the prompt matches lm-eval's (hub data needs no repair).
    """

    def read_local(self, paths):
        lines = bz2.open(paths["text"], "rt", encoding="utf-8").read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) % 6:
            raise HarnessError(f"{paths['text']}: expected 6 lines an example, got {len(lines)} lines")
        docs = []
        for i in range(0, len(lines), 6):
            query, gold, endings = lines[i], int(lines[i + 1]), lines[i + 2:i + 6]
            docs.append({"context": capitalise_last_fragment(query), "choices": endings, "gold": gold})
        return docs

    def from_hub(self, row):
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return {"context": hellaswag_preprocess(row["activity_label"] + ": " + context),
                "choices": [hellaswag_preprocess(e) for e in row["endings"]], "gold": int(row["label"])}


def capitalise_last_fragment(query: str) -> str:
    head, sep, tail = query.rpartition(". ")
    if sep and tail[:1].islower():
        return head + sep + tail[0].upper() + tail[1:]
    return query


class WinoGrande(MultipleChoiceTask):
    """Partial scoring (lm-eval): the option fills the blank in the context; the rest is scored."""

    def read_local(self, paths):
        return [self.from_hub(row) for row in read_jsonl(paths["rows"])]

    def from_hub(self, row):
        sentence = row["sentence"]
        blank = sentence.index("_")
        options = [row["option1"], row["option2"]]
        target = sentence[blank + 1:].strip()
        return {"contexts": [sentence[:blank] + o for o in options], "continuations": [" " + target] * 2,
                "choices": options, "gold": {"1": 0, "2": 1}[str(row["answer"])]}

    def process(self, doc, results):
        metrics, extra = super().process(doc, results)
        # the scored continuation is the same for both options, so normalising changes nothing
        metrics["acc_norm"] = metrics["acc"]
        return metrics, extra


class SocialIQA(MultipleChoiceTask):
    def read_local(self, paths):
        rows, labels = read_jsonl(paths["rows"]), read_labels(paths["labels"])
        return [self.from_hub(row | {"label": label}) for row, label in zip(rows, labels)]

    def from_hub(self, row):
        return {"context": f"Q: {row['context']} {row['question']}\nA:",
                "choices": [row["answerA"], row["answerB"], row["answerC"]], "gold": int(row["label"]) - 1}


class PIQA(MultipleChoiceTask):
    def read_local(self, paths):
        rows, labels = read_jsonl(paths["rows"]), read_labels(paths["labels"])
        return [self.from_hub(row | {"label": label}) for row, label in zip(rows, labels)]

    def from_hub(self, row):
        return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
                "gold": int(row["label"])}
