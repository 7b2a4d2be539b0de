"""``harness bench --endpoint URL``: the serving benchmark of an OpenAI-compatible endpoint.

    harness bench --endpoint http://127.0.0.1:8000/v1 --suite serving-quick
    harness bench --endpoint http://gpu-box:8000/v1 --concurrency 1,8,32 --request-rates 2,8 --endpoint-args server_hardware=8xH20

The options come from ``harness.perf.serving_run.DEFAULTS``, then the serving suite's ``options``,
then the command line. The server is asked what it is (``harness.serving.server_info``); records
carry that, the server's hardware (reported, else ``server_hardware`` of ``--endpoint-args``, else unknown) and the
client machine's fingerprint. With ``options.quality`` ({task, limit, metric}) the endpoint is also
scored on that task (an eval run of ``openai:URL``) and the score goes into every record, for the
report's speed-quality view.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError


def serving_suite_options(suite: str | None) -> dict[str, Any]:
    """A serving suite's options (its ``limit`` is the quality task's limit)."""
    if not suite:
        return {}
    from harness.catalog import catalog

    spec = catalog().suites.get(suite)
    if spec.kind != "serving":
        raise HarnessError(f"suite '{suite}' is not a serving suite (kind: {spec.kind}); --endpoint takes one of "
                           f"{', '.join(n for n in catalog().suites if catalog().suites.get(n).kind == 'serving')}")
    options = dict(spec.options)
    if options.get("quality") and spec.limit:
        options["quality"] = {"limit": spec.limit, **options["quality"]}
    return options


def bench_serving(url: str, suite: str | None, overrides: dict[str, Any], *, model_args: dict[str, Any],
                  output: Path, seed: int, data_dir: Path | None,
                  log: Callable[[str], Any]) -> tuple[str, list[dict[str, Any]]]:
    """Probe the endpoint, score the quality task if asked, and measure every setting."""
    from harness.env import environment
    from harness.models.settings import settings_for
    from harness.perf.quality import check_quality
    from harness.perf.serving_run import bench_endpoint, serving_options
    from harness.serving.server_info import connect

    options = serving_options({**serving_suite_options(suite), **overrides})
    check_quality(options["quality"], data_dir)
    settings = settings_for("endpoint", {**model_args, "base_url": url})
    endpoint, server = connect(settings)
    log(f"{server['model']} served by {server['engine']} {server['version'] or ''} at {settings.base_url}")
    quality = served_quality(url, model_args, options["quality"], seed=seed, data_dir=data_dir,
                             output=output) if options["quality"] else None
    return bench_endpoint(endpoint, options, model=server["model"], server=server, hardware=server["hardware"],
                          env=environment(), output=output, seed=seed, data_dir=data_dir, suite=suite,
                          quality=quality, log=log)


def served_quality(url: str, model_args: dict[str, Any], spec: dict[str, Any], *, seed: int, data_dir: Path | None,
                   output: Path) -> dict[str, Any]:
    """The endpoint's score on the quality task: an eval run of ``openai:URL`` (resumed when stored)."""
    from harness.perf.quality import task_quality
    from harness.plan import RunConfig

    return task_quality(RunConfig(model=f"openai:{url}", tasks=[spec["task"]], seed=seed, data_dir=data_dir,
                                  output=output, model_args=model_args), spec)


def bench_serving_command(url: str, suite: str | None, overrides: dict[str, Any], model_args: dict[str, Any], *,
                          output: Path, seed: int, data_dir: Path | None) -> None:
    """The command: measure, then print the table and where the run is stored."""
    from rich.console import Console

    from harness.console import console, out
    from harness.plan import check_output_dir
    from harness.store import default_store_path
    from harness.tasks.data import resolve_data_dir

    check_output_dir(output)
    run_id, records = bench_serving(url, suite, overrides, model_args=model_args, output=output, seed=seed,
                                    data_dir=resolve_data_dir(data_dir), log=console.print)
    if not records:
        raise HarnessError(f"nothing measured for {run_id}: every request failed (the errors are above); "
                           f"run the same command again once the server answers")
    wide = out if out.is_terminal else Console(width=140)  # a file or a pipe gets every column whole
    wide.print(serving_table(run_id, records))
    console.print(f"run [bold]{run_id}[/] stored in {default_store_path(output)}")


def serving_table(run_id: str, records: list[dict[str, Any]]):
    """One row a setting: completed/failed, requests/s, output tokens/s, then TTFT, TPOT, ITL and
    end-to-end latency in milliseconds."""
    from rich import box
    from rich.table import Table

    unit = records[0].get("stream_unit", "token") if records else "token"
    table = Table(title=f"{run_id} (latencies in ms; ITL per streamed {unit})", box=box.SIMPLE_HEAD, pad_edge=False)
    columns = (("ok/fail", None, None), ("req/s", None, None), ("tok/s", None, None), ("TTFT50", "first_token_s", "p50"),
               ("TTFT99", "first_token_s", "p99"), ("TPOT50", "tpot_s", "p50"), ("ITL99", "itl_s", "p99"),
               ("e2e50", "latency_s", "p50"), ("e2e99", "latency_s", "p99"))
    table.add_column("setting", no_wrap=True)
    for name, _, _ in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for r in records:
        def ms(key: str, q: str) -> str:
            value = (r.get(key) or {}).get(q)
            return "—" if value is None else f"{value * 1000:.0f}"
        table.add_row(r["variant"], f"{r['completed']}/{r['failed']}", f"{r['request_throughput']:.2f}",
                      f"{r['tokens_per_s']:.1f}", *(ms(key, q) for _, key, q in columns[3:]))
    return table
