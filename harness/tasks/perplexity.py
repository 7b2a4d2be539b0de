"""Whole-text perplexity (WikiText-2): exact for AR models, the ELBO upper bound for diffusion models.

Each article is one document, scored by the backend's ``loglikelihood_rolling`` over the same
disjoint windows and the same tokenisation for both families, so the numbers share a table;
the per-example records say whether a value is exact or a bound.
"""
from __future__ import annotations

import math
import re

from harness.models.base import RollingRequest, RollingResult
from harness.scoring.metric import Metric, Metrics
from harness.tasks.base import Task

HEADING = re.compile(r"^ = [^=].* = $")


def split_articles(text: str) -> list[str]:
    articles: list[list[str]] = []
    for line in text.split("\n"):
        if HEADING.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["\n".join(lines).strip() for lines in articles if "\n".join(lines).strip()]


class WikiText(Task):
    output_type = "loglikelihood_rolling"
    metrics = Metrics(Metric("word_perplexity", "weighted_perplexity", False, "perplexity", primary=True),
                      Metric("byte_perplexity", "weighted_perplexity", False, "perplexity"),
                      Metric("bits_per_byte", "bits_per_unit", False, "bits"))

    def read_local(self, paths):
        return [{"text": article} for article in split_articles(paths["text"].read_text(encoding="utf-8"))]

    def from_hub(self, row):
        return {"text": row["page"]}

    def requests(self, doc):
        return [RollingRequest(doc["text"], window=self.options.get("window"))]

    def process(self, doc, results: list[RollingResult]):
        result = results[0]
        words, size = len(re.split(r"\s+", doc["text"])), len(doc["text"].encode("utf-8"))
        metrics = {"word_perplexity": [result.logprob, words], "byte_perplexity": [result.logprob, size],
                   "bits_per_byte": [result.logprob, size]}
        extra = {"logprob": result.logprob, "n_tokens": result.n_tokens, "words": words, "bytes": size,
                 "likelihood": "exact" if result.exact else "elbo_bound",
                 "token_perplexity": math.exp(-result.logprob / max(result.n_tokens, 1))}
        if result.stderr is not None:
            extra["logprob_stderr"] = result.stderr
        return metrics, extra
