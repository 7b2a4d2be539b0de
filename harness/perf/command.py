"""``harness bench``: throughput, latency and speed-quality runs over models x variants x settings.

    harness bench --suite throughput-quick
    harness bench --model smollm2-135m --model untrained-dlm:smollm2-135m --gen-length 64,256 --steps 16,64
    harness bench --endpoint http://127.0.0.1:8000/v1 --suite serving-quick   # a served model

With ``--endpoint`` the command times a served model instead (``harness.perf.serving_command``).

Models: a card name, a checkpoint directory, a hub id, or ``untrained-dlm:BASE``
(``harness.perf.untrained``). Each model is measured by ``harness.perf.sweep``, and a speed-quality
suite scores its task through ``harness.perf.quality``. The sweep and variants come from ``DEFAULTS``, then the
suite's ``options``, then the command-line options (``--model`` replaces ``models``); the
suite's ``model_args`` by family go to the backends (a DLM's ``block_length``, say). On a
shared CPU ``threads: 1`` (``--threads 1``) avoids oversubscribed OpenMP threads; the count is in
every record's hardware fingerprint.

One run per model and machine: the run id ``bench-<model>-<hardware tag>-<hash>`` hashes the
model's fingerprint, the sweep, the seed and the hardware fingerprint, so records from different
machines land side by side in one store and never share a run; the same command resumes its run
and skips the settings already measured. Every record carries the hardware fingerprint and the
probe's limits (``throughput`` documents the fields). With ``options.quality`` (a speed-quality
suite) each record also gets ``quality: {task, metric, value, stderr, n, run_id}``: the task
scored through ``harness.runner.evaluate`` by the same backend in the same setting (sampler and
steps), stored as an eval run of its own. The task's own generation length applies; set its
``task_options`` so it equals ``gen_length`` for a like-for-like pair.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from harness.errors import HarnessError

DEFAULTS: dict[str, Any] = {
    "models": [], "ar_modes": ["kv_cache", "no_cache"], "samplers": ["llada", "diffugpt", "threshold"], "caches": ["none"],
    "gen_length": [64], "steps": [16, 64], "batch_size": [1], "prompt_length": [64], "grid": "axes",
    "repeats": 3, "warmup": 1, "threads": None, "quality": None,
}


def bench(
    suite: Optional[str] = typer.Option(None, "--suite", help="A throughput suite (harness ls suites)."),
    model: Optional[List[str]] = typer.Option(None, "--model", help="Card, directory, hub id or "
                                              "untrained-dlm:BASE; repeat for several."),
    output: Path = typer.Option(Path("runs"), "--output", help="Folder for the store and per-run files."),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: the card's)."),
    seed: int = typer.Option(1234, "--seed"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Prompt text and quality data (or "
                                            "$HARNESS_DATA_DIR); without it prompts repeat a built-in sentence."),
    gen_length: Optional[str] = typer.Option(None, "--gen-length", help="Comma-separated generation lengths."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Comma-separated diffusion steps."),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", help="Comma-separated batch sizes."),
    prompt_length: Optional[str] = typer.Option(None, "--prompt-length", help="Comma-separated prompt lengths."),
    samplers: Optional[str] = typer.Option(None, "--samplers", help="llada,diffugpt,threshold,entropy_bounded"),
    caches: Optional[str] = typer.Option(None, "--caches", help="DLM key/value caches: none,prefix,dual"),
    ar_modes: Optional[str] = typer.Option(None, "--ar-modes", help="kv_cache,no_cache,vllm"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed requests per setting."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Untimed requests per setting."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: the suite's, else "
                                          "torch's); recorded in the hardware fingerprint."),
    include_path: Optional[List[Path]] = typer.Option(None, "--include-path", help="A folder of user YAML; repeatable."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Time a served model instead: an "
                                           "OpenAI-compatible API root, http://HOST:PORT/v1 (a serving suite)."),
    request_rates: Optional[str] = typer.Option(None, "--request-rates", help="Serving: comma-separated Poisson "
                                                "request rates per second (inf: all at once)."),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", help="Serving: comma-separated caps on "
                                              "requests in flight."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Serving: requests per setting."),
    api: Optional[str] = typer.Option(None, "--api", help="Serving: completions | chat."),
    stream_unit: Optional[str] = typer.Option(None, "--stream-unit", help="Serving: what one streamed chunk is: "
                                              "token | block | canvas (a DLM endpoint)."),
    endpoint_args: Optional[str] = typer.Option(None, "--endpoint-args", help="Serving: k=v,... of the endpoint "
                                                "(model, server_hardware e.g. 8xH20, api_key_env, timeout, max_retries)."),
) -> None:
    """Measure throughput, latency, memory and MFU over a sweep (a throughput suite or --model), or
    time a served model over request rates and concurrency (--endpoint with a serving suite)."""
    from harness.catalog import add_include_paths

    add_include_paths(include_path or [])
    if endpoint:
        from harness.models.factory import parse_model_args
        from harness.perf.serving_command import bench_serving_command

        if model:
            raise HarnessError("give --model (a local model) or --endpoint (a served one), not both")
        overrides = {"request_rates": _rates(request_rates), "concurrency": _ints(concurrency),
                     "num_prompts": num_prompts, "api": api, "stream_unit": stream_unit, "warmup": warmup}
        bench_serving_command(endpoint, suite, {k: v for k, v in overrides.items() if v is not None},
                              parse_model_args(endpoint_args), output=output, seed=seed, data_dir=data_dir)
        return
    overrides = {"gen_length": _ints(gen_length), "steps": _ints(steps), "batch_size": _ints(batch_size),
                 "prompt_length": _ints(prompt_length), "samplers": _names(samplers), "caches": _names(caches), "ar_modes": _names(ar_modes),
                 "repeats": repeats, "warmup": warmup, "threads": threads, "models": list(model) if model else None}
    bench_local(suite, {k: v for k, v in overrides.items() if v is not None}, output=output, device=device,
                dtype=dtype, seed=seed, data_dir=data_dir)


def bench_local(suite: str | None, overrides: dict[str, Any], *, output: Path, device: str, dtype: str | None,
                seed: int, data_dir: Path | None) -> None:
    """Every model of the sweep, measured and printed."""
    from harness.console import console, out
    from harness.perf.quality import check_quality
    from harness.perf.sweep import bench_model
    from harness.plan import check_output_dir
    from harness.store import default_store_path
    from harness.tasks.data import resolve_data_dir

    options = bench_options(suite, overrides)
    if not options["models"]:
        raise HarnessError("nothing to measure: give --model or a --suite that lists models")
    check_output_dir(output)
    data = resolve_data_dir(data_dir)
    check_quality(options["quality"], data)
    if options["threads"]:
        import torch

        torch.set_num_threads(options["threads"])
    for name in options["models"]:
        run_id, records = bench_model(name, options, suite=suite, output=output, device=device, dtype=dtype,
                                      seed=seed, data_dir=data, log=console.print)
        out.print(results_table(run_id, records))
        console.print(f"run [bold]{run_id}[/] stored in {default_store_path(output)}")


def _ints(text: str | None) -> list[int] | None:
    try:
        return [int(v) for v in text.split(",") if v.strip()] if text else None
    except ValueError:
        raise HarnessError(f"expected comma-separated integers, got '{text}'") from None


def _rates(text: str | None) -> list[float | str] | None:
    """Comma-separated request rates: numbers, or inf."""
    from harness.models.factory import convert

    return [convert(v) for v in _names(text)] if text else None


def _names(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def bench_options(suite: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """``DEFAULTS``, then the suite's options (its ``limit`` is the quality limit), then ``overrides``."""
    from harness.catalog import catalog

    options = dict(DEFAULTS)
    if suite:
        spec = catalog().suites.get(suite)
        if spec.kind == "serving":
            raise HarnessError(f"suite '{suite}' is a serving suite: give the served model with --endpoint URL")
        if spec.kind != "throughput":
            raise HarnessError(f"suite '{suite}' is not a throughput suite (kind: {spec.kind}); "
                               f"`harness run --suite {suite}` runs it")
        unknown = sorted(set(spec.options) - set(DEFAULTS))
        if unknown:
            raise HarnessError(f"{spec.path}: unknown option(s) {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
        options.update(spec.options)
        if options["quality"] and spec.limit:
            options["quality"] = {"limit": spec.limit, **options["quality"]}
    options.update(overrides)
    return options


def results_table(run_id: str, records: list[dict[str, Any]]) -> Table:
    """One row a record; the setting reads g<gen length> s<steps> b<batch> p<prompt length>."""
    from rich import box

    from harness.perf.throughput import Setting

    table = Table(title=run_id, box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ["variant", "setting", "tok/s", "p50 s", "p95 s", "1st s", "NFE", "TPF", "MiB", "MFU", "BW"]
    with_quality = any(r.get("quality") for r in records)
    for column in columns + ["quality"] * with_quality:
        table.add_column(column, justify="left" if column in ("variant", "setting") else "right", no_wrap=True)
    for r in records:
        numbers = (r["tokens_per_s"], r["latency_s"]["p50"], r["latency_s"]["p95"], r["first_token_s"]["p50"],
                   r["nfe"], r.get("tpf", float("nan")), r["peak_memory_bytes"] / 2**20, r["mfu"], r["bandwidth_fraction"])
        row = [r["variant"], Setting(**r["setting"]).label(),
               *(format(x, spec) for x, spec in zip(numbers, (".1f", ".3f", ".3f", ".3f", "g", ".2f", ".0f", ".3f",
                                                              ".3f")))]
        if with_quality:
            row.append(f"{r['quality']['value']:.3f}" if r.get("quality") else "")
        table.add_row(*row)
    return table
