"""Comparisons: DLM vs AR deltas on the leaderboard, and paired per-example deltas between two runs.

Units, directions and aggregations come from the metric specs stored with each task result
(``harness.report.specs`` says what an older store falls back to).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from harness.errors import HarnessError
from harness.report import Footnotes, Table
from harness.report.collect import Cell
from harness.report.format import DASH, fmt, shown
from harness.report.specs import result_specs
from harness.report.tables import primary, variant_labels
from harness.scoring.metric import Metric, undeclared
from harness.scoring.metrics import AGGREGATIONS
from harness.store import Store

SCORING_KEYS = ("backend", "estimator", "sampler", "infill_mode", "dtype")


# ---- DLM vs AR on aggregate numbers -----------------------------------------------------------
def dlm_vs_ar(cells: list[Cell], known_parents: dict[str, str]) -> Table:
    """Per task: each DLM against its AR parent (where known) and against the best AR model.

    Only cells of the same task variant (task and prompt hash) are paired; the difference counts
    as significant when |delta| exceeds twice the combined standard error. The best AR model is
    the best by the primary metric's declared direction (the lowest perplexity, the highest
    accuracy); a metric without a declared direction (an old store) gets no best AR.
    """
    cells = primary(cells)
    labels = variant_labels(cells)
    notes = Footnotes()
    rows = []
    for variant, label in labels.items():
        column = [c for c in cells if c.variant == variant]
        ars = [c for c in column if c.family == "AR"]
        dlms = [c for c in column if c.family == "DLM"]
        if dlms and not ars:
            notes.ref(f"{label}: no AR run scored this task the same way (same task and prompt hash); no delta")
            continue
        if not dlms:
            continue
        ranked = [a for a in ars if a.higher_is_better is not None]
        best = max(ranked, key=lambda c: c.spec.rank(c.value)) if ranked else None
        if best is None:
            notes.ref(f"{label}: {ars[0].metric} declares no direction (an older store), so no best AR")
        for dlm in dlms:
            parent_name = dlm.parent or known_parents.get(dlm.model)
            parent = next((a for a in ars if parent_name in a.names), None) if parent_name else None
            if parent is not None:
                rows.append(delta_row(dlm, parent, "parent" + (", best AR" if parent is best else ""), label))
            if best is not None and parent is not best:
                rows.append(delta_row(dlm, best, "best AR", label))
    return Table("Each DLM against its AR parent and the best AR model", ["Task", "Metric", "DLM", "DLM scoring", "AR", "AR is", "DLM value", "AR value", "Δ",
                               "2·SE(Δ)", "|Δ| > 2 SE", "DLM run"], rows,
                 settings=["Δ = DLM − AR on the same task variant; SE(Δ) = √(SE²_DLM + SE²_AR)",
                           "best AR: by the metric's declared direction (the lowest perplexity, the highest "
                           "accuracy); values in the metric's unit (fractions in %)",
                           "parents: from the run's base_model, else the papers' adaptation pairs (harness/resources/papers)"],
                 notes=notes.listing())


def delta_row(dlm: Cell, ar: Cell, relation: str, label: str) -> list[str]:
    spec = dlm.spec
    delta = dlm.value - ar.value
    combined = math.hypot(dlm.stderr, ar.stderr) if dlm.stderr is not None and ar.stderr is not None else None
    significant = DASH if combined is None else ("yes" if abs(delta) > 2 * combined else "no")
    return [label, spec.label, dlm.model, dlm.scoring, ar.model, relation,
            shown(spec, dlm.value, dlm.stderr), shown(spec, ar.value, ar.stderr), f"{delta * spec.scale:+.1f}",
            shown(spec, None if combined is None else 2 * combined), significant, dlm.run_id]


# ---- paired per-example comparison ------------------------------------------------------------
@dataclass
class Paired:
    task: str
    metric: str
    n: int
    a: float
    b: float
    delta: float  # b - a
    low: float
    high: float
    spec: Metric  # unit and aggregation of the metric

    @property
    def significant(self) -> bool:
        return not self.low <= 0.0 <= self.high


def statistic(spec: Metric) -> Callable[[np.ndarray], float]:
    """The metric's aggregate over one sample of examples, by its spec's aggregation."""
    return AGGREGATIONS.get(spec.aggregation).statistic


def bootstrap_ci(a: np.ndarray, b: np.ndarray, stat: Callable, resamples: int, seed: int,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of stat(b) - stat(a), resampling the pairs together."""
    rng = np.random.default_rng(seed)
    deltas = []
    for start in range(0, resamples, 100):
        idx = rng.integers(0, len(a), (min(100, resamples - start), len(a)))
        deltas.append([stat(b[i]) - stat(a[i]) for i in idx])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.concatenate(deltas), [tail, 100 - tail])
    return float(low), float(high)


