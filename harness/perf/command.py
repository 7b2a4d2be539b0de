"""``harness bench``: throughput, latency and speed-quality runs over models x variants x settings.

    harness bench --suite throughput-quick
    harness bench --model smollm2-135m --model untrained-dlm:smollm2-135m --gen-length 64,256 --steps 16,64

Models: a card name, a checkpoint directory, a hub id, or ``untrained-dlm:BASE``: the AR model
BASE with a mask token added and run with full attention as a shifted DLM, with no training (for
timing only; its records say ``untrained: true``), built once and cached under
``harness.models.loading.cache_dir()``. The sweep and variants come from ``DEFAULTS``, then the
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

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.table import Table

from harness.errors import HarnessError

UNTRAINED = "untrained-dlm:"
DEFAULTS: dict[str, Any] = {
    "models": [], "ar_modes": ["kv_cache", "no_cache"], "samplers": ["llada", "diffugpt", "threshold"],
    "gen_length": [64], "steps": [16, 64], "batch_size": [1], "prompt_length": [64], "grid": "axes",
    "repeats": 3, "warmup": 1, "threads": None, "quality": None,
}
QUALITY_KEYS = ("task", "limit", "metric", "task_options")


def bench(
    suite: Optional[str] = typer.Option(None, "--suite", help="A throughput suite from suites/."),
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
    samplers: Optional[str] = typer.Option(None, "--samplers", help="llada,diffugpt,threshold"),
    ar_modes: Optional[str] = typer.Option(None, "--ar-modes", help="kv_cache,no_cache,vllm"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed requests per setting."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Untimed requests per setting."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: the suite's, else "
                                          "torch's); recorded in the hardware fingerprint."),
) -> None:
    """Measure throughput, latency, memory and MFU over a sweep (a throughput suite or --model)."""
    from harness.catalog import catalog
    from harness.cli import console, out
    from harness.runner import check_output_dir
    from harness.store import default_store_path
    from harness.tasks.data import resolve_data_dir

    overrides = {"gen_length": _ints(gen_length), "steps": _ints(steps), "batch_size": _ints(batch_size),
                 "prompt_length": _ints(prompt_length), "samplers": _names(samplers), "ar_modes": _names(ar_modes),
                 "repeats": repeats, "warmup": warmup, "threads": threads, "models": list(model) if model else None}
    options = bench_options(suite, {k: v for k, v in overrides.items() if v is not None})
    family_args = catalog().suites.get(suite).model_args if suite else {}
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
                                      seed=seed, data_dir=data, family_args=family_args, log=console.print)
        out.print(results_table(run_id, records))
        console.print(f"run [bold]{run_id}[/] stored in {default_store_path(output)}")


def _ints(text: str | None) -> list[int] | None:
    try:
        return [int(v) for v in text.split(",") if v.strip()] if text else None
    except ValueError:
        raise HarnessError(f"expected comma-separated integers, got '{text}'") from None


def _names(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def bench_options(suite: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """``DEFAULTS``, then the suite's options (its ``limit`` is the quality limit), then ``overrides``."""
    from harness.catalog import catalog

    options = dict(DEFAULTS)
    if suite:
        spec = catalog().suites.get(suite)
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


def check_quality(quality: dict[str, Any] | None, data_dir: Path | None) -> None:
    """Fail on a bad quality spec or missing task data before any model is loaded."""
    if not quality:
        return
    from harness.catalog import catalog

    unknown = sorted(set(quality) - set(QUALITY_KEYS))
    if unknown or "task" not in quality:
        raise HarnessError(f"quality needs a task and takes {', '.join(QUALITY_KEYS)}; got {sorted(quality)}")
    task = catalog().task(quality["task"], data_dir, quality.get("task_options"))
    task.docs()
    if quality.get("metric", next(iter(task.metrics))) not in task.metrics:
        raise HarnessError(f"task '{task.name}' has no metric '{quality['metric']}' (has: {', '.join(task.metrics)})")


