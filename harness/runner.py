"""plan -> skip what is stored -> batched model calls -> score -> append records -> aggregate.

A run's id is a hash of what determines its numbers (model, weights, dtype, device, model args,
tasks, limit, seed, prompt format), so the same command resumes the same run: documents already
stored are never recomputed. Across runs a record is reused when its ``cache_key`` matches (the
model fingerprint, seed, task spec, rendered requests and document), so adding a task or raising
``--limit`` scores only what is new (``use_cache=False``: ``--no-cache``). Documents are scored and
stored one batch at a time (the documents whose requests fill one batch), so an interrupted run
loses at most the batch in flight. While a run computes it holds ``<output>/<run_id>/.lock``: the
same run started again meanwhile says so, waits, and then reads the first one's records. Under
torchrun/accelerate each rank scores its shard of every batch and rank 0 writes the store.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from harness import distributed
from harness.catalog import catalog
from harness.console import console
from harness.env import environment
from harness.errors import HarnessError
from harness.plan import RunConfig, RunPlan, plan_run, stable_fingerprint
from harness.models.base import (GenerateRequest, InfillRequest, LanguageModel, LoglikelihoodRequest,
                                 RollingRequest)
from harness.models.batching import parse_batch_size
from harness.scoring.metrics import aggregate
from harness.store import (Store, check_writable_folder, default_store_path, write_json_atomic,
                           write_jsonl_atomic)
from harness.hashing import sha256_text, stable_hash, to_jsonable
from harness.tasks.base import Request, Task
from harness.tasks.prompt_format import PLAIN, PromptFormat


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: what was stored, and how to resume."""

    def __init__(self, run_id: str, store: Path, stored: int, total: int):
        super().__init__(f"interrupted: {stored} of {total} documents of run {run_id} are stored in {store}; "
                         f"run the same command to resume")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).name or text)[:40]


def evaluate(config: RunConfig | RunPlan, model: LanguageModel | None = None, progress=None) -> dict[str, Any]:
    """Run (or resume) an evaluation and return the results.json payload (rank 0) or {}.

    ``config`` is planned here unless it is a plan already; ``model``: a backend built by the
    caller (the bench's), used as it is. The store is opened and the output folder checked before
    any weights load; the run's lock is held while it computes."""
    plan = config if isinstance(config, RunPlan) else plan_run(config)
    rank, size = distributed.init()
    tasks = [catalog().task(name, plan.data_dir, plan.task_options.get(name)) for name in plan.tasks]
    for task in tasks:
        task.docs()  # fail on missing data before loading any weights
        check_fewshot(task)
    check_writable_folder(plan.output, "output folder")
    store = Store(default_store_path(plan.output))
    if store.readonly:
        raise HarnessError(f"store {store.path} is read-only: a run cannot write its records there")
    if model is None:
        from harness.models.factory import build_model

        model = build_model(plan.card, device=distributed.device_for_rank(plan.device), dtype=plan.dtype,
                            batch_size=plan.batch_size, settings=plan.settings)
    model.seed = plan.seed
    fingerprint = model.fingerprint
    template = set_prompt_format(tasks, plan.prompt_format, model)
    name = f"{fingerprint['name']}-{fingerprint['engine']}" if fingerprint.get("served") else plan.model
    run_id = f"{slug(name)}-{stable_hash(plan.identity(fingerprint))[:12]}"
    output_dir = plan.output / run_id
    started = time.time()
    with run_lock(output_dir, run_id, rank == 0):
        if rank == 0:
            store.start_run(run_id, model=plan.model, config=plan.recorded(), fingerprint=fingerprint,
                            env={**environment(), "world_size": size, "batch_size": fingerprint.get("batch_size")},
                            output_dir=str(output_dir))
        distributed.barrier()
        return compute(Run(store, run_id, tasks, plan, fingerprint, output_dir, template, started, rank, size),
                       model, progress)


@dataclass
class Run:
    """What one evaluation computes with: its store, id, tasks, plan and the process's rank."""
    store: Store
    run_id: str
    tasks: list[Task]
    plan: RunPlan
    fingerprint: dict[str, Any]
    output_dir: Path
    template: str | None
    started: float
    rank: int
    size: int


