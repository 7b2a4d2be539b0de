"""`harness` command line: run | ls | validate | adapt | bench | report | compare | leaderboard."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness.console import console, out
from harness.errors import HarnessError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark diffusion language models against autoregressive baselines.")


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


INCLUDE_HELP = "A folder of user YAML (tasks/, suites/, models/); repeatable. Also $HARNESS_INCLUDE_PATH."


def include(paths: list[Path] | None) -> None:
    """Add ``--include-path`` folders to the catalog before anything is looked up."""
    if paths:
        from harness.catalog import add_include_paths

        add_include_paths(list(paths))


def split_names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


@app.command()
def run(
    model: str = typer.Option(..., "--model", help="Model card name, checkpoint directory or hub id."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated task names."),
    suite: Optional[str] = typer.Option(None, "--suite", help="A suite (harness ls suites); adds its tasks."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N documents of each task."),
    batch_size: str = typer.Option("16", "--batch-size", help="Requests per batch, or 'auto'."),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: the card's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Default 1234, or each of the suite's seeds."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Local data folder (or $HARNESS_DATA_DIR)."),
    output: Path = typer.Option(Path("runs"), "--output", help="Folder for the store and per-run files."),
    model_args: Optional[str] = typer.Option(None, "--model-args", help="k=v,... passed to the backend."),
    allow_code_exec: bool = typer.Option(False, "--allow-code-exec", help="Run generated code in the sandbox."),
    include_path: Optional[List[Path]] = typer.Option(None, "--include-path", help=INCLUDE_HELP),
) -> None:
    """Evaluate a model on tasks; resumes a run started with the same command."""
    include(include_path)
    from dataclasses import replace

    from harness.models.factory import parse_model_args
    from harness.plan import RunConfig, plan_run
    from harness.runner import evaluate
    from harness.tasks.data import resolve_data_dir

    names = split_names(tasks)
    config = RunConfig(model=model, tasks=names, suite=suite, seed=seed or 1234, batch_size=batch_size,
                       device=device, dtype=dtype, model_args=parse_model_args(model_args),
                       data_dir=resolve_data_dir(data_dir), output=output, limit=limit,
                       task_options={n: {"allow_code_exec": True} for n in names} if allow_code_exec else {})
    plan = plan_run(config)
    if allow_code_exec:  # the suite's tasks too
        plan = replace(plan, task_options={n: {**plan.task_options.get(n, {}), "allow_code_exec": True}
                                           for n in plan.tasks})
    seeds = run_seeds(plan, seed)
    for number, run_seed in enumerate(seeds, 1):
        if len(seeds) > 1:
            console.print(f"seed {run_seed} ({number} of {len(seeds)})")
        with progress_bar() as progress:
            results = evaluate(replace(plan, seed=run_seed), progress=progress)
        if results:
            reused = sum(results["harness"]["reused_records"].values())
            if reused:
                console.print(f"resumed: {reused} stored documents were not scored again")
            print_results(results)
            console.print(f"run [bold]{results['harness']['run_id']}[/] stored in {results['harness']['store']}")


def run_seeds(plan, seed: int | None) -> list[int]:
    """``--seed``, else the suite's seeds for a diffusion model (AR scoring and greedy decoding
    draw nothing), else 1234."""
    from harness.catalog import catalog

    if seed is not None:
        return [seed]
    suite = catalog().suites.get(plan.suite) if plan.suite else None
    return list(suite.seeds) if suite and suite.seeds and plan.family != "ar" else [plan.seed]


def print_results(results: dict) -> None:
    table = Table(title=f"{results['config']['model']}  (seed {results['config']['random_seed']}, "
                        f"{results['config']['dtype']}, batch {results['config']['batch_size']})")
    for column in ("task", "metric", "value", "± stderr", "n"):
        table.add_column(column, justify="right" if column in ("value", "± stderr", "n") else "left")
    for task, metrics in results["results"].items():
        n = results["n-samples"][task]["effective"]
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key:
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(f"{metric}_stderr,none")
            table.add_row(task, metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}", str(n))
    out.print(table)


@app.command("ls")
def list_things(what: str = typer.Argument(..., help="tasks | models | suites | runs"),
                output: Path = typer.Option(Path("runs"), "--output"),
                include_path: Optional[List[Path]] = typer.Option(None, "--include-path", help=INCLUDE_HELP)) -> None:
    """List registered tasks, models, suites, or the runs in a store."""
    include(include_path)
    from harness.catalog import catalog

    c = catalog()
    table = Table()
    if what in ("tasks", "models", "suites"):
        registry = {"tasks": c.tasks, "models": c.models, "suites": c.suites}[what]
        table.add_column("name")
        table.add_column("description")
        for name in registry:
            table.add_row(name, registry.get(name).description)
    elif what == "runs":
        from harness.store import Store, default_store_path

        store = Store(default_store_path(output))
        for column in ("run", "kind", "model", "status", "tasks"):
            table.add_column(column)
        for r in store.runs():
            table.add_row(r["run_id"], r["kind"], r["model"], r["status"], ",".join(store.task_results(r["run_id"])))
    else:
        raise HarnessError(f"cannot list '{what}': choose tasks, models, suites or runs")
    out.print(table)


@app.command()
def validate(
    against: str = typer.Option("lm-eval", "--against"),
    model: str = typer.Option(..., "--model"),
    tasks: str = typer.Option(..., "--tasks"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    batch_size: int = typer.Option(16, "--batch-size"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    tolerance: float = typer.Option(1e-3, "--tolerance", help="Largest allowed |delta log-likelihood|."),
    include_path: Optional[List[Path]] = typer.Option(None, "--include-path", help=INCLUDE_HELP),
) -> None:
    """Score the same examples with lm-eval's HF backend and compare per-example log-likelihoods."""
    include(include_path)
    from harness.tasks.data import resolve_data_dir
    from harness.validate import validate_against_lm_eval

    if against != "lm-eval":
        raise HarnessError(f"can only validate against lm-eval, not '{against}'")
    ok = validate_against_lm_eval(model, split_names(tasks), limit=limit, batch_size=batch_size,
                                  data_dir=resolve_data_dir(data_dir), tolerance=tolerance, console=out)
    if not ok:
        raise typer.Exit(1)


@app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_cli(ctx: typer.Context) -> None:
    """lm-eval's own command line with the harness's models registered as `--model harness`."""
    try:
        from harness.models.lm_eval_bridge import run_lm_eval_cli
    except ImportError as exc:
        raise HarnessError("this command needs lm-eval: pip install 'dlm-harness[eval]'") from exc
    run_lm_eval_cli(list(ctx.args))


def register_optional_commands() -> None:
    """Commands whose modules pull heavier imports are registered lazily by module path."""
    from harness.registry import import_string

    for name, target in (("adapt", "harness.train.command:adapt"), ("report", "harness.report.commands:report"),
                         ("leaderboard", "harness.report.commands:leaderboard"),
                         ("compare", "harness.report.commands:compare"),
                         ("bench", "harness.perf.command:bench")):
        try:
            app.command(name)(import_string(target))
        except ImportError:
            continue


def main() -> None:
    register_optional_commands()
    try:
        app()
    except HarnessError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: everything scored so far is stored; run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
