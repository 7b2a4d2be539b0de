"""Published numbers (harness/resources/papers/*.yaml) and the reproduction view: harness vs paper, cell by cell.

A paper file maps its row names to harness model cards and its columns to harness tasks and
metrics; each published cell becomes a ``Reference`` carrying its source and protocol notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import PAPERS_DIR, read_yaml
from harness.errors import HarnessError
from harness.report import Footnotes, Table
from harness.report.collect import Cell
from harness.report.format import DASH, fmt
from harness.hashing import stable_hash

KEYS = {
    "paper": {"paper", "short", "venue", "arxiv", "models", "parents", "facts", "tables"},
    "table": {"table", "unit", "tolerance", "notes", "match", "columns", "rows"},
    "column": {"notes", "tasks", "measurement", "protocol", "match", "unit"},
    "row": {"model", "setting", "match", "protocol", "values"},
    "value": {"value", "prefix_only", "earlier", "note"},
    "task": {"metric", "n", "note"},
}


@dataclass
class Reference:
    source: str  # paper, arXiv id, table
    model: str  # the paper's row name (+ setting)
    harness: str | None  # harness model card name
    column: str
    value: float | None
    shown: str  # the cell as printed in the paper
    unit: str
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    measurement: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    tolerance: float | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    match: bool = True


@dataclass
class Match:
    reference: Reference
    model: str  # harness model
    what: str  # harness task and metric, or measurement and hardware
    run_id: str
    ours: float  # in the reference's unit
    stderr: float | None
    n: int | None
    notes: list[str]
    seed: Any = None
    group: str = ""  # runs that differ only in their seed share it
    seed_values: list[float] = field(default_factory=list)  # per seed, once pooled

    @property
    def spread(self) -> str:
        if len(self.seed_values) < 2:
            return DASH
        return f"{len(self.seed_values)} seeds: {min(self.seed_values):.1f}–{max(self.seed_values):.1f}"

    @property
    def delta(self) -> float:
        return self.ours - self.reference.value

    @property
    def verdict(self) -> str:
        d, se, tol = abs(self.delta), self.stderr, self.reference.tolerance
        if se and d <= se:
            return "within 1 SE"
        if se and d <= 2 * se:
            return "within 2 SE"
        if tol is not None and d <= tol:
            return f"within ±{tol:g}"
        return "outside" if se or tol is not None else "no SE or tolerance"


def check(data: Any, kind: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise HarnessError(f"{where}: expected a mapping for a {kind}")
    unknown = sorted(set(data) - KEYS[kind])
    if unknown:
        raise HarnessError(f"{where}: unknown {kind} key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(KEYS[kind]))})")
    return data


def load_papers(folder: Path = PAPERS_DIR) -> list[dict[str, Any]]:
    papers = []
    for path in sorted(folder.glob("*.yaml")):
        paper = check(read_yaml(path), "paper", str(path))
        for key in ("paper", "arxiv"):
            if not paper.get(key):
                raise HarnessError(f"{path}: missing required key '{key}'")
        papers.append({**paper, "path": str(path)})
    return papers


def known_parents(papers: list[dict[str, Any]]) -> dict[str, str]:
    """Harness DLM name -> harness AR name, from the papers' adaptation pairs."""
    out = {}
    for paper in papers:
        models = paper.get("models") or {}
        for child, parent in (paper.get("parents") or {}).items():
            if models.get(child) and models.get(parent):
                out[models[child]] = models[parent]
    return out


def references(papers: list[dict[str, Any]]) -> list[Reference]:
    out = []
    for paper in papers:
        models = paper.get("models") or {}
        for t, table in enumerate(paper.get("tables") or []):
            where = f"{paper['path']}: tables[{t}]"
            check(table, "table", where)
            source = f"{paper['paper']} ({paper.get('short', '')}), arXiv {paper['arxiv']}, {table.get('table', '')}"
            columns = {name: check(spec, "column", f"{where} column '{name}'")
                       for name, spec in (table.get("columns") or {}).items()}
            for r, row in enumerate(table.get("rows") or []):
                check(row, "row", f"{where} rows[{r}]")
                name = row.get("model", "?") + (f" ({row['setting']})" if row.get("setting") else "")
                for column, raw in (row.get("values") or {}).items():
                    if column not in columns:
                        raise HarnessError(f"{where} rows[{r}]: value for unknown column '{column}'")
                    out.append(reference(source, name, models.get(row.get("model")), column, raw, table,
                                         columns[column], row, f"{where} rows[{r}] '{column}'"))
    return out