def compute(run: Run, model: LanguageModel, progress) -> dict[str, Any]:
    """Score every task, then aggregate; a run that stops early is marked interrupted or failed."""
    store, run_id, tasks, plan = run.store, run.run_id, run.tasks, run.plan
    try:
        reused = {task.name: score_task(run, task, model, progress) for task in tasks}
        if run.rank != 0:
            return {}
        results = finalize(run)
    except BaseException as exc:  # the run stays resumable; it is just no longer running
        if run.rank == 0:
            mark_stopped(store, run_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
            stored = sum(len(store.done_docs(run_id, task.name)) for task in tasks)
            total = sum(len(task.selected_docs(plan.limit)) for task in tasks)
            raise RunInterrupted(run_id, store.path, stored, total) from None
        raise
    results["harness"]["reused_records"] = {name: counts["resumed"] for name, counts in reused.items()}
    results["harness"]["cached_records"] = {name: counts["cached"] for name, counts in reused.items()}
    store.finish_run(run_id)
    return results


def mark_stopped(store: Store, run_id: str, status: str) -> None:
    """Mark the run stopped when the store can still be written (not on a full disk)."""
    try:
        store.finish_run(run_id, status)
    except HarnessError:
        pass


@contextmanager
def run_lock(folder: Path, run_id: str, enabled: bool = True) -> Iterator[None]:
    """Hold ``folder/.lock`` while the run computes: the same run started again meanwhile says so,
    waits, then resumes from the first one's records (the lock goes with its holder, even on SIGKILL)."""
    if not enabled:
        yield
        return
    check_writable_folder(folder, "run folder")
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip()
            holder = f"pid {pid}" if pid else "another process"
            console.print(f"run {run_id} is being computed by {holder}; waiting", highlight=False)
            fcntl.flock(handle, fcntl.LOCK_EX)
            console.print(f"run {run_id}: {holder} is done; reading its records", highlight=False)
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def check_fewshot(task: Task) -> None:
    """Few-shot examples asked of a task that has none (or lays out its own prompt) fail before any
    weights load."""
    if task.options.get("num_fewshot"):
        if not task.formats_prompts:
            raise HarnessError(f"task '{task.name}' lays out its own prompt and takes no few-shot examples")
        task.fewshot_pool()


def set_prompt_format(tasks: list[Task], prompt_format: PromptFormat, model: LanguageModel) -> str | None:
    """Give each task that lays out prompts the run's format (the chat template bound to the model's
    tokenizer); returns the template's text, or None for plain text."""
    template = model.chat_template(prompt_format.chat_template) if prompt_format.chat else None
    if template is not None:
        name = prompt_format.chat_template
        prompt_format = replace(prompt_format, renderer=lambda messages: model.render_chat(messages, name))
    own = [task.name for task in tasks if not task.formats_prompts]
    if prompt_format != PLAIN and own:
        console.print(f"[yellow]note[/]: the prompt format does not apply to {', '.join(own)} (a layout of their own)")
    for task in tasks:
        task.prompt_format = prompt_format if task.formats_prompts else PLAIN
    return template


def cache_key(fingerprint: dict[str, Any], seed: int, task: Task, doc: dict[str, Any], requests: list[Request]) -> str:
    """What a stored record depends on: the model, the seed, the task spec, the requests, the document."""
    return stable_hash({"fingerprint": stable_fingerprint(fingerprint), "seed": seed, "task": task.task_hash(),
                        "requests": Task.prompt_hash(requests), "doc": stable_hash(doc)})


def score_task(run: Run, task: Task, model: LanguageModel, progress) -> dict[str, int]:
    """Score the task's documents not yet stored, one batch at a time; returns how many were stored
    by this run already (``resumed``) and how many were reused from other runs (``cached``)."""
    store, run_id, plan, rank, size = run.store, run.run_id, run.plan, run.rank, run.size
    docs = task.selected_docs(plan.limit)
    done = store.done_docs(run_id, task.name)
    pending = [doc for doc in docs if doc["id"] not in done]
    requests = {doc["id"]: task.requests(doc) for doc in pending}
    keys = {doc["id"]: cache_key(run.fingerprint, plan.seed, task, doc, requests[doc["id"]]) for doc in pending}
    hits = store.cached(list(keys.values())) if plan.use_cache and pending else {}
    reused = [doc for doc in pending if keys[doc["id"]] in hits]
    if reused and rank == 0:
        store.add_records(run_id, task.name, [(doc["id"], *hits[keys[doc["id"]]]) for doc in reused],
                          [keys[doc["id"]] for doc in reused])
    pending = [doc for doc in pending if keys[doc["id"]] not in hits]
    bar = progress.add_task(task.name, total=len(docs), completed=len(docs) - len(pending)) if progress else None
    rows_per_batch = parse_batch_size(plan.batch_size)[0] * size
    for batch in batches(pending, requests, rows_per_batch):
        mine = batch[rank::size]
        rows = answer(task, model, mine, {doc["id"]: requests[doc["id"]] for doc in mine})
        gathered = distributed.gather(rows)
        if rank == 0:
            flat = [row for part in gathered for row in part]
            store.add_records(run_id, task.name, flat, [keys[doc_id] for doc_id, _, _ in flat])
        if progress:
            progress.update(bar, advance=len(batch))
    distributed.barrier()
    return {"resumed": len(docs) - len(pending) - len(reused), "cached": len(reused)}


def batches(docs: list[dict[str, Any]], requests: dict[int, list[Request]], rows: int) -> Iterator[list[dict]]:
    """Consecutive documents whose requests fill one model batch of ``rows`` (at least one document)."""
    batch: list[dict[str, Any]] = []
    count = 0
    for doc in docs:
        n = len(requests[doc["id"]])
        if batch and count + n > rows:
            yield batch
            batch, count = [], 0
        batch.append(doc)
        count += n
    if batch:
        yield batch


def answer(task: Task, model: LanguageModel, docs: list[dict[str, Any]],
           requests: dict[int, list[Request]]) -> list[tuple[int, dict, dict]]:
    """Score a list of docs: one model call per request type, then per-doc metrics and records."""
    per_doc = [requests[doc["id"]] for doc in docs]
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
                  "resps": [to_jsonable(a) for a in answers], **metrics, **extra}
        if task.options.get("num_fewshot"):
            record["fewshot_ids"] = task.fewshot_indices(doc)  # positions in the task's few-shot pool
        record.update(sample_hashes(doc, reqs, extra.get("target")))
        rows.append((doc["id"], metrics, record))
    return rows


