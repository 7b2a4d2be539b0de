"""The run and task tables: leaderboards (one per suite), every (run, task, metric), the runs reported.

Values are shown in their metric's unit (``Cell.spec``): fractions x100 with "%" in the column
settings, perplexities and bits as they are.
"""
from __future__ import annotations

import string
from datetime import datetime
from typing import Any

from harness.report import Footnotes, Link, Table
from harness.report.collect import Cell, hardware_label, model_name, versions
from harness.report.format import DASH, fmt, option, se_digits, shown

SHOWN_OPTIONS = ("num_fewshot", "n_shot", "fewshot", "length", "oracle_slack", "script", "leading_space",
                 "diffusion_steps", "max_input_tokens", "timeout_s", "allow_code_exec")


def column_settings(cells: list[Cell]) -> str:
    """metric (with its unit), n, n-shot and length protocol of one column."""
    first = cells[0]
    ns = sorted({c.n for c in cells})
    length = first.options.get("length")
    if length == "oracle" and first.options.get("oracle_slack"):
        length = f"oracle+{first.options['oracle_slack']}"
    return " · ".join([first.spec.label, "n=" + "/".join(map(str, ns)), f"{first.n_shot}-shot"] +
                      ([f"length {length}"] if length else []) + [arrow(first.spec)] * bool(arrow(first.spec)))


def options_line(label: str, cells: list[Cell]) -> str | None:
    """The column's other task options, for the table's settings list."""
    extra = [f"{k}={option(v)}" for k, v in sorted(cells[0].options.items()) if v is not None and k not in SHOWN_OPTIONS]
    return f"{label} options: {', '.join(extra)}" if extra else None


def primary(cells: list[Cell]) -> list[Cell]:
    """Each (run, task)'s primary metric (its spec says which), the one shown in leaderboards; the
    first metric where the primary one has no value or no spec declares one (an old store)."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.run_id, cell.task), []).append(cell)
    return [next((c for c in group if c.spec.primary), group[0]) for group in groups.values()]


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


def arrow(spec) -> str:
    return {True: "↑ higher is better", False: "↓ lower is better"}.get(spec.higher_is_better, "")


def suite_title(suite: str) -> str:
    return f"Suite {suite}" if suite else "Runs without a suite"


def leaderboards(cells: list[Cell], link: bool = False) -> list[Table]:
    """Per suite: a models x tasks table of each task's primary metric."""
    return [leaderboard(primary([c for c in cells if c.suite == suite]), suite_title(suite), link)
            for suite in dict.fromkeys(c.suite for c in cells)]


def metric_boards(cells: list[Cell], link: bool = False) -> list[Table]:
    """Per suite with more metrics than tasks: every (task, metric), collapsed (one click away)."""
    suites = {suite: [c for c in cells if c.suite == suite] for suite in dict.fromkeys(c.suite for c in cells)}
    return [leaderboard(mine, f"{suite_title(suite)}: every metric", link, every=True)
            for suite, mine in suites.items() if len(mine) > len(primary(mine))]


def boards(cells: list[Cell], link: bool = False) -> list[Table]:
    """Each suite's leaderboard followed by its every-metric table."""
    every = {t.title.removesuffix(": every metric"): t for t in metric_boards(cells, link)}
    return [t for board in leaderboards(cells, link) for t in (board, every.get(board.title)) if t is not None]


