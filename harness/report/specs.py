"""The metric specs and output type behind a stored task result, which every view reads units and direction from.

Results stored since schema 2 carry both (the runner stores the task's own specs). Results from an
older store (schema 1: ``specs`` and ``output_type`` are None) fall back, in this order, to:

1. the task's current declaration in the catalog, when the catalog still knows the task (its
   specs may be newer than the run, but they are declared facts, not guesses);
2. otherwise ``harness.scoring.metric.undeclared``: the value shown as stored (no x100, no "%"),
   no direction (never ranked, so no "best AR" is picked), and no output type (the scoring column
   then names both the run's estimator and its sampler).

Nothing here infers a unit or a direction from a metric's name.
"""
from __future__ import annotations

from typing import Any

from harness.errors import HarnessError
from harness.scoring.metric import Metric, Metrics, undeclared


def declared(task: str) -> tuple[Metrics | None, str | None]:
    """The catalog's current (metric specs, output type) of ``task``; (None, None) for an unknown task."""
    from harness.catalog import catalog
    from harness.registry import import_string

    try:
        builder = import_string(catalog().tasks.get(task).builder)
    except (HarnessError, ImportError, AttributeError, ValueError):
        return None, None
    metrics = getattr(builder, "metrics", None)
    return (metrics if isinstance(metrics, Metrics) else None), getattr(builder, "output_type", None)


def result_specs(task: str, result: dict[str, Any]) -> dict[str, Metric]:
    """{metric: spec} for every metric of one stored task result (``Store.task_results`` value)."""
    if result.get("specs") is not None:
        stored = {spec.name: spec for spec in map(Metric.from_dict, result["specs"])}
    else:
        stored = dict(declared(task)[0] or {})
    names = [k for k, v in result["metrics"].items() if not k.endswith("_stderr") and isinstance(v, (int, float))]
    return {name: stored.get(name) or undeclared(name) for name in list(stored) + names}


def result_output_type(task: str, result: dict[str, Any]) -> str | None:
    return result.get("output_type") or declared(task)[1]


def metric_spec(task: str, metric: str, result: dict[str, Any] | None) -> Metric:
    """The spec of one metric of ``task``: from the stored result when there is one, else as above."""
    specs = result_specs(task, result) if result is not None else dict(declared(task)[0] or {})
    return specs.get(metric) or undeclared(metric)
