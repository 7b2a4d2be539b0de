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
from pathlib import Path
from typing import Any

from harness import distributed
from harness.catalog import catalog
from harness.env import environment
from harness.plan import RunConfig, RunPlan, plan_run
from harness.models.base import (GenerateRequest, InfillRequest, LanguageModel, LoglikelihoodRequest,
                                 RollingRequest)
from harness.scoring.metrics import aggregate
from harness.store import Store, default_store_path, write_json_atomic, write_jsonl_atomic
from harness.hashing import stable_hash, to_jsonable
from harness.tasks.base import Task

# documents scored and stored together: the most a killed run can lose
CHUNK_DOCS = int(os.environ.get("HARNESS_CHUNK_DOCS", 64))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).name or text)[:40]


def evaluate(config: RunConfig | RunPlan, model: LanguageModel | None = None, progress=None) -> dict[str, Any]:
    """Run (or resume) an evaluation and return the results.json payload (rank 0) or {}.

    ``config`` is planned here unless it is a plan already; ``model``: a backend built by the
    caller (the bench's), used as it is."""
    plan = config if isinstance(config, RunPlan) else plan_run(config)
    rank, size = distributed.init()
    tasks = [catalog().task(name, plan.data_dir, plan.task_options.get(name)) for name in plan.tasks]
    for task in tasks:
        task.docs()  # fail on missing data before loading any weights
    if model is None:
        from harness.models.factory import build_model

        model = build_model(plan.card, device=distributed.device_for_rank(plan.device), dtype=plan.dtype,
                            batch_size=plan.batch_size, settings=plan.settings)
    model.seed = plan.seed
    fingerprint = model.fingerprint
    run_id = f"{slug(plan.model)}-{stable_hash(plan.identity(fingerprint))[:12]}"
    output_dir = plan.output / run_id
    store = Store(default_store_path(plan.output))
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        store.start_run(run_id, model=plan.model, config=plan.recorded(), fingerprint=fingerprint,
                        env={**environment(), "world_size": size, "batch_size": fingerprint.get("batch_size")},
                        output_dir=str(output_dir))
    distributed.barrier()
    try:
        reused = {task.name: score_task(task, model, store, run_id, plan.limit, rank, size, progress)
                  for task in tasks}
        if rank != 0:
            return {}
        results = finalize(store, run_id, tasks, plan, fingerprint, output_dir)
    except BaseException as exc:  # the run stays resumable; it is just no longer running
        if rank == 0:
            store.finish_run(run_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    results["harness"]["reused_records"] = reused
    store.finish_run(run_id)
    return results


def score_task(task: Task, model: LanguageModel, store: Store, run_id: str, limit: int | None,
               rank: int, size: int, progress) -> int:
    """Score the task's documents not yet stored; returns how many were already stored."""
    docs = task.selected_docs(limit)
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
    """Aggregate the stored records by the tasks' metric specs, store the aggregates with the specs,
    and write results.json (lm-eval's ``higher_is_better``, the full specs under ``harness``) and
    samples_<task>.jsonl."""
    payload: dict[str, Any] = {"results": {}, "configs": {}, "versions": {}, "n-samples": {},
                               "higher_is_better": {}, "task_hashes": {}}
    specs: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        records = store.records(run_id, task.name)
        docs = task.selected_docs(config.limit)
        metrics = aggregate([m for _, m, _ in records], task.metrics)
        prompt_hash = stable_hash([r["prompt_hash"] for _, _, r in records])
        specs[task.name] = task.metrics.to_list()
        store.set_task_result(run_id, task.name, task_hash=task.task_hash(), prompt_hash=prompt_hash,
                              n=len(records), metrics=metrics, settings=task.settings(), specs=specs[task.name],
                              output_type=task.output_type)
        payload["results"][task.name] = {"alias": task.name, **lm_eval_keys(metrics)}
        payload["configs"][task.name] = {**task.settings(), "task_hash": task.task_hash(),
                                         "output_type": task.output_type}
        payload["versions"][task.name] = task.version
        payload["n-samples"][task.name] = {"original": len(task.docs()), "effective": len(docs)}
        payload["higher_is_better"][task.name] = task.metrics.higher_is_better
        payload["task_hashes"][task.name] = prompt_hash
        write_jsonl_atomic(output_dir / f"samples_{task.name}.jsonl", [r for _, _, r in records])
    run = store.run(run_id)
    payload.update({
        "config": {"model": config.model, "model_args": config.model_args, "batch_size": fingerprint.get("batch_size"),
                   "device": config.device, "dtype": fingerprint.get("dtype"), "limit": config.limit,
                   "random_seed": config.seed, "model_fingerprint": fingerprint},
        "git_hash": run["env"].get("git_sha"), "date": time.time(),
        "harness": {"run_id": run_id, "store": str(store.path), "env": run["env"], "metric_specs": specs},
    })
    write_json_atomic(output_dir / "results.json", payload)
    return payload


def lm_eval_keys(metrics: dict[str, float]) -> dict[str, float]:
    """{"acc": x, "acc_stderr": y} -> {"acc,none": x, "acc_stderr,none": y} (lm-eval's key names)."""
    return {f"{k},none": v for k, v in metrics.items()}
