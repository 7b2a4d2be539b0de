"""`harness` command line: run | ls | show | rm | validate | adapt | bench | serve | report | compare | leaderboard."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from harness.console import console, out
from harness.errors import HarnessError
from harness.run_listing import rm, show

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


CHAT_FLAGS = ("--apply_chat_template", "--apply-chat-template")


def optional_values(argv: list[str]) -> list[str]:
    """lm-eval's ``--apply_chat_template`` takes an optional template name: without one (last, or
    before another option) ``harness run`` reads the tokenizer's ``default`` template."""
    if argv[:1] != ["run"]:
        return argv
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in CHAT_FLAGS and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("default")
    return out


def split_names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


@app.command()
def run(
    model: str = typer.Option(..., "--model", help="Model card name, checkpoint directory, hub id, or "
                              "openai:URL (a served model)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated task and suite names."),
    suite: Optional[str] = typer.Option(None, "--suite", help="A suite (harness ls suites); adds its tasks."),
    limit: Optional[str] = typer.Option(None, "--limit", help="Documents per task: a count, or a fraction below 1."),
    batch_size: str = typer.Option("16", "--batch_size", "--batch-size", help="Requests per batch, or 'auto'."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | cuda:N | mps (default: cuda when present)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: the card's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Default 1234, or each of the suite's seeds."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", "--data_dir", help="Local data folder (or $HARNESS_DATA_DIR)."),
    output: Path = typer.Option(Path("runs"), "--output_path", "--output", help="Folder for the store and per-run files."),
    model_args: Optional[str] = typer.Option(None, "--model_args", "--model-args", help="k=v,... passed to the backend."),
    num_fewshot: Optional[int] = typer.Option(None, "--num_fewshot", "--num-fewshot", help="Few-shot examples for every task."),
    gen_kwargs: Optional[str] = typer.Option(None, "--gen_kwargs", "--gen-kwargs",
                                             help="k=v,... for generation tasks: max_gen_toks, until, do_sample, temperature, top_p."),
    apply_chat_template: Optional[str] = typer.Option(None, *CHAT_FLAGS, metavar="[NAME]",
                                                      help="Lay prompts out with the tokenizer's chat template (or the named one)."),
    system_instruction: Optional[str] = typer.Option(None, "--system_instruction", "--system-instruction"),
    fewshot_as_multiturn: bool = typer.Option(False, "--fewshot_as_multiturn", "--fewshot-as-multiturn",
                                              help="Few-shot examples as separate chat turns."),
    task_options: Optional[List[str]] = typer.Option(None, "--task_options", "--task-options",
                                                     help="task.key=value,...; repeatable."),
    no_cache: bool = typer.Option(False, "--no-cache", "--no_cache", help="Score again what other runs stored."),
    log_samples: bool = typer.Option(True, "--log_samples", "--log-samples", help="Samples are always written (lm-eval's flag, accepted)."),
    allow_code_exec: bool = typer.Option(False, "--allow-code-exec", help="Run generated code in the sandbox."),
    include_path: Optional[List[Path]] = typer.Option(None, "--include_path", "--include-path", help=INCLUDE_HELP),
) -> None:
    """Evaluate a model on tasks; resumes a run started with the same command."""
    include(include_path)
    from harness.models.factory import parse_model_args
    from harness.plan import RunConfig
    from harness.tasks.data import resolve_data_dir

    names = split_names(tasks)
    options = parse_task_options(task_options)
    if allow_code_exec:
        options = {n: {**options.get(n, {}), "allow_code_exec": True} for n in {*names, *options}}
    config = RunConfig(model=model, tasks=names, suite=suite, seed=seed or 1234, batch_size=batch_size,
                       device=device, dtype=dtype, model_args=parse_model_args(model_args),
                       data_dir=resolve_data_dir(data_dir), output=output, limit=parse_limit(limit),
                       task_options=options, num_fewshot=num_fewshot, gen_kwargs=parse_gen_kwargs(gen_kwargs),
                       chat_template=apply_chat_template, system_instruction=system_instruction,
                       fewshot_as_multiturn=fewshot_as_multiturn, use_cache=not no_cache)
    run_config(config, seed, allow_code_exec)


