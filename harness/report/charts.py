"""Figures of the evaluation: per suite, each model per task with error bars (DLM vs AR), and the
primary metric against diffusion steps or estimator samples, from runs that vary only those.

Values are in each metric's unit (``Cell.spec``); tasks of one suite share a figure when their
units do (all the percentages), else each metric gets its own. Every figure carries a table of
the same numbers.
"""
from __future__ import annotations

from harness.hashing import stable_hash
from harness.report import Figure, Table
from harness.report.collect import Cell
from harness.report.format import fmt
from harness.report.plots import png, pyplot
from harness.report.tables import primary, variant_labels

KNOBS = {"steps": ("sampler", "diffusion steps", "steps"), "samples": ("estimator", "estimator samples", "×")}


def latest_rows(cells: list[Cell]) -> dict[str, dict[tuple, Cell]]:
    """{config: {variant: cell}}, a newer run of one configuration replacing an older one."""
    rows: dict[str, dict[tuple, Cell]] = {}
    for cell in cells:
        rows.setdefault(cell.config_key, {})[cell.variant] = cell
    return rows


def series_names(rows: dict[str, dict[tuple, Cell]]) -> dict[str, str]:
    firsts = {key: next(iter(row.values())) for key, row in rows.items()}
    models = [c.model for c in firsts.values()]
    return {key: f"{c.family} {c.model}" + (f" ({c.scoring})" if models.count(c.model) > 1 else "")
            for key, c in firsts.items()}


def suite_figures(cells: list[Cell], suite: str) -> list[Figure]:
    """Each model's primary metric per task of one suite, ± one standard error."""
    cells = primary(cells)
    labels = variant_labels(cells)
    groups: dict[str, list[tuple]] = {}
    for variant in labels:
        spec = next(c.spec for c in cells if c.variant == variant)
        groups.setdefault("%" if spec.percent else spec.label, []).append(variant)
    rows = latest_rows(cells)
    return [bars(rows, variants, labels, suite, unit) for unit, variants in groups.items()]


def bars(rows: dict[str, dict[tuple, Cell]], variants: list[tuple], labels: dict[tuple, str], suite: str,
         unit: str) -> Figure:
    plt = pyplot()
    names = series_names(rows)
    fig, ax = plt.subplots(figsize=(max(4.8, 1.1 * len(variants) + 2.4), 3.6))
    width = 0.8 / len(rows)
    for k, (key, row) in enumerate(rows.items()):
        got = [(i, row[v]) for i, v in enumerate(variants) if v in row]
        ax.bar([i + k * width for i, _ in got], [c.value * c.spec.scale for _, c in got], width, label=names[key],
               yerr=[(c.stderr or 0) * c.spec.scale for _, c in got], capsize=3, error_kw={"ecolor": "#808080"})
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(variants))],
                  [labels[v] for v in variants], rotation=20 if len(variants) > 4 else 0, ha="right"
                  if len(variants) > 4 else "center", fontsize=8)
    metrics = list(dict.fromkeys(next(c.spec.label for r in rows.values() for c in r.values() if c.variant == v)
                                 for v in variants))
    ax.set_ylabel(", ".join(metrics) if unit != "%" else "primary metric (%)")
    ax.legend(frameon=False, fontsize=8)
    title = f"{suite}: DLM vs AR per task"
    header = ["Task", "Metric"] + [names[key] for key in rows]
    body = [[labels[v], next(c.spec.label for r in rows.values() for c in r.values() if c.variant == v)] +
            [fmt(r[v].value, r[v].stderr, r[v].spec.scale) if v in r else "–" for r in rows.values()]
            for v in variants]
    ns = ", ".join(f"{labels[v]} n={'/'.join(sorted({str(r[v].n) for r in rows.values() if v in r}))}" for v in variants)
    how = "; ".join(f"{names[key]}: {'; '.join(dict.fromkeys(c.scoring for c in row.values()))}, "
                    f"{next(iter(row.values())).dtype}" for key, row in rows.items())
    return Figure(f"tasks-{stable_hash([suite, unit])[:8]}", title, png(fig),
                  f"Primary metric of each task ± one standard error. {ns}. Scoring: {how}.",
                  Table(title, header, body))


def knob_figures(cells: list[Cell]) -> list[Figure]:
    """Primary metric against diffusion steps and against estimator samples, where runs vary them."""
    figures = []
    for knob, (part, axis, marker) in KNOBS.items():
        curves: dict[tuple, dict[float, Cell]] = {}
        for c in primary(cells):
            value = (c.fingerprint.get(part) or {}).get(knob)
            if c.family != "DLM" or not isinstance(value, (int, float)) or marker not in c.scoring:
                continue
            rest = {k: v for k, v in c.fingerprint.items() if k not in ("batch_size", "device", "seed")}
            rest[part] = {k: v for k, v in (rest.get(part) or {}).items() if k != knob}
            curves.setdefault((c.variant, c.model, stable_hash(rest)), {})[value] = c
        curves = {key: curve for key, curve in curves.items() if len(curve) > 1}
        for variant in dict.fromkeys(key[0] for key in curves):
            figures.append(knob_figure({k: v for k, v in curves.items() if k[0] == variant}, knob, axis))
    return figures


def knob_figure(curves: dict[tuple, dict[float, Cell]], knob: str, axis: str) -> Figure:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    some = next(iter(next(iter(curves.values())).values()))
    rows = []
    for (_, model, _), curve in curves.items():
        xs = sorted(curve)
        ax.errorbar(xs, [curve[x].value * some.spec.scale for x in xs], capsize=3, marker="o", ms=4, label=model,
                    yerr=[(curve[x].stderr or 0) * some.spec.scale for x in xs])
        rows += [[model, f"{x:g}", fmt(curve[x].value, curve[x].stderr, some.spec.scale), str(curve[x].n),
                  curve[x].run_id] for x in xs]
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"{axis} (log scale)")
    ax.set_ylabel(f"{some.task} {some.spec.label}")
    ax.legend(frameon=False, fontsize=8)
    title = f"{some.task}: {some.spec.label} against {axis}"
    return Figure(f"{knob}-{some.task}-{stable_hash(some.variant)[:8]}", title, png(fig),
                  f"Runs that differ only in their {axis}; ± one standard error; n={some.n}; scoring of the "
                  f"first: {some.scoring}.", Table(title, ["Model", axis, some.spec.label, "n", "Run"], rows))
