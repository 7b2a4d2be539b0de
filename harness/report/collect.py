"""Read the store into plain tables: one ``Cell`` per (run, task, metric), one flat dict per measurement.

Every cell carries what produced it (task and prompt hash, scoring method, dtype, seed, versions)
and its metric's spec (unit, direction, primary), so that views keep numbers produced differently
apart and show each in its own unit. Everything is read through ``Store`` methods; the specs of
results from an older store fall back as ``harness.report.specs`` says. The tables built from
these live in ``harness.report.tables``, ``harness.report.hardware`` and ``harness.report.serving``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.report.format import DASH, finite
from harness.report.names import display_name
from harness.report.specs import metric_spec, result_output_type, result_specs
from harness.scoring.metric import Metric
from harness.store import Store

# what a task's output type asks of the model, as the scoring phrase knows it
REQUEST_KINDS = {"loglikelihood": "loglikelihood", "multiple_choice": "loglikelihood",
                 "loglikelihood_rolling": "rolling", "generate_until": "generate", "infill": "infill"}
VERSION_PACKAGES = ("dlm-harness", "torch", "transformers")


@dataclass
class Cell:
    run_id: str
    model: str
    family: str  # AR | DLM
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    task_hash: str
    prompt_hash: str
    scoring: str  # how the number was scored: exact log-likelihood, an estimator, a sampler
    config_key: str  # model + everything of the backend that changes numbers
    dtype: str
    seed: Any
    suite: str
    spec: Metric  # the metric's unit, direction and whether it is the task's primary one
    options: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the backend's settings (estimator, sampler, ...)
    parent: str | None = None  # the AR model a DLM was adapted from, where the run says so
    names: frozenset = frozenset()  # every name the model goes by (card, --model, weights)
    versions: str = ""
    complete: bool = True
    first_prompt: str = ""  # the request hash of the run's first document

    @property
    def variant(self) -> tuple[str, str, str]:
        """What a column holds: the task, its settings and its prompts. Runs that differ only in
        ``--limit`` share it (their first document's requests agree); other prompts do not."""
        return self.task, self.task_hash, self.first_prompt or self.prompt_hash

    @property
    def n_shot(self) -> int:
        return int(next((self.options[k] for k in ("num_fewshot", "n_shot", "fewshot") if k in self.options), 0))

    @property
    def higher_is_better(self) -> bool | None:
        return self.spec.higher_is_better


# ---- runs ------------------------------------------------------------------------------------
def select_runs(store: Store, run_ids: list[str], all_runs: bool) -> list[dict[str, Any]]:
    """The runs named (unique id prefixes allowed) or, with ``all_runs``, every run in the store."""
    if all_runs:
        runs = store.runs()
        if not runs:
            raise HarnessError(f"the store {store.path} holds no runs yet (run `harness run` first)")
        return runs
    if not run_ids:
        raise HarnessError("name the runs to report, or pass --all")
    runs = {run["run_id"]: run for run in map(store.run, run_ids)}.values()
    return sorted(runs, key=lambda run: run["created_at"])


def model_name(run: dict[str, Any]) -> str:
    """The model's display name (``harness.report.names``): its card's, or its checkpoint's recipe."""
    return display_name(run["model_fingerprint"].get("name") or run["model"], run["model_fingerprint"])


def first_prompt(store: Store, run_id: str, task: str) -> str:
    records = store.records(run_id, task)
    return str(records[0][2].get("requests_hash") or records[0][2].get("prompt_hash") or "") if records else ""


def family(run: dict[str, Any]) -> str:
    fp = run["model_fingerprint"]
    diffusion = fp.get("backend") in ("diffusion", "diffusion_gemma") or (fp.get("served") and fp.get("family") == "diffusion")
    return "DLM" if diffusion else "AR"


def versions(run: dict[str, Any]) -> str:
    packages = run["env"].get("packages") or {}
    parts = [f"{name} {packages[name]}" for name in VERSION_PACKAGES if packages.get(name)]
    sha = run["env"].get("git_sha")
    return ", ".join(parts + ([f"git {sha[:8]}{'-dirty' if sha.endswith('-dirty') else ''}"] if sha else []))


def scoring(run: dict[str, Any], output_type: str | None) -> str:
    """One phrase for how a run scored a task of one output type (None: unknown, an old store)."""
    kind = REQUEST_KINDS.get(output_type or "")
    fp = run["model_fingerprint"]
    if fp.get("backend") == "endpoint":
        engine = fp.get("engine") or "server"
        return {"loglikelihood": f"served prompt logprobs ({engine})", "generate": f"served ({engine})",
                "infill": f"served ({engine}, {fp.get('infill_mode') or 'prefix'} infill)"}.get(kind or "", f"served ({engine})")
    if family(run) == "AR":
        if kind in ("generate", "infill"):
            return "greedy" + (f" ({fp['infill_mode']} infill)" if kind == "infill" and fp.get("infill_mode") else "")
        return "exact LL"
    est, smp = fp.get("estimator") or {}, fp.get("sampler") or {}
    estimator = f"{est.get('method', '?')} ×{est.get('samples', '?')}" + (
        f", cfg {est['cfg_scale']}" if est.get("cfg_scale") else "") + (
        f", {est['greedy']} greedy check" if est.get("greedy") == "sequential" else "") + (
        ", no start token" if fp.get("start_token") == "none" else "")
    cache = fp.get("cache") or {}
    sampler = f"{smp.get('name', '?')}, {smp.get('steps') or 'default'} steps" + "".join(
        f", {label} {smp[key]}" for key, label in (("block_length", "block"), ("temperature", "T"))
        if smp.get(key)) + (f", {cache['mode']} cache" if cache.get("mode", "none") != "none" else "")
    return {"loglikelihood": estimator, "rolling": estimator, "generate": sampler,
            "infill": sampler}.get(kind or "", f"{estimator}; {sampler}")


def collect_cells(store: Store, runs: list[dict[str, Any]]) -> list[Cell]:
    cells = []
    for run in runs:
        fp = run["model_fingerprint"]
        stable = {k: v for k, v in fp.items() if k not in ("batch_size", "device", "seed")}
        key = stable_hash([model_name(run), stable, run["config"].get("seed")])
        names = frozenset(str(x) for x in (model_name(run), fp.get("name"), run["model"], fp.get("weights")) if x)
        parent = fp.get("base_model") or (run["config"].get("model_args") or {}).get("base_model")
        order = list(run["config"].get("tasks") or [])
        results = store.task_results(run["run_id"])
        for task, result in sorted(results.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
            how = scoring(run, result_output_type(task, result))
            options = (result["settings"] or {}).get("options") or {}
            specs = result_specs(task, result)
            for metric, spec in specs.items():
                value, stderr = result["metrics"].get(metric), result["metrics"].get(f"{metric}_stderr")
                if not isinstance(value, (int, float)):
                    continue
                cells.append(Cell(
                    run["run_id"], model_name(run), family(run), task, metric, float(value),
                    None if stderr is None or math.isnan(stderr) else float(stderr), result["n"],
                    result["task_hash"], result["prompt_hash"], how, key, fp.get("dtype") or "?",
                    run["config"].get("seed"), run["config"].get("suite") or "", spec, options,
                    fp, parent, names, versions(run), run["status"] == "complete",
                    first_prompt(store, run["run_id"], task)))
    return cells


# ---- throughput measurements ------------------------------------------------------------------
SERVED_LABELS = {"vllm": "vLLM (served)", "sglang": "SGLang (served)", "harness-reference": "reference server (served)",
                 "openai-compatible": "OpenAI-compatible server (served)"}
LOCAL_LABELS = {"hf_ar": "HF eager", "diffusion": "DLM (harness)", "vllm": "vLLM (in-process)",
                "diffusion_gemma": "DiffusionGemma (harness)"}
NESTED = (("latency_s", "latency"), ("first_token_s", "ttft"), ("tpot_s", "tpot"), ("itl_s", "itl"))
QUANTILES = ("mean", "p50", "p95", "p99")
LOAD = (("request_rate", "rate {}/s"), ("max_concurrency", "concurrency {}"), ("num_prompts", "{} prompts"),
        ("input_words", "in {} words"), ("output_tokens", "out {} tokens"))


def hardware_label(hw: Any) -> str:
    """The accelerator (GPU ×count) or CPU; a served one the user declared says "(declared)", and
    a server that reports nothing is "unknown hardware (served)"."""
    hw = hw if isinstance(hw, dict) else {}
    declared = " (declared)" if hw.get("source") == "declared" else ""
    count = hw.get("gpu_count")
    if hw.get("gpu"):
        return f"{hw['gpu']}" + (f" ×{count:g}" if finite(count) and count > 1 else "") + declared
    if not hw.get("cpu") and hw.get("source") in ("unknown", "reported", "declared"):
        return "unknown hardware (served)"
    return f"{hw.get('cpu', 'unknown CPU')}" + (f" ({hw['cpu_cores']} cores)" if hw.get("cpu_cores") else "") + declared


def backend_label(backend: str, mode: str) -> str:
    """How a backend reads in the report: "HF eager", "DLM (harness)", "vLLM (served)", ..."""
    if mode == "served":
        return SERVED_LABELS.get(backend, f"{backend} (served)")
    return LOCAL_LABELS.get(backend, backend)


def setting_label(setting: dict[str, Any]) -> str:
    known = (("backend", "{}"), ("variant", "{}"), ("dtype", "{}"), ("gen_length", "len {}"), ("steps", "{} steps"),
             ("batch_size", "batch {}"), ("prompt_length", "prompt {}"))
    parts = [form.format(setting[key]) for key, form in known if setting.get(key) is not None]
    return " · ".join(parts + [f"{k} {v}" for k, v in sorted(setting.items()) if k not in dict(known)]) or "default"


def span(value: Any) -> str:
    """A [low, high] range as "low–high"; anything else as it is."""
    return "–".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def load_label(setting: dict[str, Any], load: bool = True) -> str:
    """A served setting: "rate inf/s · concurrency 1 · 16 prompts · in 32–128 words · ... · streamed"
    (without ``load``: the prompts alone, not the request rate and concurrency)."""
    parts = [form.format(span(setting[key])) for key, form in LOAD[0 if load else 2:] if setting.get(key) is not None]
    if isinstance(setting.get("streaming"), bool):
        parts.append("streamed" if setting["streaming"] else "not streamed")
    return " · ".join(parts) or "default"


def quality_of(store: Store, quality: Any) -> dict[str, Any] | None:
    """A measurement's ``quality`` dict with its metric's ``spec``: the one stored with the quality
    task's result in the eval run it names (``run_id``), else the fallback of ``harness.report.specs``."""
    if not isinstance(quality, dict):
        return None
    task, metric = str(quality.get("task", "?")), str(quality.get("metric", "quality"))
    result = store.task_results(str(quality["run_id"])).get(task) if quality.get("run_id") else None
    return {**quality, "spec": metric_spec(task, metric, result)}


def latencies(m: dict[str, Any], setting: dict[str, Any], mode: str) -> dict[str, Any]:
    """Flat ``latency_p50_s``, ``ttft_p99_s``, ``tpot_p50_s``, ``itl_p99_s``, ... from the nested
    summaries (or the record's own flat keys), None where missing. A local record's TPOT is
    (latency p50 − TTFT p50) / (gen_length − 1)."""
    flat = {}
    for key, prefix in NESTED:
        nested = m.get(key) if isinstance(m.get(key), dict) else {}
        for q in QUANTILES:
            value = m.get(f"{prefix}_{q}_s", nested.get(q))
            flat[f"{prefix}_{q}_s"] = value if finite(value) else None
    flat["ttft_s"] = m["ttft_s"] if finite(m.get("ttft_s")) else flat["ttft_p50_s"]
    n, latency, first = setting.get("gen_length"), flat["latency_p50_s"], flat["ttft_s"]
    if mode == "local" and flat["tpot_p50_s"] is None and finite(n) and n > 1 and finite(latency) and finite(first):
        flat["tpot_p50_s"] = (latency - first) / (n - 1)
    return flat


def measurement(store: Store, run: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    """One record, flat: see ``collect_measurements``."""
    fp = run["model_fingerprint"]
    served = m.get("served") is True or "serving" in (m.get("kind"), run["kind"]) or fp.get("served") is True
    mode = "served" if served else "local"
    hw = m.get("hardware") if isinstance(m.get("hardware"), dict) else (
        {"source": "unknown"} if served else run["env"].get("hardware") or {})
    dtype = m.get("dtype") or hw.get("dtype") or fp.get("dtype") or DASH
    hw = {k: v for k, v in hw.items() if k != "dtype"}  # a model setting, not the machine
    setting = m.get("setting") if isinstance(m.get("setting"), dict) else {}
    memory = m.get("peak_memory_bytes")
    name = model_name(run) if m.get("model") in (None, run["model"], fp.get("name")) else str(m["model"])
    backend = str(m.get("backend") or fp.get("backend") or DASH)
    variant = m.get("variant") or (DASH if served else m.get("sampler") or (fp.get("sampler") or {}).get("name") or
                                   ("greedy" if fp.get("backend") != "diffusion" else DASH))
    return {**m, "run_id": run["run_id"], "model": name, "mode": mode, "backend": backend,
            "backend_label": backend_label(backend, mode), "dtype": DASH if dtype == "—" else str(dtype),
            "variant": str(variant), **latencies(m, setting, mode),
            "peak_memory_mb": m.get("peak_memory_mb", memory / 2**20 if finite(memory) else None),
            "setting": setting, "setting_label": load_label(setting) if served else setting_label(setting),
            "hardware": hw, "hardware_id": stable_hash(hw)[:8], "hardware_label": hardware_label(hw),
            "quality": quality_of(store, m.get("quality"))}


def collect_measurements(store: Store, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat dict per measurement, local (throughput runs) or served (serving runs), with
    canonical keys and its hardware fingerprint.

    The record's own ``hardware`` (which `harness bench` extends with software versions and dtype;
    of a served record, the server's) wins over the run's; its dtype moves to the measurement;
    nested latencies (``latency_s: {p50, p95}``) become flat keys (``latencies``); a ``quality``
    dict gets its metric's spec. ``mode`` is "served" or "local", ``backend_label`` the backend
    as the report names it.
    """
    return [measurement(store, run, m) for run in runs for m in store.measurements(run["run_id"])
            if isinstance(m, dict)]