def sample_hashes(doc: dict[str, Any], requests: list[Request], target: Any) -> dict[str, str]:
    """lm-eval's sample hashes (sha256 of the document as indented JSON, of the first request's
    context, of ``str(target)``) and the harness's hash of all rendered requests."""
    first = requests[0]
    context = first.prefix if isinstance(first, InfillRequest) else first.text if isinstance(first, RollingRequest) \
        else first.context
    return {"doc_hash": sha256_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str)),
            "prompt_hash": sha256_text(context), "target_hash": sha256_text(str(target)),
            "requests_hash": Task.prompt_hash(requests)}


def finalize(run: Run) -> dict[str, Any]:
    """Aggregate the stored records by the tasks' metric specs, store the aggregates with the specs,
    and write results.json (lm-eval's fields, the full specs under ``harness``) and
    samples_<task>.jsonl."""
    store, run_id, tasks, plan, fingerprint = run.store, run.run_id, run.tasks, run.plan, run.fingerprint
    output_dir, template, started = run.output_dir, run.template, run.started
    payload: dict[str, Any] = {"results": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
                               "higher_is_better": {}, "n-samples": {}}
    specs: dict[str, list[dict[str, Any]]] = {}
    task_hashes: dict[str, str] = {}
    for task in tasks:
        records = store.records(run_id, task.name)
        docs = task.selected_docs(plan.limit)
        metrics = aggregate([m for _, m, _ in records], task.metrics)
        prompt_hash = stable_hash([r.get("requests_hash", r["prompt_hash"]) for _, _, r in records])
        specs[task.name] = task.metrics.to_list()
        settings = {**task.settings(), "prompt_format": task.prompt_format.recorded()}
        store.set_task_result(run_id, task.name, task_hash=task.task_hash(), prompt_hash=prompt_hash,
                              n=len(records), metrics=metrics, settings=settings, specs=specs[task.name],
                              output_type=task.output_type)
        payload["results"][task.name] = {"alias": task.name, **lm_eval_keys(metrics)}
        payload["group_subtasks"][task.name] = []
        payload["configs"][task.name] = {**settings, "task_hash": task.task_hash(), "output_type": task.output_type}
        payload["versions"][task.name] = task.version
        payload["n-shot"][task.name] = task.options.get("num_fewshot") or 0
        payload["higher_is_better"][task.name] = task.metrics.higher_is_better
        payload["n-samples"][task.name] = {"original": len(task.docs()), "effective": len(docs)}
        task_hashes[task.name] = prompt_hash
        write_jsonl_atomic(output_dir / f"samples_{task.name}.jsonl", [r for _, _, r in records])
    env = store.run(run_id)["env"]
    ended = time.time()
    prompt_format = plan.prompt_format
    payload.update({
        "config": {"model": plan.model, "model_args": plan.model_args, "batch_size": fingerprint.get("batch_size"),
                   "batch_sizes": [], "device": plan.device, "dtype": fingerprint.get("dtype"),
                   "use_cache": str(store.path) if plan.use_cache else None, "limit": plan.limit,
                   "bootstrap_iters": 0, "gen_kwargs": None, "random_seed": plan.seed, "numpy_seed": plan.seed,
                   "torch_seed": plan.seed, "fewshot_seed": 1234, "model_fingerprint": fingerprint},
        "git_hash": env.get("git_sha"), "date": started,
        "task_hashes": task_hashes, "model_source": fingerprint.get("backend"), "model_name": plan.model,
        "model_name_sanitized": slug(plan.model),
        "system_instruction": prompt_format.system_instruction,
        "system_instruction_sha": sha256_text(prompt_format.system_instruction) if prompt_format.system_instruction else None,
        "fewshot_as_multiturn": prompt_format.fewshot_as_multiturn,
        "chat_template": template, "chat_template_sha": sha256_text(template) if template else None,
        "start_time": started, "end_time": ended, "total_evaluation_time_seconds": str(ended - started),
        "harness": {"run_id": run_id, "store": str(store.path), "env": env, "metric_specs": specs,
                    "prompt_format": prompt_format.recorded()},
    })
    write_json_atomic(output_dir / "results.json", payload)
    return payload


def lm_eval_keys(metrics: dict[str, float]) -> dict[str, float]:
    """{"acc": x, "acc_stderr": y} -> {"acc,none": x, "acc_stderr,none": y} (lm-eval's key names)."""
    return {f"{k},none": v for k, v in metrics.items()}
