"""Speed-quality figures from throughput measurements that carry a ``quality`` dict (matplotlib, Agg).

Pareto plots are drawn per hardware fingerprint (tokens/s from different machines never share
axes); steps-vs-quality curves pool hardware, since quality does not depend on it. The quality axis
is in the metric's unit and the Pareto front follows its direction, both from the metric spec that
``collect_measurements`` attached to each quality dict; a metric without a declared direction gets
no front.
"""
from __future__ import annotations

import io
import itertools
from typing import Any

from harness.report import Figure
from harness.report.hardware import hardware_ids


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110, "savefig.dpi": 150})
    return plt


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
        for hid in dict.fromkeys(m["hardware_id"] for m in points):
            mine = [m for m in points if m["hardware_id"] == hid and isinstance(m.get("tokens_per_s"), (int, float))]
            if mine:
                figures.append(pareto_figure(plt, mine, task, metric, unit, scale, f"{ids[hid]} {mine[0]['hardware_label']}"))
        figures.append(steps_figure(plt, points, task, metric, unit, scale))
    return [f for f in figures if f is not None]


def pareto_figure(plt, points, task: str, metric: str, unit: str, scale: float, hardware: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    series = dict.fromkeys((m["model"], m["variant"]) for m in points)
    for (model, variant), marker in zip(series, itertools.cycle("osD^v<>p*h")):
        mine = [m for m in points if (m["model"], m["variant"]) == (model, variant)]
        ax.scatter([m["tokens_per_s"] for m in mine], [m["quality"]["value"] * scale for m in mine], marker=marker,
                   s=36, label=f"{model} · {variant}", zorder=3)
        for m in mine:
            if m["setting"].get("steps") is not None:
                ax.annotate(str(m["setting"]["steps"]), (m["tokens_per_s"], m["quality"]["value"] * scale),
                            textcoords="offset points", xytext=(4, 3), fontsize=7, color="0.35")
    direction = points[0]["quality"]["spec"].higher_is_better
    if direction is not None:
        front = pareto_front([(m["tokens_per_s"], m["quality"]["value"] * scale) for m in points], direction)
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="0.2", lw=1, ls="--",
                label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("throughput (tokens/s, log scale)")
    ax.set_ylabel(unit)
    ax.legend(frameon=False, fontsize=8)
    title = f"Speed vs quality: {task} on {hardware}"
    return Figure(f"pareto-{task}-{metric}-{points[0]['hardware_id']}", title, png(fig),
                  "Each point is one measured setting, labelled by its number of denoising steps.")


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
    return Figure(f"steps-{task}-{metric}", f"Steps vs quality: {task}", png(fig),
                  "Quality of each model/variant/generation length as the number of steps grows.")