def paired(store: Store, run_a: dict[str, Any], run_b: dict[str, Any], resamples: int = 1000,
           seed: int = 1234) -> tuple[list[Paired], list[str]]:
    """Deltas (B − A) per task and metric over the examples both runs scored, and warnings."""
    results_a, results_b = store.task_results(run_a["run_id"]), store.task_results(run_b["run_id"])
    tasks = [t for t in results_a if t in results_b]
    if not tasks:
        raise HarnessError(f"runs {run_a['run_id']} ({', '.join(results_a) or 'no tasks'}) and {run_b['run_id']} "
                           f"({', '.join(results_b) or 'no tasks'}) share no task")
    warnings = provenance_warnings(run_a, run_b)
    out = []
    for task in tasks:
        ra, rb = results_a[task], results_b[task]
        if ra["task_hash"] != rb["task_hash"]:
            warnings.append(f"{task}: task hashes differ ({ra['task_hash'][:8]} vs {rb['task_hash'][:8]}): "
                            "data, prompt template or options changed")
        records_b = {doc: (m, r) for doc, m, r in store.records(run_b["run_id"], task)}
        pairs = [(m, records_b[doc][0], r.get("prompt_hash") != records_b[doc][1].get("prompt_hash"))
                 for doc, m, r in store.records(run_a["run_id"], task) if doc in records_b]
        if ra["prompt_hash"] != rb["prompt_hash"] or len(pairs) != max(ra["n"], rb["n"]):
            differ = sum(flag for _, _, flag in pairs)
            warnings.append(f"{task}: prompt hashes differ (A n={ra['n']}, B n={rb['n']}, {len(pairs)} paired, "
                            f"{differ} paired examples with different prompts)")
        if pairs:
            specs = {**result_specs(task, rb), **result_specs(task, ra)}
            out += paired_metrics(task, [(ma, mb) for ma, mb, _ in pairs], specs, resamples, seed)
    if not out:
        raise HarnessError(f"runs {run_a['run_id']} and {run_b['run_id']} have no examples in common")
    return out, warnings


def usable(value: Any, spec: Metric) -> bool:
    """A per-example value the spec's aggregation takes: a number, or (a declared paired aggregation
    such as weighted perplexity) a list of numbers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return spec.higher_is_better is not None and isinstance(value, list) and bool(value) and \
        all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def paired_metrics(task: str, pairs: list[tuple[dict, dict]], specs: dict[str, Metric], resamples: int,
                   seed: int) -> list[Paired]:
    """One ``Paired`` per metric both runs' per-example records hold, aggregated by the metric's spec."""
    out = []
    for metric in [k for k in pairs[0][0] if k in pairs[0][1]]:
        spec = specs.get(metric) or undeclared(metric)
        values = [(ma[metric], mb[metric]) for ma, mb in pairs
                  if usable(ma.get(metric), spec) and usable(mb.get(metric), spec)]
        try:
            a, b = (np.array([v[side] for v in values], dtype=float) for side in (0, 1))
        except ValueError:  # ragged lists: not values this aggregation takes
            continue
        if not values or a.shape != b.shape:
            continue
        stat = statistic(spec)
        low, high = bootstrap_ci(a, b, stat, resamples, seed)
        out.append(Paired(task, metric, len(a), float(stat(a)), float(stat(b)), float(stat(b) - stat(a)), low, high,
                          spec))
    return out


def provenance_warnings(run_a: dict[str, Any], run_b: dict[str, Any]) -> list[str]:
    warnings = []
    fa, fb = run_a["model_fingerprint"], run_b["model_fingerprint"]
    changed = [f"{key} {json.dumps(fa.get(key))} vs {json.dumps(fb.get(key))}" for key in SCORING_KEYS
               if fa.get(key) != fb.get(key)]
    if changed:
        warnings.append(f"estimator/sampler settings differ (A vs B): {'; '.join(changed)}")
    pa, pb = run_a["env"].get("packages") or {}, run_b["env"].get("packages") or {}
    changed = [f"{name} {pa.get(name)} vs {pb.get(name)}" for name in sorted(set(pa) | set(pb))
               if pa.get(name) != pb.get(name)]
    if changed:
        warnings.append(f"package versions differ: {', '.join(changed)}")
    return warnings


def paired_table(results: list[Paired], run_a: str, run_b: str, confidence: float = 0.95) -> Table:
    rows = []
    for r in results:
        scale = r.spec.scale
        rows.append([r.task, r.spec.label, str(r.n), fmt(r.a, None, scale, 2),
                     fmt(r.b, None, scale, 2), f"{r.delta * scale:+.2f}",
                     f"[{r.low * scale:+.2f}, {r.high * scale:+.2f}]", "yes" if r.significant else "no"])
    return Table(f"Paired comparison: B {run_b} − A {run_a}",
                 ["Task", "Metric", "n", "A", "B", "Δ B−A", f"{confidence:.0%} CI", "excl. 0"], rows,
                 settings=["examples matched by task and doc_id; seeded percentile bootstrap over the pairs"])