def reference(source: str, name: str, harness: str | None, column: str, raw: Any, table: dict, spec: dict,
              row: dict, where: str) -> Reference:
    cell = check(raw, "value", where) if isinstance(raw, dict) else {"value": raw}
    value = cell.get("value")
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    shown = f"({value})" if cell.get("prefix_only") else str(value)
    notes = list(table.get("notes") or []) + list(spec.get("notes") or []) + ([cell["note"]] if cell.get("note") else [])
    protocol = {**(spec.get("protocol") or {}), **(row.get("protocol") or {})}
    if cell.get("prefix_only"):
        notes.append("Paper's AR number saw the prefix only (no suffix), as the harness's infill_mode=prefix.")
        protocol["infill_mode"] = "prefix"
    if cell.get("earlier") is not None:
        notes.append(f"An earlier arXiv version of the paper reported {cell['earlier']} for this cell.")
    tasks = {task: check(t, "task", f"{where} task '{task}'") for task, t in (spec.get("tasks") or {}).items()}
    return Reference(source, name, harness, column, number, shown, spec.get("unit") or table.get("unit", ""),
                     tasks, spec.get("measurement"), notes, table.get("tolerance"), protocol,
                     all(x.get("match", True) for x in (table, spec, row)))


# ---- matching ---------------------------------------------------------------------------------
PROTOCOL_GETTERS = {  # a cell's value of each protocol setting; None where it does not apply
    "estimator": lambda c: (c.fingerprint.get("estimator") or {}).get("method") if c.family == "DLM" else None,
    "samples": lambda c: (c.fingerprint.get("estimator") or {}).get("samples") if c.family == "DLM" else None,
    "steps": lambda c: (c.fingerprint.get("sampler") or {}).get("steps") if c.family == "DLM" else None,
    "sampler": lambda c: (c.fingerprint.get("sampler") or {}).get("name") if c.family == "DLM" else None,
    "temperature": lambda c: (c.fingerprint.get("sampler") or {}).get("temperature") if c.family == "DLM" else None,
    "greedy": lambda c: (c.fingerprint.get("estimator") or {}).get("greedy") if c.family == "DLM" else None,
    "start_token": lambda c: c.fingerprint.get("start_token") if c.family == "DLM" else None,
    "infill_mode": lambda c: c.fingerprint.get("infill_mode") if c.family == "AR" else None,
    "n_shot": lambda c: c.n_shot,
}


def match_cells(ref: Reference, cells: list[Cell]) -> list[Match]:
    metrics: dict[tuple[str, str], list[str]] = {}
    for cell in cells:
        metrics.setdefault((cell.run_id, cell.task), []).append(cell.metric)
    out = []
    for cell in cells:
        spec = ref.tasks.get(cell.task)
        if spec is None or ref.harness not in cell.names:
            continue
        wanted = spec.get("metric") if isinstance(spec.get("metric"), list) else [spec.get("metric")]
        chosen = next((m for m in wanted if m in metrics[(cell.run_id, cell.task)]), None)
        if cell.metric != chosen:
            continue
        # x100 only where the paper reports % and the metric is stored as a fraction (ROUGE is x100 already)
        scale = 100 if ref.unit == "%" and cell.spec.unit == "fraction" else 1
        notes = list(ref.notes) + ([spec["note"]] if spec.get("note") else [])
        notes += [f"Harness {key} {PROTOCOL_GETTERS[key](cell)} ≠ paper {want}." for key, want in ref.protocol.items()
                  if key in PROTOCOL_GETTERS and PROTOCOL_GETTERS[key](cell) not in (None, want)]
        if spec.get("n") and cell.n < spec["n"]:
            notes.append(f"Harness scored {cell.n:,} of the {spec['n']:,} examples the paper used.")
        unseeded = {k: v for k, v in cell.fingerprint.items() if k not in ("batch_size", "device", "seed")}
        out.append(Match(ref, cell.model, f"{cell.task} {cell.metric}", cell.run_id, cell.value * scale,
                         None if cell.stderr is None else cell.stderr * scale, cell.n, notes, cell.seed,
                         stable_hash([cell.model, unseeded, cell.task_hash, cell.n])))
    return out


