"""`harness import-lm-eval DIR`: an lm-eval output folder as runs in the harness store.

DIR is lm-eval's ``--output_path`` (``DIR/<model>/results_<date>.json`` and, with
``--log_samples``, ``samples_<task>_<date>.jsonl``), one model's subfolder, or one results file;
each results file becomes one run, ``lm-eval-<12 hex digits of the file's SHA-256>``, so importing
it again changes nothing. The run's model is lm-eval's ``model:model_args``, its fingerprint
``{**config, "backend": "lm-eval:<model>"}`` and its environment lm-eval's version fields.

Metric names: lm-eval's ``"<metric>,<filter>"`` keys become ``<metric>`` when the filter is
``none`` or the task's only filter (triviaqa's ``exact_match,remove_whitespace`` -> ``exact_match``),
else ``<metric>_<filter>``, with lm-eval's two answer extractions named as the harness names them
(``strict-match`` -> ``strict``, ``flexible-extract`` -> ``flexible``: gsm8k's
``exact_match,strict-match`` -> ``exact_match_strict``); ``<metric>_stderr,<filter>`` becomes that name
plus ``_stderr`` (lm-eval's "N/A" is stored as null). A metric's spec is the harness task's of the
same name where that task declares the metric, else lm-eval's ``higher_is_better`` with unit
``number`` and the aggregation of the task's ``metric_list`` where the harness has it (else
``mean``); the first metric is primary where no harness spec says which. Records come from the
samples files (one per document; a document's lines for several filters are merged). A malformed
folder, file or line is a one-line error, and a run that fails half-way is deleted.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import typer

from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.scoring.metric import Metric
from harness.store import Store, default_store_path

FILTER_SUFFIXES = {"strict-match": "strict", "flexible-extract": "flexible"}


def results_files(path: Path) -> list[Path]:
    """The results files at ``path``: the file itself, those in the folder, or in its subfolders."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise HarnessError(f"'{path}' is neither an lm-eval output folder nor a results file")
    found = sorted(path.glob("results_*.json")) or sorted(path.glob("*/results_*.json"))
    if not found:
        raise HarnessError(f"no lm-eval results_*.json in '{path}' or its subfolders")
    return found


def read_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not data["results"]:
        raise HarnessError(f"{path}: not an lm-eval results file (no 'results' per task)")
    return data


def metric_name(metric: str, filter_name: str, filters: set[str]) -> str:
    if filter_name == "none" or len(filters) == 1:
        return metric
    return f"{metric}_{FILTER_SUFFIXES.get(filter_name, filter_name)}"


def split_key(key: str) -> tuple[str, str] | None:
    """"acc,none" -> ("acc", "none"); None for "alias" and other keys without a filter."""
    metric, comma, filter_name = key.partition(",")
    return (metric, filter_name) if comma else None


def task_metrics(path: Path, task: str, result: Any) -> tuple[dict[str, Any], set[str], dict[str, str]]:
    """(harness-named metrics and stderrs, the task's filters, {harness name: lm-eval metric})."""
    if not isinstance(result, dict):
        raise HarnessError(f"{path}: results of '{task}' are not an object")
    keys = [(key, split) for key, split in ((k, split_key(k)) for k in result) if split]
    filters = {f for _, (m, f) in keys if not m.endswith("_stderr")}
    metrics, origin = {}, {}
    for key, (metric, filter_name) in keys:
        value = result[key]
        value = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if metric.endswith("_stderr"):
            metrics[metric_name(metric[:-len("_stderr")], filter_name, filters) + "_stderr"] = value
        else:
            name = metric_name(metric, filter_name, filters)
            metrics[name], origin[name] = value, metric
    return metrics, filters, origin


def metric_specs(task: str, origin: dict[str, str], data: dict[str, Any]) -> list[dict[str, Any]]:
    """The specs of the task's metrics (see the module docstring)."""
    from harness.report.specs import declared
    from harness.scoring.metrics import AGGREGATIONS

    harness_specs = declared(task)[0] or {}
    higher = (data.get("higher_is_better") or {}).get(task) or {}
    listed = {m.get("metric"): m.get("aggregation") for m in
              ((data.get("configs") or {}).get(task) or {}).get("metric_list") or [] if isinstance(m, dict)}
    specs = []
    for name, metric in origin.items():
        if name in harness_specs:
            specs.append(harness_specs[name])
            continue
        aggregation, direction = listed.get(metric), higher.get(metric)
        known = isinstance(aggregation, str) and aggregation in AGGREGATIONS
        specs.append(Metric(name, aggregation if known else "mean", direction if isinstance(direction, bool) else None,
                            "number"))
    if specs and not any(spec.primary for spec in specs):
        specs[0] = Metric(**{**specs[0].to_dict(), "primary": True})
    return [spec.to_dict() for spec in specs]


