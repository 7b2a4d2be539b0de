"""Speed-quality figures from throughput measurements that carry a ``quality`` dict (matplotlib, Agg).

Pareto plots are drawn per accelerator (its hardware label: tokens/s from different GPUs never
share axes), local and served points together, one series per model, backend label ("HF eager",
"vLLM (served)", ...) and variant; steps-vs-quality curves pool hardware, since quality does not
depend on it. The tokens/s-across-hardware bars are of local measurements. The quality axis
is in the metric's unit and the Pareto front follows its direction, both from the metric spec that
``collect_measurements`` attached to each quality dict; a metric without a declared direction gets
no front.
"""
from __future__ import annotations

import io
import itertools
from typing import Any

from harness.report import Figure, Table
from harness.report.format import finite, fmt, number
from harness.report.hardware import hardware_ids, is_local


GREY = "#808080"  # text and axes that read on a light page, a dark page and paper
STYLE = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
         "grid.alpha": 0.35, "grid.color": GREY, "figure.dpi": 110, "savefig.dpi": 150, "savefig.transparent": True,
         "figure.facecolor": "none", "axes.facecolor": "none", "text.color": GREY, "axes.labelcolor": GREY,
         "axes.edgecolor": GREY, "xtick.color": GREY, "ytick.color": GREY, "legend.labelcolor": GREY}


def pyplot():
    """matplotlib's pyplot (Agg) in the report's style: transparent, mid-grey text, readable in both themes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def quality_points(measurements: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Measurements with a numeric quality value, grouped by (quality task, metric)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in measurements:
        q = m["quality"]
        if q and isinstance(q.get("value"), (int, float)):
            groups.setdefault((str(q.get("task", "?")), str(q.get("metric", "quality"))), []).append(m)
    return groups


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The points no other point beats in both speed and quality, by increasing speed."""
    sign = 1 if higher_is_better else -1
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -sign * p[1])):
        if sign * y > best:
            front.append((x, y))
            best = sign * y
    return sorted(front)


def speed_quality_figures(measurements: list[dict[str, Any]]) -> list[Figure]:
    groups = quality_points(measurements)
    if not groups:
        return []
    plt = pyplot()
    ids = hardware_ids(measurements)
    figures = []
    for (task, metric), points in groups.items():
        spec = points[0]["quality"]["spec"]
        unit, scale = f"{task} {spec.label}", spec.scale
        for label in dict.fromkeys(m["hardware_label"] for m in points):
            mine = [m for m in points if m["hardware_label"] == label and finite(m.get("tokens_per_s"))]
            if mine:
                names = ", ".join(ids[h] for h in dict.fromkeys(m["hardware_id"] for m in mine))
                figures.append(pareto_figure(plt, mine, task, metric, unit, scale, f"{names} {label}"))
        figures.append(steps_figure(plt, points, task, metric, unit, scale))
    return [f for f in figures if f is not None]