def pool_over_seeds(matches: list[Match]) -> list[Match]:
    """One match per (published cell, harness setting): the mean over the runs that differ only in
    their seed, with the spread over seeds. The standard error is the mean of the runs' own (the
    seeds share the documents, so averaging seeds does not shrink the sampling error over them)."""
    groups: dict[tuple, list[Match]] = {}
    for m in matches:
        groups.setdefault((id(m.reference), m.group or m.run_id), []).append(m)
    pooled = []
    for members in groups.values():
        seeds = {m.seed for m in members}
        if len(members) < 2 or len(seeds) < len(members):
            pooled.extend(members)
            continue
        values = [m.ours for m in members]
        errors = [m.stderr for m in members if m.stderr is not None]
        first = members[0]
        pooled.append(Match(first.reference, first.model, first.what, ", ".join(m.run_id for m in members),
                            sum(values) / len(values), sum(errors) / len(errors) if errors else None, first.n,
                            first.notes, sorted(seeds, key=str), first.group, values))
    return pooled


def match_measurements(ref: Reference, measurements: list[dict[str, Any]]) -> list[Match]:
    spec = ref.measurement or {}
    out = []
    for m in measurements:
        value = m.get(spec.get("key", ""))
        wanted = (spec.get("setting") or {}).items()
        if m["model"] != ref.harness or not isinstance(value, (int, float)) or \
                any(m["setting"].get(k) != v for k, v in wanted):
            continue
        out.append(Match(ref, m["model"], f"{spec['key']} on {m['hardware_label']}", m["run_id"], float(value),
                         None, None, list(ref.notes)))
    return out


def reproduction(refs: list[Reference], cells: list[Cell], measurements: list[dict[str, Any]]) -> tuple[Table, list[Match]]:
    """Every published cell with a harness measurement: delta, verdict and protocol differences."""
    matchable = [r for r in refs if r.match and r.harness and r.value is not None]
    matches = pool_over_seeds([m for r in matchable for m in (match_measurements(r, measurements) if r.measurement
                                                              else match_cells(r, cells))])
    notes = Footnotes()
    rows = [[m.model, m.what, DASH if m.n is None else f"{m.n:,}", fmt(m.ours, m.stderr), m.spread, m.reference.model,
             m.reference.column, notes.ref(m.reference.source), f"{m.reference.shown} {m.reference.unit}".rstrip(),
             f"{m.delta:+.1f}", m.verdict, notes.refs(m.notes), m.run_id] for m in matches]
    covered = len({id(m.reference) for m in matches})
    return Table("Harness numbers next to published ones", ["Model", "Harness task", "n", "Harness", "Over seeds",
                                                             "Paper model",
                                                             "Paper column", "Source", "Paper", "Δ", "Verdict", "Notes",
                                                             "Run"], rows,
                 settings=[f"{covered} of {len(matchable)} matchable published cells have a harness measurement",
                           "harness fractions (by their metric spec's unit) x100 where the paper reports %; "
                           "Δ = harness − paper",
                           "runs that differ only in their seed are pooled: the mean, its spread over seeds, "
                           "and the runs' mean standard error",
                           "verdict: |Δ| within 1 or 2 standard errors of the harness value, else within the "
                           "paper file's stated tolerance"],
                 notes=notes.listing()), matches


def facts_table(papers: list[dict[str, Any]]) -> Table:
    """The cited sources with their reference tables and text-only facts."""
    rows = []
    for paper in papers:
        tables = ", ".join(t.get("table", "?") for t in paper.get("tables") or []) or DASH
        facts = " ".join(paper.get("facts") or []) or DASH
        rows.append([f"{paper['paper']} ({paper.get('short', '')})", str(paper["arxiv"]), tables, facts])
    return Table("Reference sources (harness/resources/papers)", ["Paper", "arXiv", "Tables as data", "Facts"], rows,
                 collapsed=True)


def unreachable_table(refs: list[Reference], cells: list[Cell]) -> Table:
    """Published cells of the reported models that the harness cannot reproduce, with the reason."""
    names = {name for c in cells for name in c.names}
    rows = []
    for r in refs:
        if r.harness not in names or (r.match and r.value is not None):
            continue
        why = "the paper file marks it not matchable" if not r.match else "the paper prints no number"
        rows.append([r.model, r.column, f"{r.shown} {r.unit}".rstrip(), f"not reproducible here: {why}",
                     " ".join(r.notes) or DASH, r.source])
    return Table("Published cells not reproducible here", ["Paper model", "Paper column", "Paper", "Why", "Notes",
                                                           "Source"], rows, collapsed=True)
