"""Aggregation of per-example metrics with standard errors, as a registry of named aggregations.

An aggregation is a statistic over the examples' values plus how its standard error is estimated.
Means get the analytic standard error (sample std / sqrt(n)). Perplexity (exp of the negative
mean log-likelihood), weighted perplexity (per-example [logprob, count]: exp(-sum logprob / sum
count)) and bits per unit (-sum logprob / sum count / ln 2) get a seeded bootstrap over examples
with a capped number of resamples. A new aggregation is one function under ``@aggregation(name)``;
a metric spec (``harness.scoring.metric.Metric``) names the aggregation it uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from harness.registry import Registry

BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class Aggregation:
    name: str
    statistic: Callable[[Any], float]  # the examples' values (numbers, or [value, weight] pairs) -> one number
    stderr: Callable[[Any], float]

    def __call__(self, values: Sequence[Any]) -> tuple[float, float]:
        """(value, standard error) over the examples."""
        return self.statistic(values), self.stderr(values)


AGGREGATIONS: Registry[Aggregation] = Registry("aggregation")


def aggregation(name: str, *, stderr: Callable[[Any], float] | None = None) -> Callable:
    """Register the decorated statistic as aggregation ``name``; its standard error is ``stderr(values)``
    or, by default, a seeded bootstrap of the statistic over the examples."""

    def decorator(statistic: Callable[[Any], float]) -> Callable[[Any], float]:
        AGGREGATIONS.register(name, Aggregation(name, statistic, stderr or (
            lambda values: bootstrap_stderr(values, statistic))))
        return statistic

    return decorator


def mean_stderr(values: Sequence[float]) -> float:
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def bootstrap_stderr(values: Sequence[Any], statistic, iters: int = BOOTSTRAP_ITERS, seed: int = 1234) -> float:
    if len(values) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    data = np.asarray(values, dtype=float)  # [n] or [n, 2] for paired metrics
    stats = [statistic(data[rng.integers(0, len(data), len(data))]) for _ in range(iters)]
    return float(np.std(stats, ddof=1))


@aggregation("mean", stderr=mean_stderr)
def mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


@aggregation("perplexity")
def perplexity(logprobs: Sequence[float]) -> float:
    return float(math.exp(-np.mean(logprobs)))


@aggregation("weighted_perplexity")
def weighted_perplexity(pairs) -> float:
    pairs = np.asarray(pairs, dtype=float)
    return float(math.exp(-pairs[:, 0].sum() / pairs[:, 1].sum()))


@aggregation("bits_per_unit")
def bits_per_unit(pairs) -> float:
    pairs = np.asarray(pairs, dtype=float)
    return float(-pairs[:, 0].sum() / pairs[:, 1].sum() / math.log(2))


def aggregations_of(metrics: Mapping[str, Any] | Iterable[Any]) -> dict[str, str]:
    """{metric: aggregation name} from metric specs (a ``Metrics`` mapping or a list of ``Metric``) or
    from a plain {metric: aggregation name} mapping."""
    if isinstance(metrics, Mapping):
        return {name: how if isinstance(how, str) else how.aggregation for name, how in metrics.items()}
    return {spec.name: spec.aggregation for spec in metrics}


def aggregate(per_example: list[dict[str, Any]], metrics: Mapping[str, Any] | Iterable[Any]) -> dict[str, float]:
    """{metric: value, metric_stderr: value} over the examples, by each metric's aggregation."""
    out: dict[str, float] = {}
    for metric, how in aggregations_of(metrics).items():
        values = [m[metric] for m in per_example if metric in m and m[metric] is not None]
        if values:
            out[metric], out[f"{metric}_stderr"] = AGGREGATIONS.get(how)(values)
    return out