def leaderboard(cells: list[Cell], title: str, link: bool = False, every: bool = False) -> Table:
    """One row per model configuration; a column per task variant (``every``: per variant and metric)."""
    labels = variant_labels(cells)
    columns = list(dict.fromkeys((c.variant, c.metric) for c in cells))
    notes = Footnotes()
    rows: dict[str, dict[tuple, Cell]] = {}
    marks: dict[tuple, str] = {}
    for cell in cells:  # oldest first, so a newer run of the same configuration replaces it
        previous = rows.setdefault(cell.config_key, {}).get((cell.variant, cell.metric))
        if previous is not None:
            marks[(cell.config_key, cell.variant)] = " " + notes.ref(
                f"{cell.model} {labels[cell.variant]}: run {cell.run_id} replaces the older identical "
                f"configuration {previous.run_id}")
        rows[cell.config_key][(cell.variant, cell.metric)] = cell
    body = [row_of(by_column, columns, marks, notes, link) for by_column in rows.values()]
    by_column = {col: [c for c in cells if (c.variant, c.metric) == col] for col in columns}
    settings = ["value ± standard error in the unit under each column (fractions in %), to the standard "
                "error's precision; ↑ higher is better, ↓ lower; how each row scored in its Scoring cell",
                f"versions: {'; '.join(sorted({c.versions for c in cells}))}"]
    settings += variant_lines(labels, cells)
    header = [labels[v] + (f" · {m}" if every else "") for v, m in columns]
    return Table(title, ["Model", "Family", "Scoring", "dtype", "Seed", *header], body, settings=settings,
                 subheader=["", "", "", "", ""] + [column_settings(by_column[col]) for col in columns],
                 notes=notes.listing(), collapsed=every)


def row_of(by_column: dict[tuple, Cell], columns: list[tuple], marks: dict[tuple, str], notes: Footnotes,
           link: bool) -> list[str | Link]:
    some = next(iter(by_column.values()))
    how = "; ".join(dict.fromkeys(c.scoring for c in by_column.values()))
    name = some.model + ("" if all(c.complete for c in by_column.values()) else
                         " " + notes.ref("run incomplete: fewer documents than planned"))
    model: str | Link = Link(name, f"runs/{some.run_id}.html") if link else name
    return [model, some.family, how, some.dtype, str(some.seed)] + [
        shown(c.spec, c.value, c.stderr) + marks.get((c.config_key, c.variant), "") if (c := by_column.get(col))
        else DASH for col in columns]


def variant_lines(labels: dict[tuple, str], cells: list[Cell]) -> list[str]:
    """What tells the lettered variants of a task apart, once, and each column's other options."""
    lines = [f"{labels[v]}: task hash {v[1][:8]}, first prompt {v[2][:8]}" for v in labels if labels[v] != v[0]]
    if lines:
        lines.insert(0, "a task scored with other data, options or prompts gets lettered columns; runs that "
                        "differ only in their number of documents (--limit) share one")
    return lines + [line for v in labels if (line := options_line(labels[v], [c for c in cells if c.variant == v]))]


def results_table(cells: list[Cell]) -> Table:
    """Every (run, task, metric) with its provenance: the long form behind the leaderboards."""
    rows = [[c.run_id, c.model, c.task, c.metric, c.spec.unit, fmt(c.value, None, 1, se_digits(c.stderr, 4)),
             fmt(c.stderr, None, 1, se_digits(c.stderr, 4)),
             str(c.n), c.scoring, c.task_hash[:8], c.prompt_hash[:8]] for c in cells]
    return Table("Every (run, task, metric)", ["Run", "Model", "Task", "Metric", "Unit", "Value", "Stderr", "n",
                                               "Scoring", "Task hash", "Prompt hash"], rows,
                 settings=["raw values as stored, in each metric's unit (fractions not x100)"], collapsed=True)


def runs_table(runs: list[dict[str, Any]], link: bool = False) -> Table:
    rows = []
    for run in runs:
        hw = hardware_label(run["env"].get("hardware") or {})
        run_id = Link(run["run_id"], f"runs/{run['run_id']}.html") if link else run["run_id"]
        rows.append([run_id, model_name(run), run["kind"], run["status"],
                     datetime.fromtimestamp(run["created_at"]).strftime("%Y-%m-%d %H:%M"), hw, versions(run)])
    return Table("Runs reported", ["Run", "Model", "Kind", "Status", "Created", "Hardware", "Versions"], rows)
