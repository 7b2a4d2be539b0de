"""The runs in a store: `harness ls runs` (one row each), `harness show RUN` and `harness rm RUN...`.

Every value that came from a run is printed as plain text, never as rich markup.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import typer
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from harness.console import console, out
from harness.errors import HarnessError
from harness.store import Store, default_store_path

OUTPUT_HELP = "Folder of the runs (holds the default store, or $HARNESS_STORE)."
STATUS_STYLES = {"complete": "green", "running": "yellow", "failed": "red", "interrupted": "yellow"}
# (config key, label) of the settings `show` prints, those the run's config has
SETTINGS = (("tasks", "tasks"), ("suite", "suite"), ("limit", "limit"), ("seed", "seed"),
            ("batch_size", "batch size"), ("device", "device"), ("dtype", "dtype"), ("model_args", "model args"),
            ("task_options", "task options"), ("prompt_format", "prompt format"))
PACKAGES = (("torch", "torch"), ("transformers", "transformers"), ("dlm-harness", "harness"))
HARDWARE = (("cpu", "cpu"), ("cpu_cores", "cpu cores"), ("memory_gb", "memory GB"), ("gpu", "gpu"),
            ("gpu_count", "gpu count"), ("gpu_memory_gb", "gpu memory GB"), ("cuda", "cuda"), ("driver", "driver"))


def date(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def plain(value: Any) -> str:
    """A setting on one line: "-" for nothing, k=v,... for a mapping, a,b for a list, nested values as JSON."""
    if value is None or value == {} or value == []:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def status(run: dict[str, Any]) -> Text:
    """The stored status, except that a ``running`` run whose lock nobody holds (killed) is ``interrupted``."""
    state = "interrupted" if run["status"] == "running" and abandoned(run) else run["status"]
    return Text(state, style=STATUS_STYLES.get(state, ""))


def abandoned(run: dict[str, Any]) -> bool:
    """True when the run's lock file (``harness.runner.run_lock``) exists and no process holds it."""
    lock = Path(run["output_dir"] or "") / ".lock"
    try:
        with open(lock) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held by a live run (BlockingIOError), or no lock file (a run from before locks)
        return False
    return True


def runs_table(store: Store, kind: str | None = None) -> Table:
    """One row per run (of ``kind``, when given), newest last."""
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("run", "kind", "date", "model", "model args", "limit", "tasks", "docs", "status"):
        table.add_column(column, justify="right" if column == "docs" else "left",
                         no_wrap=column not in ("model", "model args", "tasks"), overflow="fold")
    counts = store.document_counts()
    for run in store.runs(kind):
        config = run["config"]
        tasks = list(store.task_results(run["run_id"])) or config.get("tasks")
        cells = (run["run_id"], run["kind"], date(run["created_at"]), run["model"], plain(config.get("model_args")),
                 plain(config.get("limit")), plain(tasks), str(counts.get(run["run_id"], 0)))
        table.add_row(*map(Text, cells), status(run))
    return table


def fields(title: str, rows: Iterable[tuple[str, Any]]) -> Group:
    """A bold title over label / value lines."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(label, value if isinstance(value, Text) else Text(plain(value)))
    return Group(Text(title, style="bold"), grid if grid.row_count else Text("none recorded", style="dim"))


def environment_rows(env: dict[str, Any]) -> list[tuple[str, Any]]:
    """Versions, git sha and hardware: the ones the run recorded."""
    packages, hardware = env.get("packages") or {}, env.get("hardware") or {}
    rows = [(label, packages.get(key)) for key, label in PACKAGES]
    rows += [("git sha", env.get("git_sha")), ("python", env.get("python"))]
    rows += [(label, hardware.get(key)) for key, label in HARDWARE]
    return [(label, value) for label, value in rows if value is not None]


def results_table(results: dict[str, dict[str, Any]]) -> Group:
    """Per task and metric: value, standard error and the number of documents."""
    table = Table()
    for column in ("task", "metric", "value", "± stderr", "n"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, result in results.items():
        for metric, value in result["metrics"].items():
            if metric.endswith("_stderr"):
                continue
            stderr = result["metrics"].get(f"{metric}_stderr")
            table.add_row(Text(task), Text(metric), Text(number(value)),
                          Text("" if stderr is None else number(stderr)), str(result["n"]))
    return Group(Text("results", style="bold"), table)


def number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def open_store(output: Path) -> Store:
    """The store of ``output``: an error, never a new empty store, when there is none."""
    path = default_store_path(output)
    if not path.is_file():
        raise HarnessError(f"no results store at {path}: pass the --output folder of the runs")
    return Store(path, create=False)


MEASURED_KINDS = ("throughput", "serving")  # runs that hold measurements, not task results


def show(run: str = typer.Argument(..., help="A run id or a unique prefix"),
         output: Path = typer.Option(Path("runs"), "--output_path", "--output", help=OUTPUT_HELP)) -> None:
    """Print one run: its settings, model fingerprint, environment and results."""
    store = open_store(output)
    record = store.run(run)
    run_id, config, kind = record["run_id"], record["config"], record["kind"]
    about = [("status", status(record)), ("kind", kind), ("created", date(record["created_at"])),
             ("updated", date(record["updated_at"])), ("model", record["model"]), ("output", record["output_dir"])]
    if kind in MEASURED_KINDS:
        about.append(("measurements", len(store.measurements(run_id))))
    sections = [fields(f"run {run_id}", about),
                fields("settings", [(label, config[key]) for key, label in SETTINGS if key in config]),
                fields("model fingerprint", record["model_fingerprint"].items()),
                fields("environment", environment_rows(record["env"]))]
    results = store.task_results(run_id)
    if results:
        sections.append(results_table(results))
    elif kind not in MEASURED_KINDS:
        sections.append(Text("no task results stored"))
    for index, section in enumerate(sections):
        if index:
            out.print()
        out.print(section)


def run_folder(run: dict[str, Any], output: Path, store: Store) -> Path | None:
    """The run's output folder, when it exists strictly inside ``output`` and does not hold the store."""
    if not run["output_dir"]:
        return None
    folder = Path(run["output_dir"]).resolve()
    inside = output.resolve() in folder.parents and not store.path.resolve().is_relative_to(folder)
    return folder if inside and folder.is_dir() else None


def interactive() -> bool:
    return sys.stdin.isatty()


def rm(runs: list[str] = typer.Argument(..., help="Run ids or unique prefixes"),
       output: Path = typer.Option(Path("runs"), "--output_path", "--output", help=OUTPUT_HELP),
       yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking.")) -> None:
    """Remove runs from the store, with their output folders."""
    store = open_store(output)
    found = {r["run_id"]: r for r in map(store.run, runs)}  # every prefix resolved before anything is removed
    listing = ", ".join(found)
    if not yes:
        if not interactive():
            raise HarnessError(f"not removing {listing} without confirmation: pass --yes")
        typer.confirm(f"remove {listing} from {store.path} with their folders?", abort=True)
    for run_id, run in found.items():
        folder = run_folder(run, output, store)
        if folder is not None:
            try:
                shutil.rmtree(folder)
            except OSError as exc:
                raise HarnessError(f"could not remove {folder} ({exc.strerror or exc}); {run_id} is still "
                                   "stored") from exc
        store.delete_run(run_id)
        removed = f"removed {run_id} from {store.path}" + (f" and {folder}" if folder else "")
        console.print(Text(removed), soft_wrap=True)
        if run["output_dir"] and folder is None and Path(run["output_dir"]).exists():
            console.print(Text(f"kept {run['output_dir']}: not a run folder inside {output}"), soft_wrap=True)
