"""Read the store into plain tables: one ``Cell`` per (run, task, metric), one flat dict per measurement.

Every cell carries what produced it (task and prompt hash, scoring method, dtype, seed, versions),
so that views can keep numbers produced differently apart.
"""
from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from harness.errors import HarnessError
from harness.report import Footnotes, Link, Table
from harness.store import Store
from harness.hashing import stable_hash

# metrics not shown x100: not fractions, or (ROUGE) already x100
NOT_PERCENT = ("perplexity", "ppl", "nll", "bpb", "bits", "loss", "latency", "tokens", "length", "nfe", "rouge")
LOWER_IS_BETTER = ("perplexity", "ppl", "nll", "bpb", "bits", "loss", "latency")
REQUEST_KINDS = {"continuation": "loglikelihood", "max_tokens": "generate", "suffix": "infill", "text": "rolling"}
VERSION_PACKAGES = ("dlm-harness", "torch", "transformers")
DASH = "–"


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
    options: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the backend's settings (estimator, sampler, ...)
    parent: str | None = None  # the AR model a DLM was adapted from, where the run says so
    names: frozenset = frozenset()  # every name the model goes by (card, --model, weights)
    versions: str = ""
    complete: bool = True

    @property
    def variant(self) -> tuple[str, str, str]:
        return self.task, self.task_hash, self.prompt_hash

    @property
    def n_shot(self) -> int:
        return int(next((self.options[k] for k in ("num_fewshot", "n_shot", "fewshot") if k in self.options), 0))

    @property
    def higher_is_better(self) -> bool:
        return not self.metric.startswith(LOWER_IS_BETTER)


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
    return run["model_fingerprint"].get("name") or run["model"]


def family(run: dict[str, Any]) -> str:
    return "DLM" if run["model_fingerprint"].get("backend") == "diffusion" else "AR"


def versions(run: dict[str, Any]) -> str:
    packages = run["env"].get("packages") or {}
    parts = [f"{name} {packages[name]}" for name in VERSION_PACKAGES if packages.get(name)]
    sha = run["env"].get("git_sha")
    return ", ".join(parts + ([f"git {sha[:8]}{'-dirty' if sha.endswith('-dirty') else ''}"] if sha else []))


def scoring(run: dict[str, Any], kind: str | None) -> str:
    """One phrase for how a run scored one kind of request."""
    fp = run["model_fingerprint"]
    if family(run) == "AR":
        if kind in ("generate", "infill"):
            return "greedy" + (f" ({fp['infill_mode']} infill)" if kind == "infill" and fp.get("infill_mode") else "")
        return "exact LL"
    est, smp = fp.get("estimator") or {}, fp.get("sampler") or {}
    estimator = f"{est.get('method', '?')} ×{est.get('samples', '?')}" + (
        f", cfg {est['cfg_scale']}" if est.get("cfg_scale") else "") + (
        f", {est['greedy']} greedy check" if est.get("greedy") == "sequential" else "") + (
        ", no start token" if fp.get("start_token") == "none" else "")
    sampler = f"{smp.get('name', '?')}, {smp.get('steps') or 'default'} steps" + "".join(
        f", {label} {smp[key]}" for key, label in (("block_length", "block"), ("temperature", "T"))
        if smp.get(key))
    return {"loglikelihood": estimator, "rolling": estimator, "generate": sampler,
            "infill": sampler}.get(kind or "", f"{estimator}; {sampler}")


def request_kind(store: Store, run_id: str, task: str) -> str | None:
    row = store.db.execute("SELECT record FROM records WHERE run_id=? AND task=? LIMIT 1", (run_id, task)).fetchone()
    arguments = json.loads(row[0]).get("arguments") or [] if row else []
    keys = set(arguments[0]) if arguments and isinstance(arguments[0], dict) else set()
    return next((kind for key, kind in REQUEST_KINDS.items() if key in keys), None)


