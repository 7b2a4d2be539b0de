"""Aggregation of per-example metrics with standard errors.

Means get the analytic standard error (sample std / sqrt(n)). Perplexity (exp of the negative
mean log-likelihood), weighted perplexity (per-example [logprob, count]: exp(-sum logprob / sum
count)) and bits per unit (-sum logprob / sum count / ln 2) get a seeded bootstrap over examples
with a capped number of resamples.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

BOOTSTRAP_ITERS = 1000


def mean_stderr(values: Sequence[float]) -> float:
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def perplexity(logprobs: Sequence[float]) -> float:
    return float(math.exp(-np.mean(logprobs)))


def bootstrap_stderr(values: Sequence[float], statistic, iters: int = BOOTSTRAP_ITERS, seed: int = 1234) -> float:
    if len(values) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    data = np.asarray(values, dtype=float)  # [n] or [n, 2] for paired metrics
    stats = [statistic(data[rng.integers(0, len(data), len(data))]) for _ in range(iters)]
    return float(np.std(stats, ddof=1))


def weighted_perplexity(pairs) -> float:
    pairs = np.asarray(pairs, dtype=float)
    return float(math.exp(-pairs[:, 0].sum() / pairs[:, 1].sum()))


def bits_per_unit(pairs) -> float:
    pairs = np.asarray(pairs, dtype=float)
    return float(-pairs[:, 0].sum() / pairs[:, 1].sum() / math.log(2))


PAIRED = {"weighted_perplexity": weighted_perplexity, "bits_per_unit": bits_per_unit}


def aggregate(per_example: list[dict[str, float]], aggregations: dict[str, str]) -> dict[str, float]:
    """{metric: value, metric_stderr: value} over the examples, by each metric's aggregation."""
    out: dict[str, float] = {}
    for metric, how in aggregations.items():
        values = [m[metric] for m in per_example if metric in m and m[metric] is not None]
        if not values:
            continue
        if how == "mean":
            out[metric], out[f"{metric}_stderr"] = float(np.mean(values)), mean_stderr(values)
        elif how == "perplexity":
            out[metric], out[f"{metric}_stderr"] = perplexity(values), bootstrap_stderr(values, perplexity)
        elif how in PAIRED:
            statistic = PAIRED[how]
            out[metric], out[f"{metric}_stderr"] = statistic(values), bootstrap_stderr(values, statistic)
        else:
            raise ValueError(f"unknown aggregation '{how}' for metric '{metric}'")
    return out
