"""A task turns documents into requests and the answers into per-example metrics."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, ClassVar, Sequence

from harness.config import TaskSpec
from harness.errors import HarnessError
from harness.hashing import stable_hash, to_jsonable
from harness.models.base import (GenerateRequest, InfillRequest, LoglikelihoodRequest, LoglikelihoodResult,
                                 RollingRequest)
from harness.scoring.metric import Metric, Metrics, fraction_metrics
from harness.tasks.data import hub_rows, local_paths
from harness.tasks.prompt_format import PLAIN, PromptFormat

Request = LoglikelihoodRequest | GenerateRequest | InfillRequest | RollingRequest
# what a task asks of the model (lm-eval's names, plus "infill"); stored with each task result, it
# tells the report how a run scored the task (exact log-likelihood or an estimator, a sampler, ...)
OUTPUT_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until", "infill")
# how few-shot examples are drawn: "seeded" (per document: random.Random(f"{fewshot_seed}:{doc id}"),
# so a document's prompt does not depend on the limit, the order, the shard or a resume) or "lm-eval"
# (lm-eval's default sampler: one random.Random(fewshot_seed) stream, document i gets the (i+1)-th
# draw, as lm-eval's evaluator visits documents in order)
FEWSHOT_SAMPLERS = ("seeded", "lm-eval")
# the run-wide few-shot and generation options every task that lays out its prompts takes
PROMPT_OPTIONS = ("num_fewshot", "fewshot_seed", "fewshot_sampler", "gen_kwargs")


class Task:
    """Base class. Subclasses read docs and define ``requests`` and ``process``."""

    output_type: ClassVar[str] = "loglikelihood"  # one of OUTPUT_TYPES
    # the run sets it (harness.tasks.prompt_format) where ``formats_prompts``: the task lays its
    # prompts out with it; other tasks (perplexity, infilling, the papers' scripts) keep their own
    prompt_format: PromptFormat = PLAIN
    formats_prompts: ClassVar[bool] = False
    # the metric specs (harness.scoring.metric): aggregation, direction, unit, exactly one primary
    metrics: ClassVar[Metrics] = Metrics()
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.metrics, Metrics):
            raise TypeError(f"{cls.__name__}.metrics must be Metrics(...) of Metric specs, not {type(cls.metrics)}")
        if cls.output_type not in OUTPUT_TYPES:
            raise TypeError(f"{cls.__name__}.output_type '{cls.output_type}' is not one of {', '.join(OUTPUT_TYPES)}")

    def __init__(self, spec: TaskSpec, data_dir: Path | None, options: dict[str, Any] | None = None):
        self.spec, self.data_dir = spec, data_dir
        self.options = {**spec.options, **(options or {})}
        self._docs: list[dict[str, Any]] | None = None
        # the lm-eval sampler's stream and its draws so far, by document id
        self._stream, self._draws = random.Random(self.options.get("fewshot_seed", 1234)), []
        sampler = self.options.get("fewshot_sampler", "seeded")
        if sampler not in FEWSHOT_SAMPLERS:
            raise HarnessError(f"task '{spec.name}': fewshot_sampler must be one of {', '.join(FEWSHOT_SAMPLERS)}, "
                               f"not '{sampler}'")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def higher_is_better(self) -> dict[str, bool | None]:
        """{metric: bool} from the specs, as lm-eval's results.json has it."""
        return self.metrics.higher_is_better

    def metric_specs(self) -> tuple[Metric, ...]:
        """The metric specs in declaration order (exactly one is primary)."""
        return tuple(self.metrics.values())

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

    def options_with(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """``defaults`` under the given options; an option the task does not take is a one-line error
        (the runner's ``allow_code_exec`` always; ``PROMPT_OPTIONS`` where the task lays out its prompts)."""
        allowed = {"allow_code_exec", *(PROMPT_OPTIONS if self.formats_prompts else ())}
        unknown = sorted(set(self.options) - set(defaults) - allowed)
        if unknown:
            raise HarnessError(f"task '{self.name}': unknown option(s) {', '.join(unknown)} "
                               f"(known: {', '.join(sorted(defaults))})")
        return {**defaults, **self.options}

    def selected_docs(self, limit: int | float | None = None) -> list[dict[str, Any]]:
        """The documents a run scores, cut in this one place: the protocol's own first ``max_docs``
        (an option, so recorded and hashed), then the run's ``limit``: a count, or a fraction (< 1)
        of the documents, rounded up as lm-eval does."""
        docs = self.docs()[:self.options.get("max_docs") or None]
        if limit is None:
            return docs
        return docs[:math.ceil(len(docs) * limit) if limit < 1 else int(limit)]

    # ---- few-shot examples ------------------------------------------------------------------
    def fewshot_pool(self) -> tuple[list[dict[str, Any]], bool]:
        """(examples to draw from, whether they are the evaluated documents themselves, so that a
        document is never its own example). Tasks without examples refuse ``num_fewshot``."""
        raise HarnessError(f"task '{self.name}' has no few-shot examples (num_fewshot must be 0)")

    def shots(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """The few-shot examples of ``doc`` (see ``fewshot_indices``)."""
        indices = self.fewshot_indices(doc)
        return [self.fewshot_pool()[0][i] for i in indices] if indices else []

    def fewshot_indices(self, doc: dict[str, Any]) -> list[int]:
        """Positions in the pool of the ``num_fewshot`` examples of ``doc`` under ``fewshot_sampler``
        (see FEWSHOT_SAMPLERS); recorded with every sample."""
        k = self.options.get("num_fewshot") or 0
        if not k:
            return []
        if type(k) is not int or k < 0:
            raise HarnessError(f"task '{self.name}': num_fewshot must be a non-negative integer, not {k!r}")
        pool, same_split = self.fewshot_pool()
        if k + same_split > len(pool):
            raise HarnessError(f"task '{self.name}': num_fewshot={k} but only {len(pool) - same_split} examples")
        if self.options.get("fewshot_sampler", "seeded") == "seeded":
            indices = [i for i in range(len(pool)) if not (same_split and i == doc["id"])]
            return random.Random(f"{self.options.get('fewshot_seed', 1234)}:{doc['id']}").sample(indices, k)
        while len(self._draws) <= doc["id"]:  # lm-eval samples k + 1 from the test split, then drops the doc
            self._draws.append(self._stream.sample(range(len(pool)), k + same_split))
        return [i for i in self._draws[doc["id"]] if not (same_split and i == doc["id"])][:k]

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
    metrics = fraction_metrics("acc", "acc_norm")
    formats_prompts = True

    def fewshot_pool(self):
        return self.docs(), True  # lm-eval draws from the evaluated split when a task has no other

    @staticmethod
    def answers(doc: dict[str, Any]) -> list[str]:
        """Each choice's scored text without its leading delimiter."""
        return [c[1:] if c.startswith(" ") else c for c in doc["continuations"]] if "continuations" in doc \
            else list(doc["choices"])

    @staticmethod
    def questions(doc: dict[str, Any]) -> list[str]:
        return doc["contexts"] if "contexts" in doc else [doc["context"]] * len(doc["choices"])

    def requests(self, doc: dict[str, Any]) -> list[Request]:
        """Each choice after the prompt (few-shot examples answered with their gold choice)."""
        shots = [(self.questions(ex)[ex["gold"]], self.answers(ex)[ex["gold"]]) for ex in self.shots(doc)]
        delimiter = self.prompt_format.answer_delimiter(" ")
        return [LoglikelihoodRequest(self.prompt_format.context(shots, question), delimiter + answer, group=str(doc["id"]))
                for question, answer in zip(self.questions(doc), self.answers(doc))]

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