def read_samples(path: Path, filters: set[str]) -> list[tuple[int, dict, dict]]:
    """(doc_id, metrics, record) per document of an lm-eval samples file."""
    try:
        texts = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{path}: cannot read ({exc})") from exc
    lines: dict[int, list[dict[str, Any]]] = {}
    for number, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HarnessError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not (isinstance(line, dict) and type(line.get("doc_id")) is int and isinstance(line.get("metrics"), list)):
            raise HarnessError(f"{path}:{number}: not an lm-eval sample (doc_id, metrics)")
        lines.setdefault(line["doc_id"], []).append(line)
    rows = []
    for doc_id, group in sorted(lines.items()):
        metrics = {metric_name(m, line.get("filter", "none"), filters): line.get(m)
                   for line in group for m in line["metrics"]}
        record = {**group[0], **metrics}
        if len(group) > 1:
            record["filter"] = [line.get("filter") for line in group]
            record["filtered_resps"] = {line.get("filter"): line.get("filtered_resps") for line in group}
        rows.append((doc_id, metrics, record))
    return rows


def model_args_dict(model_args: Any) -> dict[str, Any]:
    """lm-eval's model_args (a "k=v,k=v" string or a dict) as a dict."""
    if isinstance(model_args, dict):
        return model_args
    args = {}
    for part in str(model_args or "").split(","):
        if part.strip():
            key, _, value = part.partition("=")
            args[key.strip()] = value.strip()
    return args


def environment(data: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's version fields in the harness's env layout (``packages``, ``git_sha``)."""
    pretty = data.get("pretty_env_info") or ""
    torch = re.search(r"^PyTorch version: (\S+)", pretty, flags=re.M) if isinstance(pretty, str) else None
    return {"packages": {"lm_eval": data.get("lm_eval_version"), "transformers": data.get("transformers_version"),
                         "torch": torch.group(1) if torch else None},
            "git_sha": data.get("git_hash"), "upper_git_hash": data.get("upper_git_hash"),
            "pretty_env_info": pretty, "date": data.get("date")}


def import_results(store: Store, path: Path) -> tuple[str, bool]:
    """Store one results file (and its samples) as a run; (run id, whether it was there already)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise HarnessError(f"{path}: cannot read ({exc})") from exc
    run_id = "lm-eval-" + hashlib.sha256(raw).hexdigest()[:12]
    if any(run["run_id"] == run_id for run in store.runs()):
        return run_id, True
    data = read_json(path, raw)
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    model = str(config.get("model") or "unknown")
    args = model_args_dict(config.get("model_args"))
    date = path.stem[len("results_"):] if path.stem.startswith("results_") else None
    tasks = []
    for task, result in data["results"].items():
        metrics, filters, origin = task_metrics(path, task, result)
        samples = path.with_name(f"samples_{task}_{date}.jsonl") if date else None
        records = read_samples(samples, filters) if samples and samples.is_file() else []
        tasks.append((task, metrics, origin, records))
    from harness.tasks.base import OUTPUT_TYPES

    configs = data.get("configs") or {}
    name = model + (":" + ",".join(f"{k}={v}" for k, v in args.items()) if args else "")
    store.start_run(run_id, model=name,
                    config={"source": "lm-eval", "results_file": str(path.resolve()), "model": model,
                            "model_args": args, "tasks": [t for t, *_ in tasks], "limit": config.get("limit"),
                            "seed": config.get("random_seed"), "batch_size": config.get("batch_size")},
                    fingerprint={**config, "backend": f"lm-eval:{model}"}, env=environment(data),
                    output_dir=str(path.parent.resolve()))
    try:
        for task, metrics, origin, records in tasks:
            task_config = configs.get(task) if isinstance(configs.get(task), dict) else {}
            n_samples = (data.get("n-samples") or {}).get(task) or {}
            shots = (data.get("n-shot") or {}).get(task)
            store.add_records(run_id, task, records)
            store.set_task_result(
                run_id, task, task_hash=stable_hash(task_config),
                prompt_hash=(data.get("task_hashes") or {}).get(task) or stable_hash(
                    [r.get("prompt_hash") for _, _, r in records]),
                n=n_samples.get("effective", len(records)) if isinstance(n_samples, dict) else len(records),
                metrics=metrics, settings={"source": "lm-eval", "config": task_config,
                                           "version": (data.get("versions") or {}).get(task),
                                           "options": {"num_fewshot": shots} if shots is not None else {}},
                specs=metric_specs(task, origin, data),
                output_type=task_config.get("output_type") if task_config.get("output_type") in OUTPUT_TYPES else None)
        store.finish_run(run_id)
    except BaseException:
        store.delete_run(run_id)
        raise
    return run_id, False


def import_lm_eval(directory: Path = typer.Argument(..., help="lm-eval's --output_path, a model's subfolder "
                                                              "or a results_*.json file."),
                   output: Path = typer.Option(Path("runs"), "--output_path", "--output",
                                               help="Folder of the runs (holds the store).")) -> None:
    """Store lm-eval results (and logged samples) as runs that `harness report` and `compare` read."""
    files = results_files(directory)
    store = Store(default_store_path(output))
    for path in files:
        run_id, existed = import_results(store, path)
        typer.echo(f"{path}: {'already imported as' if existed else 'imported as'} run {run_id}")