def collect_cells(store: Store, runs: list[dict[str, Any]]) -> list[Cell]:
    cells = []
    for run in runs:
        fp = run["model_fingerprint"]
        stable = {k: v for k, v in fp.items() if k not in ("batch_size", "device", "seed")}
        key = stable_hash([model_name(run), stable, run["config"].get("seed")])
        names = frozenset(str(x) for x in (model_name(run), run["model"], fp.get("weights")) if x)
        parent = fp.get("base_model") or (run["config"].get("model_args") or {}).get("base_model")
        order = list(run["config"].get("tasks") or [])
        results = store.task_results(run["run_id"])
        for task, result in sorted(results.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
            how = scoring(run, request_kind(store, run["run_id"], task))
            options = (result["settings"] or {}).get("options") or {}
            for metric, value in result["metrics"].items():
                if metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                stderr = result["metrics"].get(f"{metric}_stderr")
                cells.append(Cell(
                    run["run_id"], model_name(run), family(run), task, metric, float(value),
                    None if stderr is None or math.isnan(stderr) else float(stderr), result["n"],
                    result["task_hash"], result["prompt_hash"], how, key, fp.get("dtype") or "?",
                    run["config"].get("seed"), run["config"].get("suite") or "", options,
                    fp, parent, names, versions(run),
                    run["status"] == "complete"))
    return cells


# ---- formatting ------------------------------------------------------------------------------
def percent(metric: str) -> bool:
    """Fractions are shown (and compared with papers) in %; perplexities and the like are not."""
    return not metric.lower().startswith(NOT_PERCENT)


def fmt(value: float | None, stderr: float | None = None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    text = f"{value * scale:.{digits}f}"
    return text if stderr is None else f"{text} ± {stderr * scale:.{digits}f}"


SHOWN_OPTIONS = ("num_fewshot", "n_shot", "fewshot", "length", "oracle_slack", "script", "leading_space",
                 "diffusion_steps", "max_input_tokens", "timeout_s", "allow_code_exec")


def column_settings(cells: list[Cell]) -> str:
    """metric, n, n-shot and length protocol of one column."""
    first = cells[0]
    ns = sorted({c.n for c in cells})
    length = first.options.get("length")
    if length == "oracle" and first.options.get("oracle_slack"):
        length = f"oracle+{first.options['oracle_slack']}"
    return " · ".join([first.metric + (" (%)" if percent(first.metric) else ""), "n=" + "/".join(map(str, ns)),
                       f"{first.n_shot}-shot"] + ([f"length {length}"] if length else []))


def options_line(label: str, cells: list[Cell]) -> str | None:
    """The column's other task options, for the table's settings list."""
    extra = [f"{k}={option(v)}" for k, v in sorted(cells[0].options.items()) if v is not None and k not in SHOWN_OPTIONS]
    return f"{label} options: {', '.join(extra)}" if extra else None


def option(value: Any, width: int = 32) -> str:
    """A task option on one short line: strings and lists as JSON, cut to ``width`` characters."""
    text = str(value) if isinstance(value, (int, float)) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 1] + "…"


def primary(cells: list[Cell]) -> list[Cell]:
    """Each (run, task)'s first metric, the one shown in leaderboards."""
    seen: set[tuple[str, str]] = set()
    out = []
    for cell in cells:
        if (cell.run_id, cell.task) not in seen:
            seen.add((cell.run_id, cell.task))
            out.append(cell)
    return out


def variant_labels(cells: list[Cell]) -> dict[tuple, str]:
    """Column labels: the task name, plus (a), (b), ... where one task was produced in several ways."""
    variants = list(dict.fromkeys(c.variant for c in cells))
    labels = {}
    for variant in variants:
        same = [v for v in variants if v[0] == variant[0]]
        index = same.index(variant)
        labels[variant] = variant[0] if len(same) == 1 else \
            f"{variant[0]} ({string.ascii_lowercase[index] if index < 26 else index + 1})"
    return labels


# ---- views ---------------------------------------------------------------------------------
def leaderboards(cells: list[Cell]) -> list[Table]:
    """One models x tasks table per suite; value ± stderr of each task's first metric."""
    tables = []
    for suite in dict.fromkeys(c.suite for c in cells):
        tables.append(leaderboard(primary([c for c in cells if c.suite == suite]),
                                  f"Suite {suite}" if suite else "Runs without a suite"))
    return tables


def leaderboard(cells: list[Cell], title: str) -> Table:
    labels = variant_labels(cells)
    notes = Footnotes()
    rows: dict[str, dict[tuple, Cell]] = {}
    for cell in cells:  # oldest first, so a newer run of the same configuration replaces it
        previous = rows.setdefault(cell.config_key, {}).get(cell.variant)
        if previous is not None:
            notes.ref(f"{cell.model} {labels[cell.variant]}: run {cell.run_id} replaces the older "
                      f"identical configuration {previous.run_id}")
        rows[cell.config_key][cell.variant] = cell
    body = []
    for by_variant in rows.values():
        some = next(iter(by_variant.values()))
        how = "; ".join(dict.fromkeys(c.scoring for c in by_variant.values()))
        name = some.model + ("" if all(c.complete for c in by_variant.values()) else
                             " " + notes.ref("run incomplete: fewer documents than planned"))
        body.append([name, some.family, how, some.dtype, str(some.seed)] + [
            fmt(c.value, c.stderr, 100 if percent(c.metric) else 1) if (c := by_variant.get(v)) else DASH
            for v in labels])
    by_column = {v: [c for c in cells if c.variant == v] for v in labels}
    settings = ["value ± standard error; how each row scored (likelihood estimator, sampler) in its Scoring cell",
                f"versions: {'; '.join(sorted({c.versions for c in cells}))}"]
    settings += [f"{labels[v]}: task hash {v[1][:8]}, prompt hash {v[2][:8]}" for v in labels if labels[v] != v[0]]
    settings += [line for v in labels if (line := options_line(labels[v], by_column[v]))]
    return Table(title, ["Model", "Family", "Scoring", "dtype", "Seed", *labels.values()], body,
                 settings=settings,
                 subheader=["", "", "", "", ""] + [column_settings(by_column[v]) for v in labels],
                 notes=notes.listing())


def results_table(cells: list[Cell]) -> Table:
    """Every (run, task, metric) with its provenance: the long form behind the leaderboards."""
    rows = [[c.run_id, c.model, c.task, c.metric, fmt(c.value, None, 1, 4), fmt(c.stderr, None, 1, 4), str(c.n),
             c.scoring, c.task_hash[:8], c.prompt_hash[:8]] for c in cells]
    return Table("Every (run, task, metric)", ["Run", "Model", "Task", "Metric", "Value", "Stderr", "n", "Scoring", "Task hash",
                                 "Prompt hash"], rows, settings=["raw values (fractions, not %)"])


def runs_table(runs: list[dict[str, Any]], link: bool = False) -> Table:
    rows = []
    for run in runs:
        hw = hardware_label(run["env"].get("hardware") or {})
        run_id = Link(run["run_id"], f"runs/{run['run_id']}.html") if link else run["run_id"]
        rows.append([run_id, model_name(run), run["kind"], run["status"],
                     datetime.fromtimestamp(run["created_at"]).strftime("%Y-%m-%d %H:%M"), hw, versions(run)])
    return Table("Runs reported", ["Run", "Model", "Kind", "Status", "Created", "Hardware", "Versions"], rows)


# ---- throughput measurements ------------------------------------------------------------------
def hardware_label(hw: dict[str, Any]) -> str:
    if hw.get("gpu"):
        return f"{hw['gpu']}" + (f" ×{hw['gpu_count']}" if (hw.get("gpu_count") or 1) > 1 else "")
    return f"{hw.get('cpu', 'unknown CPU')}" + (f" ({hw['cpu_cores']} cores)" if hw.get("cpu_cores") else "")


def setting_label(setting: dict[str, Any]) -> str:
    known = (("backend", "{}"), ("variant", "{}"), ("dtype", "{}"), ("gen_length", "len {}"), ("steps", "{} steps"),
             ("batch_size", "batch {}"), ("prompt_length", "prompt {}"))
    parts = [form.format(setting[key]) for key, form in known if setting.get(key) is not None]
    return " · ".join(parts + [f"{k} {v}" for k, v in sorted(setting.items()) if k not in dict(known)]) or "default"


def collect_measurements(store: Store, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat dict per throughput measurement, with canonical keys and its hardware fingerprint.

    The record's own ``hardware`` (which `harness bench` extends with software versions and dtype)
    wins over the run's; its dtype moves to the measurement; nested latencies (``latency_s: {p50,
    p95}``) become flat keys.
    """
    out = []
    for run in runs:
        fp = run["model_fingerprint"]
        for m in store.measurements(run["run_id"]):
            hw = m.get("hardware") if isinstance(m.get("hardware"), dict) else run["env"].get("hardware") or {}
            dtype = m.get("dtype") or hw.get("dtype") or fp.get("dtype") or DASH
            hw = {k: v for k, v in hw.items() if k != "dtype"}  # a model setting, not the machine
            setting = m.get("setting") if isinstance(m.get("setting"), dict) else {}
            latency, first = m.get("latency_s") or {}, m.get("first_token_s") or {}
            memory = m.get("peak_memory_bytes")
            name = model_name(run) if m.get("model") in (None, run["model"]) else m["model"]
            out.append({**m, "run_id": run["run_id"], "model": name,
                        "backend": m.get("backend") or fp.get("backend") or DASH, "dtype": dtype,
                        "variant": m.get("variant") or m.get("sampler") or (fp.get("sampler") or {}).get("name") or
                        ("greedy" if fp.get("backend") != "diffusion" else DASH),
                        "latency_p50_s": m.get("latency_p50_s", latency.get("p50") if isinstance(latency, dict) else None),
                        "latency_p95_s": m.get("latency_p95_s", latency.get("p95") if isinstance(latency, dict) else None),
                        "ttft_s": m.get("ttft_s", first.get("p50") if isinstance(first, dict) else None),
                        "peak_memory_mb": m.get("peak_memory_mb", memory / 2**20 if isinstance(memory, (int, float)) else None),
                        "setting": setting, "setting_label": setting_label(setting), "hardware": hw,
                        "hardware_id": stable_hash(hw)[:8], "hardware_label": hardware_label(hw),
                        "quality": m.get("quality") if isinstance(m.get("quality"), dict) else None})
    return out


MEASURES = (("tokens_per_s", "tokens/s", 1, 1), ("latency_p50_s", "p50 (s)", 3, 1), ("latency_p95_s", "p95 (s)", 3, 1),
            ("ttft_s", "TTFT (s)", 3, 1), ("nfe", "NFE", 0, 1), ("peak_memory_mb", "peak MB", 0, 1),
            ("mfu", "MFU (%)", 1, 100), ("bandwidth_fraction", "BW (%)", 1, 100))


def number(value: Any, digits: int = 1, scale: float = 1) -> str:
    return f"{value * scale:,.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else DASH


def hardware_ids(measurements: list[dict[str, Any]]) -> dict[str, str]:
    return {hid: f"H{i}" for i, hid in enumerate(dict.fromkeys(m["hardware_id"] for m in measurements), 1)}


def hardware_tables(measurements: list[dict[str, Any]]) -> list[Table]:
    """The distinct hardware fingerprints, then per model: one row per hardware, tokens/s per setting."""
    ids = hardware_ids(measurements)
    first = {m["hardware_id"]: m["hardware"] for m in reversed(measurements)}
    described = Table("Hardware fingerprints", ["Id", "Accelerator", "GPU memory (GB)", "CUDA / driver", "CPU",
                                                "Cores", "RAM (GB)", "Software", "Fingerprint"],
                      [[ids[h], hardware_label(hw), number(hw.get("gpu_memory_gb"), 0),
                        f"{hw.get('cuda') or DASH} / {hw.get('driver') or DASH}", hw.get("cpu") or DASH,
                        number(hw.get("cpu_cores"), 0), number(hw.get("memory_gb"), 0),
                        ", ".join(f"{k} {hw[k]}" for k in ("torch", "transformers") if hw.get(k)) or DASH, h]
                       for h, hw in ((h, first[h]) for h in ids)])
    tables = [described]
    for model in dict.fromkeys(m["model"] for m in measurements):
        mine = [m for m in measurements if m["model"] == model]
        keys = list(dict.fromkeys(column_key(m) for m in mine))
        common = {k: v for k, v in keys[0] if all((k, v) in key for key in keys)}
        latest = {(m["hardware_id"], column_key(m)): m for m in mine}
        rows = [[f"{ids[h]} {hardware_label(first[h])}"] +
                [number(latest[(h, key)].get("tokens_per_s")) if (h, key) in latest else DASH for key in keys]
                for h in dict.fromkeys(m["hardware_id"] for m in mine)]
        header = [setting_label({k: v for k, v in key if k not in common}) if len(keys) > 1 else "tokens/s"
                  for key in keys]
        tables.append(Table(f"Throughput of {model} by hardware (tokens/s)", ["Hardware"] + header, rows,
                            settings=[f"common to all columns: {setting_label(common)}",
                                      "the latest measurement of each setting on each hardware"]))
    return tables


def column_key(m: dict[str, Any]) -> tuple:
    """What distinguishes one throughput setting: backend, variant (sampler, cache) and the setting dict."""
    setting = {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in m["setting"].items()}
    return (("backend", m["backend"]), ("variant", m["variant"]), ("dtype", m["dtype"]), *sorted(setting.items()))


def measurement_tables(measurements: list[dict[str, Any]]) -> list[Table]:
    """Every measurement, one table per hardware fingerprint."""
    ids = hardware_ids(measurements)
    tables = []
    for hid, name in ids.items():
        mine = [m for m in measurements if m["hardware_id"] == hid]
        rows = [[m["model"], m["backend"], m["variant"], m["dtype"], m["setting_label"]] +
                [number(m.get(key), digits, scale) for key, _, digits, scale in MEASURES] +
                [quality_label(m["quality"])] for m in mine]
        tables.append(Table(f"Measurements on {name}: {hardware_label(mine[0]['hardware'])}",
                            ["Model", "Backend", "Variant", "dtype", "Setting"] + [label for _, label, _, _ in MEASURES] +
                            ["Quality"], rows, settings=[f"runs: {', '.join(dict.fromkeys(m['run_id'] for m in mine))}"]))
    return tables


def quality_label(quality: dict[str, Any] | None) -> str:
    if not quality or not isinstance(quality.get("value"), (int, float)):
        return DASH
    metric = str(quality.get("metric", ""))
    return f"{quality.get('task', '?')} {metric} {fmt(quality['value'], None, 100 if percent(metric) else 1)}"
