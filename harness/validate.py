"""Cross-check the harness's AR scoring against lm-eval's own HF backend on the same requests.

Both sides receive the same (context, continuation) pairs built by the harness's tasks; lm-eval's
``HFLM.loglikelihood`` scores them with its own tokenisation, batching and truncation. The check
passes when every per-request log-likelihood agrees within the tolerance and the accuracies match.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.catalog import catalog
from harness.errors import HarnessError
from harness.models.base import LoglikelihoodResult


def lm_eval_hf(weights: str, batch_size: int, dtype: str):
    """lm-eval's own HF backend over the same weights."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise HarnessError("validation needs lm-eval: pip install 'dlm-harness[eval]'") from exc
    return HFLM(pretrained=weights, batch_size=batch_size, device="cpu", dtype=dtype)


def lm_eval_loglikelihoods(lm, requests) -> list[LoglikelihoodResult]:
    from lm_eval.api.instance import Instance

    instances = [Instance(request_type="loglikelihood", doc={}, arguments=(r.context, r.continuation), idx=i)
                 for i, r in enumerate(requests)]
    return [LoglikelihoodResult(logprob=float(ll), is_greedy=bool(g), n_tokens=0)
            for ll, g in lm.loglikelihood(instances, disable_tqdm=True)]


def validate_against_lm_eval(model: str, tasks: list[str], *, limit: int | None, batch_size: int,
                             data_dir: Path | None, tolerance: float, console: Console) -> bool:
    from harness.models.factory import build_model
    from harness.models.loading import resolve_weights
    from harness.plan import RunConfig, plan_run

    plan = plan_run(RunConfig(model=model, tasks=tasks, limit=limit, batch_size=batch_size, data_dir=data_dir))
    card = plan.card
    if card.backend != "hf_ar":
        raise HarnessError(f"'{model}' is a diffusion model; lm-eval's HF backend scores AR models only")
    task_objs = [catalog().task(name, data_dir, plan.task_options.get(name)) for name in plan.tasks]
    ours_model = build_model(card, batch_size=batch_size, dtype=plan.dtype, settings=plan.settings)
    table = Table(title=f"harness vs lm-eval HFLM — {model}")
    for column in ("task", "requests", "max |Δ loglik|", "acc (harness)", "acc (lm-eval)", "greedy agree", "verdict"):
        table.add_column(column)
    all_ok = True
    reference = lm_eval_hf(resolve_weights(card.weights), batch_size, card.dtype)
    for task in task_objs:
        docs = task.selected_docs(limit)
        per_doc = [task.requests(d) for d in docs]
        flat = [r for reqs in per_doc for r in reqs]
        ours = ours_model.loglikelihood(flat)
        theirs = lm_eval_loglikelihoods(reference, flat)
        delta = max(abs(a.logprob - b.logprob) for a, b in zip(ours, theirs))
        greedy = sum(a.is_greedy == b.is_greedy for a, b in zip(ours, theirs)) / len(flat)
        acc = {}
        for side, results in (("ours", ours), ("theirs", theirs)):
            scores, offset = [], 0
            for doc, reqs in zip(docs, per_doc):
                metrics, _ = task.process(doc, results[offset:offset + len(reqs)])
                scores.append(metrics["acc"])
                offset += len(reqs)
            acc[side] = sum(scores) / len(scores)
        ok = delta <= tolerance and acc["ours"] == acc["theirs"]
        all_ok &= ok
        table.add_row(task.name, str(len(flat)), f"{delta:.2e}", f"{acc['ours']:.4f}", f"{acc['theirs']:.4f}",
                      f"{greedy:.3f}", "[green]pass[/]" if ok else "[red]FAIL[/]")
    console.print(table)
    return all_ok
