"""A task turns documents into requests and the answers into per-example metrics."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Sequence

from harness.config import TaskSpec
from harness.errors import HarnessError
from harness.hashing import stable_hash, to_jsonable
from harness.models.base import (GenerateRequest, InfillRequest, LoglikelihoodRequest, LoglikelihoodResult,
                                 RollingRequest)
from harness.tasks.data import hub_rows, local_paths

Request = LoglikelihoodRequest | GenerateRequest | InfillRequest | RollingRequest


class Task:
    """Base class. Subclasses read docs and define ``requests`` and ``process``."""

    output_type: ClassVar[str] = "loglikelihood"
    # metric -> aggregation: "mean" (with analytic stderr) or "perplexity" (bootstrap stderr)
    metrics: ClassVar[dict[str, str]] = {}
    higher_is_better: ClassVar[dict[str, bool]] = {}
    version: ClassVar[int] = 1

    def __init__(self, spec: TaskSpec, data_dir: Path | None, options: dict[str, Any] | None = None):
        self.spec, self.data_dir = spec, data_dir
        self.options = {**spec.options, **(options or {})}
        self._docs: list[dict[str, Any]] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def docs(self) -> list[dict[str, Any]]:
        if self._docs is None:
            paths = local_paths(self.spec.data, self.data_dir, self.name, self.spec.hub)
            docs = self.read_local(paths) if paths is not None else \
                [self.from_hub(row) for row in hub_rows(self.spec.hub, self.name)]
            if not docs:
                raise HarnessError(f"task '{self.name}' read no documents")
            for index, doc in enumerate(docs):
                doc["id"] = index
            self._docs = docs
        return self._docs

    def read_local(self, paths: dict[str, Path]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def requests(self, doc: dict[str, Any]) -> list[Request]:
        raise NotImplementedError

    def process(self, doc: dict[str, Any], results: list[Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """(per-example metrics, extra fields for the sample record)."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What the numbers depend on, besides the model: recorded and hashed."""
        return {"task": self.name, "version": self.version, "builder": self.spec.builder,
                "data": self.spec.data, "options": self.options}

    def task_hash(self) -> str:
        return stable_hash(self.settings())

    @staticmethod
    def prompt_hash(requests: Sequence[Request]) -> str:
        return stable_hash([to_jsonable(r) for r in requests])


class MultipleChoiceTask(Task):
    """Choices scored by log-likelihood; acc and length-normalised acc (by choice characters, as lm-eval)."""

    output_type = "multiple_choice"
    metrics = {"acc": "mean", "acc_norm": "mean"}
    higher_is_better = {"acc": True, "acc_norm": True}

    def requests(self, doc: dict[str, Any]) -> list[Request]:
        contexts = doc["contexts"] if "contexts" in doc else [doc["context"]] * len(doc["choices"])
        continuations = doc.get("continuations") or [" " + c for c in doc["choices"]]
        return [LoglikelihoodRequest(ctx, cont, group=str(doc["id"])) for ctx, cont in zip(contexts, continuations)]

    def process(self, doc, results: list[LoglikelihoodResult]):
        lls = [r.logprob for r in results]
        lengths = [float(len(c)) for c in doc["choices"]]
        pred = max(range(len(lls)), key=lambda i: lls[i])
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
        gold = doc["gold"]
        metrics = {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}
        extra = {"target": gold, "loglikelihoods": lls, "prediction": pred,
                 "is_greedy": [r.is_greedy for r in results]}
        if any(r.stderr is not None for r in results):
            extra["loglikelihood_stderrs"] = [r.stderr for r in results]
        return metrics, extra


def perplexity_from_mean(mean_ll: float) -> float:
    return math.exp(-mean_ll)