def run_config(config, seed: int | None, allow_code_exec: bool) -> None:
    """Plan ``config`` and run it once per seed, printing each run's results."""
    from dataclasses import replace

    from harness.plan import plan_run
    from harness.runner import evaluate

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
            resumed = sum(results["harness"]["reused_records"].values())
            cached = sum(results["harness"]["cached_records"].values())
            if resumed:
                console.print(f"resumed: {resumed} stored documents were not scored again")
            if cached:
                console.print(f"cached: {cached} documents scored by other runs were reused (--no-cache scores them again)")
            print_results(results)
            console.print(f"run [bold]{results['harness']['run_id']}[/] stored in {results['harness']['store']}")


def parse_limit(text: str | None) -> int | float | None:
    """``--limit``: an integer count or a fraction (lm-eval's convention)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise HarnessError(f"--limit must be a positive integer or a fraction below 1, got '{text}'") from None
    return int(value) if value.is_integer() else value


def parse_gen_kwargs(text: str | None) -> dict:
    """``--gen_kwargs k=v,...`` (lm-eval's syntax); ``until`` may list several stops separated by ``|``."""
    from harness.models.factory import parse_model_args

    kwargs = parse_model_args(text)
    if isinstance(kwargs.get("until"), str):
        kwargs["until"] = kwargs["until"].encode().decode("unicode_escape").split("|")
    return kwargs


def parse_task_options(items: list[str] | None) -> dict[str, dict]:
    """``--task_options task.key=value,...`` into {task: {key: value}}."""
    from harness.models.factory import convert

    options: dict[str, dict] = {}
    for part in (p.strip() for item in items or [] for p in item.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        task, dot, key = name.strip().partition(".")
        if not sep or not dot or not task or not key:
            raise HarnessError(f"--task_options expects task.key=value, got '{part}'")
        options.setdefault(task, {})[key] = convert(value.strip())
    return options


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
                output: Path = typer.Option(Path("runs"), "--output_path", "--output"),
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
        from harness.run_listing import open_store, runs_table

        table = runs_table(open_store(output))
    else:
        raise HarnessError(f"cannot list '{what}': choose tasks, models, suites or runs")
    out.print(table)


app.command()(show)
app.command()(rm)


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
    """lm-eval's own command line with the harness's models as `--model harness` and, when a data folder
    is known (--data-dir, else $HARNESS_DATA_DIR), lm-eval's own tasks on its local files."""
    import os

    try:
        from harness.models.lm_eval_bridge import run_lm_eval_cli
    except ImportError as exc:
        raise HarnessError("this command needs lm-eval: pip install 'dlm-harness[eval]'") from exc
    from harness.lm_eval_tasks import lm_eval_argv

    run_lm_eval_cli(lm_eval_argv(list(ctx.args), os.environ.get("HARNESS_DATA_DIR")))


def register_optional_commands() -> None:
    """Commands whose modules pull heavier imports are registered lazily by module path."""
    from harness.registry import import_string

    for name, target in (("adapt", "harness.train.command:adapt"), ("report", "harness.report.commands:report"),
                         ("leaderboard", "harness.report.commands:leaderboard"),
                         ("compare", "harness.report.commands:compare"),
                         ("bench", "harness.perf.command:bench"),
                         ("serve", "harness.serving.serve_command:serve"),
                         ("lm-eval-tasks", "harness.lm_eval_tasks:lm_eval_tasks"),
                         ("import-lm-eval", "harness.lm_eval_import:import_lm_eval")):
        try:
            app.command(name)(import_string(target))
        except ImportError:
            continue


def main() -> None:
    register_optional_commands()
    try:
        app(args=optional_values(sys.argv[1:]))
    except HarnessError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        message = str(exc) or "interrupted: everything scored so far is stored; run the same command to resume"
        console.print(f"[yellow]{escape(message)}[/]", highlight=False, soft_wrap=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
