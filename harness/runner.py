"""plan -> skip what is stored -> batched model calls -> score -> append records -> aggregate.

A run's id is a hash of what determines its numbers (model, weights, dtype, device, model args,
tasks, limit, seed), so the same command resumes the same run: documents already stored are
never recomputed. Under torchrun/accelerate each rank scores its shard of every chunk and rank 0
writes the store.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness import distributed
from harness.catalog import catalog
from harness.env import environment
from harness.errors import HarnessError
from harness.models.base import (GenerateRequest, InfillRequest, LanguageModel, LoglikelihoodRequest,
                                 RollingRequest)
from harness.scoring.metrics import aggregate
from harness.store import Store, default_store_path, write_json_atomic, write_jsonl_atomic
from harness.hashing import stable_hash, to_jsonable
from harness.tasks.base import Task

# documents scored and stored together: the most a killed run can lose
CHUNK_DOCS = int(os.environ.get("HARNESS_CHUNK_DOCS", 64))


@dataclass
class RunConfig:
    model: str
    tasks: list[str]
    suite: str | None = None
    limit: int | None = None
    seed: int = 1234
    batch_size: int | str = 16
    device: str = "cpu"
    dtype: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    data_dir: Path | None = None
    output: Path = Path("runs")

    def identity(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        stable = {k: v for k, v in fingerprint.items() if k not in ("batch_size",)}
        return {"model": self.model, "fingerprint": stable, "tasks": self.tasks, "limit": self.limit,
                "seed": self.seed, "model_args": self.model_args, "task_options": self.task_options}


def check_output_dir(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise HarnessError(f"output path '{output}' is a file, not a directory")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).name or text)[:40]


def model_family(name: str, model: LanguageModel | None = None) -> str:
    """``diffusion`` or ``ar``: which of a suite's per-family settings apply."""
    if model is not None:
        return "diffusion" if model.is_diffusion else "ar"
    from harness.models.factory import resolve_card

    return "diffusion" if resolve_card(name).backend == "diffusion" else "ar"


def with_suite_options(config: RunConfig, family: str) -> RunConfig:
    """Fold the suite's per-task options for this model family under the command's own, so they are
    part of the run's identity."""
    suite = catalog().suites.get(config.suite) if config.suite else None
    if suite is None:
        return config
    merged = {name: {**suite.task_options(name, family), **config.task_options.get(name, {})}
              for name in suite.options if name in config.tasks}
    merged = {name: options for name, options in merged.items() if options}
    return replace(config, task_options={**config.task_options, **merged}) if merged else config


def evaluate(config: RunConfig, model: LanguageModel | None = None, progress=None) -> dict[str, Any]:
    """Run (or resume) an evaluation and return the results.json payload (rank 0) or {}."""
    if config.limit is not None and config.limit < 1:
        raise HarnessError(f"--limit must be a positive integer, got {config.limit}")
    check_output_dir(config.output)
    # an unknown model name fails here, before any data is read
    config = with_suite_options(config, model_family(config.model, model))
    rank, size = distributed.init()
    tasks = [catalog().task(name, config.data_dir, config.task_options.get(name)) for name in config.tasks]
    for task in tasks:
        task.docs()  # fail on missing data before loading any weights
    if model is None:
        from harness.models.factory import build_model

        model = build_model(config.model, device=distributed.device_for_rank(config.device), dtype=config.dtype,
                            batch_size=config.batch_size, model_args=config.model_args)
    model.seed = config.seed
    fingerprint = model.fingerprint
    run_id = f"{slug(config.model)}-{stable_hash(config.identity(fingerprint))[:12]}"
    output_dir = config.output / run_id
    store = Store(default_store_path(config.output))
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
        store.start_run(run_id, model=config.model, config=settings, fingerprint=fingerprint,
                        env={**environment(), "world_size": size, "batch_size": fingerprint.get("batch_size")},
                        output_dir=str(output_dir))
    distributed.barrier()
    reused = {task.name: score_task(task, model, store, run_id, config.limit, rank, size, progress)
              for task in tasks}
    if rank != 0:
        return {}
    results = finalize(store, run_id, tasks, config, fingerprint, output_dir)
    results["harness"]["reused_records"] = reused
    store.finish_run(run_id)
    return results


