"""Local and served measurements side by side, and the table of serving measurements per hardware.

``side_by_side_tables``: per model, one row per (hardware fingerprint, backend label), so that the
same model on one GPU under HF eager and under vLLM (served) are two rows of one table, in columns
both kinds have: single-stream and best output tokens/s, TTFT, TPOT and end-to-end latency p50,
and the quality value where a record carries one. ``serving_tables``: every served measurement,
one table per server hardware. The flat keys (``tpot_p50_s``, ``itl_p99_s``, ...) are those of
``harness.report.collect.latencies``.
"""
from __future__ import annotations

import math
from typing import Any

from harness.report import Table
from harness.report.collect import load_label, setting_label
from harness.report.format import DASH, finite, number
from harness.report.hardware import hardware_ids, is_local, quality_label

GREEDY = ("kv_cache", "greedy")  # the local variant whose batch-1 record is the single stream
SIDE_BY_SIDE = ["Hardware", "Backend", "Single-stream tok/s", "Best tok/s", "Best at", "TTFT p50 (s)",
                "TPOT p50 (ms)", "e2e p50 (s)", "Quality"]
SERVING = (("request_throughput", "req/s", 2, 1), ("tokens_per_s", "out tok/s", 1, 1),
           ("ttft_p50_s", "TTFT p50 (s)", 3, 1), ("ttft_p99_s", "TTFT p99 (s)", 3, 1),
           ("tpot_p50_s", "TPOT p50 (ms)", 2, 1000), ("itl_p99_s", "ITL p99 (ms)", 2, 1000),
           ("latency_p50_s", "e2e p50 (s)", 3, 1), ("latency_p99_s", "e2e p99 (s)", 3, 1),
           ("completed", "Completed", 0, 1), ("failed", "Failed", 0, 1), ("tokens_per_chunk", "tok/chunk", 2, 1))


def speed(m: dict[str, Any]) -> float:
    return m["tokens_per_s"] if finite(m.get("tokens_per_s")) else -math.inf


def bound(value: Any) -> float:
    """A concurrency or request rate; none (or "inf") is no bound."""
    return value if finite(value) else math.inf


def single_stream(mine: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Local: the first batch-1 record of the kv_cache/greedy variant, else the fastest batch-1
    record. Served: the "concurrency 1" record, else the one of lowest concurrency (then rate)."""
    if is_local(mine[0]):
        ones = [m for m in mine if m["setting"].get("batch_size", 1) == 1]
        return next((m for m in ones if m["variant"] in GREEDY), max(ones, key=speed, default=None))
    return next((m for m in mine if m["variant"] == "concurrency 1"),
                min(mine, key=lambda m: (bound(m["setting"].get("max_concurrency")),
                                         bound(m["setting"].get("request_rate")))))


def best_at(m: dict[str, Any]) -> str:
    return m["variant"] if not is_local(m) else f"{m['variant']} · {setting_label(m['setting'])}"


def side_by_side_row(label: str, mine: list[dict[str, Any]]) -> list[str]:
    one, best = single_stream(mine), max(mine, key=speed)
    shown = one or {}
    quality = next((m["quality"] for m in [shown, *mine] if m.get("quality") and finite(m["quality"].get("value"))),
                   None)
    return [label, mine[0]["backend_label"], number(shown.get("tokens_per_s")), number(best.get("tokens_per_s")),
            best_at(best) if finite(best.get("tokens_per_s")) else DASH, number(shown.get("ttft_s"), 3),
            number(shown.get("tpot_p50_s"), 2, 1000), number(shown.get("latency_p50_s"), 3), quality_label(quality)]


def side_by_side_tables(measurements: list[dict[str, Any]]) -> list[Table]:
    """Per model: one row per (hardware, backend), local and served together (see the module doc)."""
    ids = hardware_ids(measurements)
    tables = []
    for model in dict.fromkeys(m["model"] for m in measurements):
        mine = [m for m in measurements if m["model"] == model]
        keys = list(dict.fromkeys((m["hardware_id"], m["backend_label"]) for m in mine))
        labels = {m["hardware_id"]: m["hardware_label"] for m in mine}
        keys.sort(key=lambda key: labels[key[0]])  # the same accelerator's rows together
        rows = [side_by_side_row(f"{ids[h]} {labels[h]}", [m for m in mine if (m["hardware_id"], m["backend_label"])
                                                           == (h, b)]) for h, b in keys]
        tables.append(Table(f"Local and served: {model} by hardware and backend", SIDE_BY_SIDE, rows, settings=[
            "single stream: local, the batch-1 record of kv_cache/greedy decoding (else the fastest batch-1 "
            "variant); served, the concurrency-1 record (else the lowest concurrency); TTFT, TPOT and e2e latency "
            "are that record's p50",
            "local TPOT = (latency p50 − TTFT p50) / (gen_length − 1); a local DLM's TTFT is its first "
            "denoising step",
            "tok/s are output tokens/s: of every row of a local batch, of every concurrent request of a served load"]))
    return tables


def serving_tables(measurements: list[dict[str, Any]]) -> list[Table]:
    """Every served measurement, one table per server hardware fingerprint."""
    ids = hardware_ids(measurements)
    tables = []
    for hid, name in ids.items():
        mine = [m for m in measurements if m["hardware_id"] == hid and not is_local(m)]
        if not mine:
            continue
        rows = [[m["model"], m["backend_label"], m["variant"], load_label(m["setting"], load=False)] +
                [number(m.get(key), digits, scale) for key, _, digits, scale in SERVING] +
                [str(m.get("stream_unit") or DASH), quality_label(m["quality"])] for m in mine]
        endpoints = ", ".join(dict.fromkeys(str(m.get("endpoint") or DASH) for m in mine))
        runs = ", ".join(dict.fromkeys(m["run_id"] for m in mine))
        tables.append(Table(f"Serving measurements on {name}: {mine[0]['hardware_label']}",
                            ["Model", "Backend", "Variant", "Requests"] + [label for _, label, _, _ in SERVING] +
                            ["Stream unit", "Quality"], rows, settings=[
                                "ITL is the time between streamed chunks of the stream unit: a token from an AR "
                                "server; from a DLM endpoint a block or the whole canvas (tok/chunk > 1), so its "
                                "ITL is per chunk, not per token",
                                f"endpoints: {endpoints}; runs: {runs}"]))
    return tables
