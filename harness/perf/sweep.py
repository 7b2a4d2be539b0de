"""One model over a throughput sweep: build the backend from its plan, time every variant at every
setting not yet stored, and store the records in the model's bench run (see ``harness.perf.command``)."""
from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from harness.hashing import stable_hash


def hardware_fingerprint(env: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``env`` is ``harness.env.environment()``."""
    return {**env["hardware"], "torch": env["packages"]["torch"], "transformers": env["packages"]["transformers"],
            "dtype": dtype}


def hardware_tag(hardware: dict[str, Any]) -> str:
    """A short readable tag: the GPU's name, or the CPU's and its core count."""
    if hardware.get("gpu"):
        return re.sub(r"[^a-z0-9]+", "", hardware["gpu"].lower().replace("nvidia", ""))[:16]
    return re.sub(r"[^a-z0-9]+", "", hardware["cpu"].lower())[:16] + f"-{hardware['cpu_cores']}c"


def build_variants(lm, options: dict[str, Any], *, device: str, seed: int, log: Callable[[str], Any]) -> list:
    from harness.perf.throughput import dlm_variants, hf_variants

    if hasattr(lm, "bench_variants"):  # a backend with its own sampler (DiffusionGemma)
        return lm.bench_variants()
    if lm.is_diffusion:
        return dlm_variants(lm, options["samplers"], options["caches"])
    variants = hf_variants(lm, [m for m in options["ar_modes"] if m != "vllm"])
    if "vllm" in options["ar_modes"]:
        from harness.perf.vllm_ar import unavailable, vllm_variant

        reason = unavailable(device)
        if reason:
            log(f"skipping vllm for {lm.name}: {reason}")
        else:
            variants.append(vllm_variant(lm.weights, device=device, dtype=lm.dtype, seed=seed))
    return variants


def build_bench_model(target: str, *, suite: str | None, device: str, dtype: str | None, batch_size: int):
    """The backend, from a plan built as every command builds it (the suite's model_args by family)."""
    from harness.models.factory import build_model
    from harness.plan import RunConfig, plan_run

    plan = plan_run(RunConfig(model=target, tasks=[], suite=suite, device=device, dtype=dtype,
                              batch_size=batch_size), require_tasks=False)
    lm = build_model(plan.card, device=plan.device, dtype=plan.dtype, batch_size=batch_size, settings=plan.settings)
    return lm, plan.model_args


def bench_model(name: str, options: dict[str, Any], *, suite: str | None, output: Path, device: str,
                dtype: str | None, seed: int, data_dir: Path | None,
                log: Callable[[str], Any] = print) -> tuple[str, list[dict[str, Any]]]:
    """Measure one model over the sweep into its run; returns (run id, all its records)."""
    from harness.env import environment
    from harness.perf.probe import probe
    from harness.perf.throughput import sweep
    from harness.perf.untrained import is_untrained, resolve_target
    from harness.runner import slug
    from harness.store import Store, default_store_path, write_jsonl_atomic

    target = resolve_target(name)
    settings = sweep(options)
    lm, model_args = build_bench_model(target, suite=suite, device=device, dtype=dtype,
                                       batch_size=max(s.batch_size for s in settings))
    lm.seed = seed
    env = environment()
    hardware, limits = hardware_fingerprint(env, lm.dtype), probe(device, lm.dtype)
    identity = {"model": name, "fingerprint": {k: v for k, v in lm.fingerprint.items() if k != "batch_size"},
                "model_args": model_args, "options": {k: v for k, v in options.items() if k != "models"},
                "seed": seed, "hardware": hardware}
    run_id = f"bench-{slug(name)}-{hardware_tag(hardware)}-{stable_hash(identity)[:10]}"
    store = Store(default_store_path(output))
    untrained = is_untrained(target)
    store.start_run(run_id, model=name, config={"suite": suite, "device": device, "untrained": untrained, **identity},
                    fingerprint=lm.fingerprint, env={**env, "probe": limits}, output_dir=str(output / run_id),
                    kind="throughput")
    context = {"name": name, "untrained": untrained, "seed": seed, "hardware": hardware, "limits": limits,
               "device": device, "data_dir": data_dir, "output": output}
    measure_all(lm, build_variants(lm, options, device=device, seed=seed, log=log), settings, options, store,
                run_id, context, log)
    store.finish_run(run_id)
    records = store.measurements(run_id)
    (output / run_id).mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(output / run_id / "measurements.jsonl", records)
    return run_id, records


def measure_all(lm, variants: list, settings: list, options: dict[str, Any], store, run_id: str,
                context: dict[str, Any], log: Callable[[str], Any]) -> None:
    """Time every (variant, setting) not stored yet; each record lands in the store as it is made."""
    from harness.perf.quality import quality
    from harness.perf.throughput import measure, prompt_text, synthetic_prompts

    done = {m["key"] for m in store.measurements(run_id)}
    text, source = prompt_text(context["data_dir"])
    ids = lm.encode(text)
    memo: dict[str, dict[str, Any]] = {}
    for variant in variants:
        for setting in filter(None, (variant.adapt(s) for s in settings)):
            key = stable_hash([variant.name, asdict(setting)])
            if key in done:
                continue
            if setting.prompt_length + setting.gen_length > lm.max_length:
                log(f"skipping {variant.name} {setting.label()}: longer than the model's {lm.max_length} tokens")
                continue
            log(f"{context['name']} {variant.name} {setting.label()}")
            prompts = synthetic_prompts(ids, setting.prompt_length, setting.batch_size, context["seed"])
            record = measure(variant, setting, prompts, device=context["device"], repeats=options["repeats"],
                             warmup=options["warmup"], limits=context["limits"])
            record.update(key=key, model=context["name"], untrained=context["untrained"], prompt_source=source,
                          seed=context["seed"], hardware=context["hardware"], probe=context["limits"])
            if options["quality"]:
                record["quality"] = quality(lm, variant, setting, options["quality"], name=context["name"],
                                            seed=context["seed"], device=context["device"],
                                            data_dir=context["data_dir"], output=context["output"], memo=memo)
            store.add_measurement(run_id, record)
            done.add(key)