def score_task(task: Task, model: LanguageModel, store: Store, run_id: str, limit: int | None,
               rank: int, size: int, progress) -> int:
    """Score the task's documents not yet stored; returns how many were already stored."""
    docs = task.docs()[:limit] if limit else task.docs()
    done = store.done_docs(run_id, task.name)
    pending = [doc for doc in docs if doc["id"] not in done]
    bar = progress.add_task(task.name, total=len(docs), completed=len(docs) - len(pending)) if progress else None
    for start in range(0, len(pending), CHUNK_DOCS):
        chunk = pending[start:start + CHUNK_DOCS]
        mine = chunk[rank::size]
        rows = answer(task, model, mine)
        gathered = distributed.gather(rows)
        if rank == 0:
            store.add_records(run_id, task.name, [row for part in gathered for row in part])
        if progress:
            progress.update(bar, advance=len(chunk))
    distributed.barrier()
    return len(docs) - len(pending)


def answer(task: Task, model: LanguageModel, docs: list[dict[str, Any]]) -> list[tuple[int, dict, dict]]:
    """Score a list of docs: one model call per request type, then per-doc metrics and records."""
    per_doc = [task.requests(doc) for doc in docs]
    flat = [r for reqs in per_doc for r in reqs]
    results: list[Any] = [None] * len(flat)
    for kind, method in ((LoglikelihoodRequest, model.loglikelihood), (GenerateRequest, model.generate),
                         (InfillRequest, model.infill), (RollingRequest, model.loglikelihood_rolling)):
        indices = [i for i, r in enumerate(flat) if isinstance(r, kind)]
        if indices:
            for i, result in zip(indices, method([flat[i] for i in indices])):
                results[i] = result
    rows, offset = [], 0
    for doc, reqs in zip(docs, per_doc):
        answers = results[offset:offset + len(reqs)]
        offset += len(reqs)
        metrics, extra = task.process(doc, answers)
        record = {"doc_id": doc["id"], "doc": doc, "arguments": [to_jsonable(r) for r in reqs],
                  "resps": [to_jsonable(a) for a in answers], **metrics, **extra,
                  "doc_hash": stable_hash(doc), "prompt_hash": Task.prompt_hash(reqs)}
        rows.append((doc["id"], metrics, record))
    return rows


def finalize(store: Store, run_id: str, tasks: list[Task], config: RunConfig, fingerprint: dict,
             output_dir: Path) -> dict[str, Any]:
    """Aggregate the stored records and write results.json and samples_<task>.jsonl."""
    payload: dict[str, Any] = {"results": {}, "configs": {}, "versions": {}, "n-samples": {},
                               "higher_is_better": {}, "task_hashes": {}}
    for task in tasks:
        records = store.records(run_id, task.name)
        docs = task.docs()[:config.limit] if config.limit else task.docs()
        metrics = aggregate([m for _, m, _ in records], task.metrics)
        prompt_hash = stable_hash([r["prompt_hash"] for _, _, r in records])
        store.set_task_result(run_id, task.name, task_hash=task.task_hash(), prompt_hash=prompt_hash,
                              n=len(records), metrics=metrics, settings=task.settings())
        payload["results"][task.name] = {"alias": task.name, **lm_eval_keys(metrics)}
        payload["configs"][task.name] = {**task.settings(), "task_hash": task.task_hash()}
        payload["versions"][task.name] = task.version
        payload["n-samples"][task.name] = {"original": len(task.docs()), "effective": len(docs)}
        payload["higher_is_better"][task.name] = task.higher_is_better
        payload["task_hashes"][task.name] = prompt_hash
        write_jsonl_atomic(output_dir / f"samples_{task.name}.jsonl", [r for _, _, r in records])
    run = store.run(run_id)
    payload.update({
        "config": {"model": config.model, "model_args": config.model_args, "batch_size": fingerprint.get("batch_size"),
                   "device": config.device, "dtype": fingerprint.get("dtype"), "limit": config.limit,
                   "random_seed": config.seed, "model_fingerprint": fingerprint},
        "git_hash": run["env"].get("git_sha"), "date": time.time(),
        "harness": {"run_id": run_id, "store": str(store.path), "env": run["env"]},
    })
    write_json_atomic(output_dir / "results.json", payload)
    return payload


def lm_eval_keys(metrics: dict[str, float]) -> dict[str, float]:
    """{"acc": x, "acc_stderr": y} -> {"acc,none": x, "acc_stderr,none": y} (lm-eval's key names)."""
    return {f"{k},none": v for k, v in metrics.items()}
