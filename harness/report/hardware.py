"""Throughput tables: the hardware fingerprints, tokens/s per model by hardware, every measurement.

The per-setting tables hold local measurements (``mode`` "local"); served ones, whose columns
differ, are tabled by ``harness.report.serving``. Hardware ids (H1, H2, ...) number every
fingerprint, local or served, in the order first measured.

A measurement's quality value is shown in its metric's unit (the ``spec`` that
``collect_measurements`` attached to it). TPF (tokens per forward) is the record's ``tpf``:
generated tokens / (NFE x batch size), what one forward pass gives a row (see
``harness.perf.throughput``); a record from before it was stored gets it from the same numbers.
"""
from __future__ import annotations

import json
from typing import Any

from harness.report import Table
from harness.report.collect import hardware_label, setting_label
from harness.report.format import DASH, number, shown

MEASURES = (("tokens_per_s", "tokens/s", 1, 1), ("latency_p50_s", "p50 (s)", 3, 1), ("latency_p95_s", "p95 (s)", 3, 1),
            ("ttft_s", "TTFT (s)", 3, 1), ("nfe", "NFE", 0, 1), ("tpf", "TPF", 2, 1),
            ("peak_memory_mb", "peak MB", 0, 1), ("mfu", "MFU (%)", 1, 100), ("bandwidth_fraction", "BW (%)", 1, 100))


def tokens_per_forward(m: dict[str, Any]) -> float | None:
    """The record's ``tpf``, else generated tokens / (NFE x batch size) when the record has them."""
    if isinstance(m.get("tpf"), (int, float)):
        return m["tpf"]
    tokens, nfe, batch = m.get("generated_tokens"), m.get("nfe"), (m.get("setting") or {}).get("batch_size") or 1
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (tokens, nfe, batch))
    return tokens / (nfe * batch) if ok and nfe else None


def is_local(m: dict[str, Any]) -> bool:
    return m.get("mode") != "served"


def hardware_ids(measurements: list[dict[str, Any]]) -> dict[str, str]:
    return {hid: f"H{i}" for i, hid in enumerate(dict.fromkeys(m["hardware_id"] for m in measurements), 1)}


def fingerprints_table(measurements: list[dict[str, Any]]) -> Table:
    ids = hardware_ids(measurements)
    first = {m["hardware_id"]: m["hardware"] for m in reversed(measurements)}
    return Table("Hardware fingerprints", ["Id", "Accelerator", "GPU memory (GB)", "CUDA / driver", "CPU",
                                           "Cores", "RAM (GB)", "Software", "Source", "Fingerprint"],
                 [[ids[h], hardware_label(hw), number(hw.get("gpu_memory_gb"), 0),
                   f"{hw.get('cuda') or DASH} / {hw.get('driver') or DASH}", hw.get("cpu") or DASH,
                   number(hw.get("cpu_cores"), 0), number(hw.get("memory_gb"), 0),
                   ", ".join(f"{k} {hw[k]}" for k in ("torch", "transformers") if hw.get(k)) or DASH,
                   f"server, {hw['source']}" if "source" in hw else "local", h]
                  for h, hw in ((h, first[h]) for h in ids)])


def hardware_tables(measurements: list[dict[str, Any]]) -> list[Table]:
    """The distinct hardware fingerprints, then per model: one row per hardware, tokens/s per local setting."""
    ids = hardware_ids(measurements)
    first = {m["hardware_id"]: m["hardware"] for m in reversed(measurements)}
    tables = [fingerprints_table(measurements)]
    local = [m for m in measurements if is_local(m)]
    for model in dict.fromkeys(m["model"] for m in local):
        mine = [m for m in local if m["model"] == model]
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
    """Every local measurement, one table per hardware fingerprint."""
    ids = hardware_ids(measurements)
    tables = []
    for hid, name in ids.items():
        mine = [m for m in measurements if m["hardware_id"] == hid and is_local(m)]
        if not mine:
            continue
        rows = [[m["model"], m["backend"], m["variant"], m["dtype"], m["setting_label"]] +
                [number(tokens_per_forward(m) if key == "tpf" else m.get(key), digits, scale)
                 for key, _, digits, scale in MEASURES] +
                [quality_label(m["quality"])] for m in mine]
        tables.append(Table(f"Measurements on {name}: {hardware_label(mine[0]['hardware'])}",
                            ["Model", "Backend", "Variant", "dtype", "Setting"] + [label for _, label, _, _ in MEASURES] +
                            ["Quality"], rows, settings=[f"runs: {', '.join(dict.fromkeys(m['run_id'] for m in mine))}"],
                            collapsed=True))
    return tables


def quality_label(quality: dict[str, Any] | None) -> str:
    """"task metric value" in the metric's unit, e.g. "gsm8k exact_match_strict (%) 33.0"."""
    if not quality or not isinstance(quality.get("value"), (int, float)):
        return DASH
    spec = quality["spec"]
    return f"{quality.get('task', '?')} {spec.label} {shown(spec, quality['value'])}"
