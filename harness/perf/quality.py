"""The quality half of a speed-quality run: a task scored by the backend in the bench's setting."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.errors import HarnessError

QUALITY_KEYS = ("task", "limit", "metric", "task_options")


def check_quality(quality: dict[str, Any] | None, data_dir: Path | None) -> None:
    """Fail on a bad quality spec or missing task data before any model is loaded."""
    if not quality:
        return
    from harness.catalog import catalog

    unknown = sorted(set(quality) - set(QUALITY_KEYS))
    if unknown or "task" not in quality:
        raise HarnessError(f"quality needs a task and takes {', '.join(QUALITY_KEYS)}; got {sorted(quality)}")
    task = catalog().task(quality["task"], data_dir, quality.get("task_options"))
    task.docs()
    names = metric_names(task)
    if quality.get("metric", names[0]) not in names:
        raise HarnessError(f"task '{task.name}' has no metric '{quality['metric']}' (has: {', '.join(names)})")


def metric_names(task) -> list[str]:
    """The task's metric names, its primary one first."""
    return [m.name for m in sorted(task.metric_specs(), key=lambda m: not m.primary)]


def quality(lm, variant, setting, spec: dict[str, Any], *, name: str, seed: int, device: str,
            data_dir: Path | None, output: Path, memo: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The quality task's score for ``variant`` at ``setting`` (one eval run per backend setting)."""
    from harness.hashing import stable_hash
    from harness.plan import RunConfig

    variant.configure(setting)
    key = stable_hash(variant.describe(setting) | {"use_cache": None})  # the cache changes speed, not text
    if key not in memo:
        memo[key] = task_quality(RunConfig(model=name, tasks=[spec["task"]], seed=seed, device=device,
                                           dtype=lm.dtype, data_dir=data_dir, output=output), spec, model=lm)
    return memo[key]


def task_quality(config, spec: dict[str, Any], model=None) -> dict[str, Any]:
    """``spec``'s task scored by an eval run of ``config`` (its limit and task options from ``spec``;
    ``model``: a backend already built): {task, metric, value, stderr, n, run_id}."""
    from dataclasses import replace

    from harness.catalog import catalog
    from harness.runner import evaluate

    task = spec["task"]
    config = replace(config, tasks=[task], limit=spec.get("limit"),
                     task_options={task: spec["task_options"]} if spec.get("task_options") else {})
    results = evaluate(config, model=model)
    metric = spec.get("metric") or metric_names(catalog().task(task, config.data_dir))[0]
    scores = results["results"][task]
    return {"task": task, "metric": metric, "value": scores[f"{metric},none"],
            "stderr": scores.get(f"{metric}_stderr,none"), "n": results["n-samples"][task]["effective"],
            "run_id": results["harness"]["run_id"]}