def untrained_dlm(base: str) -> Path:
    """A harness-format DLM directory: ``base``'s weights plus a mask token, untrained; built once."""
    from harness.models.factory import resolve_card
    from harness.models.loading import cache_dir, load_causal_lm, resolve_weights
    from harness.runner import slug
    from harness.hashing import stable_hash
    from harness.train.recipe import add_mask_token

    card = resolve_card(base)
    if card.backend != "hf_ar":
        raise HarnessError(f"untrained-dlm needs an AR base model; '{base}' is a {card.backend} model")
    weights = resolve_weights(card.weights)
    target = cache_dir() / "untrained-dlm" / f"{slug(card.name)}-{stable_hash(weights)[:8]}"
    if (target / "diffusion_config.json").exists():
        return target
    model, tokenizer = load_causal_lm(weights)
    mask_id = add_mask_token(model, tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "diffusion_config.json").write_text(json.dumps(
            {"format": "dlm-harness", "version": 1, "kind": "shifted", "mask_token_id": mask_id, "base_model": base,
             "untrained": True}, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "diffusion_config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def hardware_fingerprint(env: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``env`` is ``harness.env.environment()``."""
    return {**env["hardware"], "torch": env["packages"]["torch"], "transformers": env["packages"]["transformers"],
            "dtype": dtype}


def hardware_tag(hardware: dict[str, Any]) -> str:
    """A short readable tag: the GPU's name, or the CPU's and its core count."""
    if hardware.get("gpu"):
        return re.sub(r"[^a-z0-9]+", "", hardware["gpu"].lower().replace("nvidia", ""))[:16]
    return re.sub(r"[^a-z0-9]+", "", hardware["cpu"].lower())[:16] + f"-{hardware['cpu_cores']}c"


def is_untrained(target: str) -> bool:
    """True for a harness DLM directory whose diffusion_config.json says ``untrained``."""
    config = Path(target) / "diffusion_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("untrained"))


def build_variants(lm, options: dict[str, Any], *, device: str, seed: int, log: Callable[[str], Any]) -> list:
    from harness.perf.throughput import dlm_variants, hf_variants

    if lm.is_diffusion:
        return dlm_variants(lm, options["samplers"])
    variants = hf_variants(lm, [m for m in options["ar_modes"] if m != "vllm"])
    if "vllm" in options["ar_modes"]:
        from harness.perf.vllm_ar import unavailable, vllm_variant

        reason = unavailable(device)
        if reason:
            log(f"skipping vllm for {lm.name}: {reason}")
        else:
            variants.append(vllm_variant(lm.weights, device=device, dtype=lm.dtype, seed=seed))
    return variants


def bench_model(name: str, options: dict[str, Any], *, suite: str | None, output: Path, device: str,
                dtype: str | None, seed: int, data_dir: Path | None, family_args: dict[str, dict] | None = None,
                log: Callable[[str], Any] = print) -> tuple[str, list[dict[str, Any]]]:
    """Measure one model over the sweep into its run; returns (run id, all its records).
    ``family_args``: backend arguments by family (``{"ar": {...}, "diffusion": {...}}``, a suite's model_args)."""
    from dataclasses import asdict

    from harness.env import environment
    from harness.models.factory import build_model, resolve_card
    from harness.perf.probe import probe
    from harness.perf.throughput import measure, prompt_text, sweep, synthetic_prompts
    from harness.runner import slug
    from harness.store import Store, default_store_path, write_jsonl_atomic
    from harness.hashing import stable_hash

    target = str(untrained_dlm(name[len(UNTRAINED):])) if name.startswith(UNTRAINED) else name
    untrained = is_untrained(target)
    settings = sweep(options)
    model_args = (family_args or {}).get("ar" if resolve_card(target).backend == "hf_ar" else "diffusion", {})
    lm = build_model(target, device=device, dtype=dtype, batch_size=max(s.batch_size for s in settings),
                     model_args=model_args)
    lm.seed = seed
    fingerprint = {k: v for k, v in lm.fingerprint.items() if k != "batch_size"}
    variants = build_variants(lm, options, device=device, seed=seed, log=log)
    env = environment()
    hardware = hardware_fingerprint(env, lm.dtype)
    limits = probe(device, lm.dtype)
    sweep_options = {k: v for k, v in options.items() if k != "models"}
    identity = {"model": name, "fingerprint": fingerprint, "model_args": model_args, "options": sweep_options,
                "seed": seed, "hardware": hardware}
    run_id = f"bench-{slug(name)}-{hardware_tag(hardware)}-{stable_hash(identity)[:10]}"
    store = Store(default_store_path(output))
    store.start_run(run_id, model=name, config={"suite": suite, "device": device, "untrained": untrained, **identity},
                    fingerprint=lm.fingerprint, env={**env, "probe": limits}, output_dir=str(output / run_id),
                    kind="throughput")
    done = {m["key"] for m in store.measurements(run_id)}
    text, source = prompt_text(data_dir)
    ids = lm.encode(text)
    max_length = getattr(lm, "max_length", None) or lm.denoiser.max_length
    quality_memo: dict[str, dict[str, Any]] = {}
    for variant in variants:
        for setting in filter(None, (variant.adapt(s) for s in settings)):
            key = stable_hash([variant.name, asdict(setting)])
            if key in done:
                continue
            if setting.prompt_length + setting.gen_length > max_length:
                log(f"skipping {variant.name} {setting.label()}: longer than the model's {max_length} tokens")
                continue
            log(f"{name} {variant.name} {setting.label()}")
            prompts = synthetic_prompts(ids, setting.prompt_length, setting.batch_size, seed)
            record = measure(variant, setting, prompts, device=device, repeats=options["repeats"],
                             warmup=options["warmup"], limits=limits)
            record.update(key=key, model=name, untrained=untrained, prompt_source=source, seed=seed,
                          hardware=hardware, probe=limits)
            if options["quality"]:
                record["quality"] = quality(lm, variant, setting, options["quality"], name=name, seed=seed,
                                            device=device, data_dir=data_dir, output=output, memo=quality_memo)
            store.add_measurement(run_id, record)
            done.add(key)
    store.finish_run(run_id)
    records = store.measurements(run_id)
    (output / run_id).mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(output / run_id / "measurements.jsonl", records)
    return run_id, records


def quality(lm, variant, setting, spec: dict[str, Any], *, name: str, seed: int, device: str,
            data_dir: Path | None, output: Path, memo: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The quality task's score for ``variant`` at ``setting`` (one eval run per backend setting)."""
    from harness.catalog import catalog
    from harness.runner import RunConfig, evaluate
    from harness.hashing import stable_hash

    variant.configure(setting)
    key = stable_hash(variant.describe(setting) | {"use_cache": None})  # the cache changes speed, not text
    if key not in memo:
        task = spec["task"]
        config = RunConfig(model=name, tasks=[task], limit=spec.get("limit"), seed=seed, device=device,
                           dtype=lm.dtype, data_dir=data_dir, output=output,
                           task_options={task: spec["task_options"]} if spec.get("task_options") else {})
        results = evaluate(config, model=lm)
        metric = spec.get("metric") or next(iter(catalog().task(task, data_dir).metrics))
        scores = results["results"][task]
        memo[key] = {"task": task, "metric": metric, "value": scores[f"{metric},none"],
                     "stderr": scores.get(f"{metric}_stderr,none"), "n": results["n-samples"][task]["effective"],
                     "run_id": results["harness"]["run_id"]}
    return memo[key]


def results_table(run_id: str, records: list[dict[str, Any]]) -> Table:
    """One row a record; the setting reads g<gen length> s<steps> b<batch> p<prompt length>."""
    from rich import box

    from harness.perf.throughput import Setting

    table = Table(title=run_id, box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ["variant", "setting", "tok/s", "p50 s", "p95 s", "1st s", "NFE", "MiB", "MFU", "BW"]
    with_quality = any(r.get("quality") for r in records)
    for column in columns + ["quality"] * with_quality:
        table.add_column(column, justify="left" if column in ("variant", "setting") else "right", no_wrap=True)
    for r in records:
        numbers = (r["tokens_per_s"], r["latency_s"]["p50"], r["latency_s"]["p95"], r["first_token_s"]["p50"],
                   r["nfe"], r["peak_memory_bytes"] / 2**20, r["mfu"], r["bandwidth_fraction"])
        row = [r["variant"], Setting(**r["setting"]).label(),
               *(format(x, spec) for x, spec in zip(numbers, (".1f", ".3f", ".3f", ".3f", "g", ".0f", ".3f", ".3f")))]
        if with_quality:
            row.append(f"{r['quality']['value']:.3f}" if r.get("quality") else "")
        table.add_row(*row)
    return table