def pareto_figure(plt, points, task: str, metric: str, unit: str, scale: float, hardware: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    series = dict.fromkeys(series_of(m) for m in points)
    for key, marker in zip(series, itertools.cycle("osD^v<>p*h")):
        mine = [m for m in points if series_of(m) == key]
        ax.scatter([m["tokens_per_s"] for m in mine], [m["quality"]["value"] * scale for m in mine], marker=marker,
                   s=36, label=" · ".join(key), zorder=3)
        for m in mine:
            if point_label(m):
                ax.annotate(point_label(m), (m["tokens_per_s"], m["quality"]["value"] * scale),
                            textcoords="offset points", xytext=(4, 3), fontsize=7, color=GREY)
    direction = points[0]["quality"]["spec"].higher_is_better
    if direction is not None:
        front = pareto_front([(m["tokens_per_s"], m["quality"]["value"] * scale) for m in points], direction)
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color=GREY, lw=1, ls="--",
                label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("throughput (output tokens/s, log scale)")
    ax.set_ylabel(unit)
    ax.legend(frameon=False, fontsize=8)
    title = f"Speed vs quality: {task} on {hardware}"
    table = Table(title, ["Model", "Backend", "Variant", "Setting", "tokens/s", unit],
                  [[m["model"], m.get("backend_label", m["backend"]), m["variant"], m["setting_label"],
                    number(m["tokens_per_s"]), fmt(m["quality"]["value"], m["quality"].get("stderr"), scale)]
                   for m in points])
    return Figure(f"pareto-{task}-{metric}-{points[0]['hardware_id']}", title, png(fig),
                  "One series per model, backend (local or served) and decoding variant (sampler, cache, load); "
                  "each point one measured setting, labelled by its denoising steps (local) or its concurrency "
                  f"(served, cN); quality {unit} on n={points[0]['quality'].get('n', '?')}. "
                  "The dashed line is the Pareto front.", table)


def series_of(m: dict[str, Any]) -> tuple[str, ...]:
    """A speed-quality series: model, backend label and variant (a served load's variant is its setting)."""
    served = m.get("mode") == "served"
    return (m["model"], m.get("backend_label", m["backend"])) + (() if served else (m["variant"],))


def point_label(m: dict[str, Any]) -> str:
    """A point's label: its denoising steps (local), its concurrency or request rate (served)."""
    setting = m["setting"]
    if m.get("mode") == "served":
        concurrency = setting.get("max_concurrency")
        return f"c{concurrency}" if concurrency is not None else f"{setting.get('request_rate', '?')}/s"
    return str(setting["steps"]) if setting.get("steps") is not None else ""


def steps_figure(plt, points, task: str, metric: str, unit: str, scale: float) -> Figure | None:
    stepped = [m for m in points if isinstance(m["setting"].get("steps"), (int, float))]
    if not stepped:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key in dict.fromkeys((m["model"], m["variant"], m["setting"].get("gen_length")) for m in stepped):
        curve = {m["setting"]["steps"]: m["quality"]["value"] * scale for m in stepped
                 if (m["model"], m["variant"], m["setting"].get("gen_length")) == key}
        steps = sorted(curve)
        label = f"{key[0]} · {key[1]}" + (f" · len {key[2]}" if key[2] is not None else "")
        ax.plot(steps, [curve[s] for s in steps], marker="o", ms=4, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("denoising steps (log scale)")
    ax.set_ylabel(unit)
    ax.legend(frameon=False, fontsize=8)
    table = Table(f"Steps vs quality: {task}", ["Model", "Variant", "Setting", "Steps", unit],
                  [[m["model"], m["variant"], m["setting_label"], str(m["setting"]["steps"]),
                    fmt(m["quality"]["value"], m["quality"].get("stderr"), scale)] for m in stepped])
    return Figure(f"steps-{task}-{metric}", f"Steps vs quality: {task}", png(fig),
                  f"{unit} of each model, variant and generation length as the number of denoising steps grows "
                  "(all hardware pooled: quality does not depend on it).", table)


def hardware_figure(measurements: list[dict[str, Any]]) -> Figure | None:
    """Tokens/s of every local (model, variant, setting) on every hardware: horizontal bars, log scale."""
    timed = [m for m in measurements if is_local(m) and finite(m.get("tokens_per_s")) and m["tokens_per_s"] > 0]
    if not timed:
        return None
    ids = {h: name for h, name in hardware_ids(measurements).items() if any(m["hardware_id"] == h for m in timed)}
    latest = {(m["model"], m["variant"], m["setting_label"], m["hardware_id"]): m for m in timed}
    series = list(dict.fromkeys(key[:3] for key in latest))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.22 * len(series) * len(ids)))
    height = 0.8 / len(ids)
    for k, hid in enumerate(ids):
        values = [latest[s + (hid,)]["tokens_per_s"] if s + (hid,) in latest else 0 for s in series]
        label = f"{ids[hid]} {next(m['hardware_label'] for m in timed if m['hardware_id'] == hid)}"
        ax.barh([i + k * height for i in range(len(series))], values, height=height, label=label)
    ax.set_yticks([i + height * (len(ids) - 1) / 2 for i in range(len(series))],
                  [" · ".join(s[:2]) + f" · {s[2]}" for s in series], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("throughput (tokens/s, log scale)")
    ax.legend(frameon=False, fontsize=8)
    rows = [[*s, *(number(latest[s + (h,)]["tokens_per_s"]) if s + (h,) in latest else "–" for h in ids)]
            for s in series]
    title = "Tokens/s across hardware"
    table = Table(title, ["Model", "Variant", "Setting", *ids.values()], rows)
    return Figure("hardware-tokens-per-s", title, png(fig),
                  f"The latest local measurement of each model, decoding variant and setting on each of {len(ids)} "
                  "hardware fingerprint(s) (see Hardware fingerprints; served ones are under Serving "
                  "measurements).", table)
