"""Metric facts as data: every task's specs, units and direction in every report view, old stores.

The WikiText-2 runs are written straight into a Store with the ``wikitext2`` task's own specs and
per-article [log-likelihood, words/bytes] records, at realistic perplexities (GPT-2 small about
37 word perplexity, medium about 27, a DiffuGPT ELBO bound above both).
"""
import json
import math
import sqlite3

import numpy as np
import pytest

from conftest import DATA_DIR
from harness.catalog import catalog
from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.registry import import_string
from harness.report.collect import collect_cells
from harness.report.commands import build_sections
from harness.report.compare import dlm_vs_ar, paired, paired_table
from harness.report.markdown import render_markdown
from harness.report.reference import known_parents, load_papers
from harness.report.tables import leaderboards, results_table
from harness.scoring.metric import UNITS, Metric, Metrics, fraction_metrics
from harness.scoring.metrics import AGGREGATIONS, aggregate, aggregation
from harness.store import SCHEMA_VERSION, Store
from harness.tasks.base import OUTPUT_TYPES
from harness.tasks.infilling import CodeTask
from harness.tasks.perplexity import WikiText
from test_reports import AR_FP, DLM_FP, ENV, add_eval_run

ARTICLES = 20
BYTES_PER_WORD = 6.6  # WikiText-2 test: ~1.7 byte perplexity at ~37 word perplexity
WORD_PPL = {"gpt2": 37.4, "gpt2-medium": 26.8, "diffugpt-s": 44.1}


def add_wikitext_run(store: Store, model: str, fingerprint: dict) -> str:
    run_id = f"{model}-wt2-{stable_hash([model, fingerprint])[:8]}"
    store.start_run(run_id, model=model, config={"model": model, "tasks": ["wikitext2"], "suite": "perplexity",
                                                 "seed": 1234, "model_args": {}},
                    fingerprint={**fingerprint, "name": model, "weights": model}, env=ENV, output_dir="")
    rng = np.random.default_rng(int(stable_hash(model), 16))
    items = []
    for doc_id in range(ARTICLES):
        words = int(rng.integers(800, 3000))
        size = round(words * BYTES_PER_WORD)
        logprob = -words * math.log(WORD_PPL[model]) * (1 + 0.05 * rng.standard_normal())
        arguments = [{"text": f"article {doc_id}", "window": 1024}]
        items.append((doc_id, {"word_perplexity": [logprob, words], "byte_perplexity": [logprob, size],
                               "bits_per_byte": [logprob, size]},
                      {"doc_id": doc_id, "arguments": arguments, "prompt_hash": stable_hash(arguments)}))
    store.add_records(run_id, "wikitext2", items)
    records = store.records(run_id, "wikitext2")
    store.set_task_result(run_id, "wikitext2", task_hash=stable_hash(["wikitext2", "v1"]),
                          prompt_hash=stable_hash([r["prompt_hash"] for _, _, r in records]), n=len(records),
                          metrics=aggregate([m for _, m, _ in records], WikiText.metrics),
                          settings={"task": "wikitext2", "version": 1, "options": {"window": 1024}},
                          specs=WikiText.metrics.to_list(), output_type=WikiText.output_type)
    store.finish_run(run_id)
    return run_id


@pytest.fixture()
def perplexity_store(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    ids = {model: add_wikitext_run(store, model, DLM_FP if model.startswith("diffu") else AR_FP)
           for model in WORD_PPL}
    return store, ids


def cell(cells, model, metric="word_perplexity"):
    return next(c for c in cells if c.model == model and c.metric == metric)


def test_wikitext_perplexity_is_shown_as_is_and_lower_wins(perplexity_store):
    store, ids = perplexity_store
    cells = collect_cells(store, store.runs())
    gpt2, medium, dlm = (cell(cells, m) for m in ("gpt2", "gpt2-medium", "diffugpt-s"))
    assert 30 < gpt2.value < 45 and 1.5 < cell(cells, "gpt2", "byte_perplexity").value < 2.0
    (board,) = leaderboards(cells)
    assert board.header[-1] == "wikitext2" and board.subheader[-1].startswith("word_perplexity · n=20")
    row = next(r for r in board.rows if r[0] == "gpt2")
    assert row[-1] == f"{gpt2.value:.1f} ± {gpt2.stderr:.1f}" and "%" not in board.subheader[-1]
    table = dlm_vs_ar(cells, known_parents(load_papers()))
    by = {(r[4], r[5]): r for r in table.rows}
    assert set(by) == {("gpt2", "parent"), ("gpt2-medium", "best AR")}  # the lowest perplexity is the best AR
    best = by[("gpt2-medium", "best AR")]
    assert best[1] == "word_perplexity" and best[7] == f"{medium.value:.1f} ± {medium.stderr:.1f}"
    assert best[8] == f"{dlm.value - medium.value:+.1f}"
    md = render_markdown("t", build_sections(store, store.runs()))
    assert "perplexity (%)" not in md and f"{gpt2.value * 100:.1f}" not in md
    assert f"{gpt2.value:.1f} ± {gpt2.stderr:.1f}" in md
    units = {r[3]: r[4] for r in results_table(cells).rows}
    assert units == {"word_perplexity": "perplexity", "byte_perplexity": "perplexity", "bits_per_byte": "bits"}


def test_paired_compare_aggregates_perplexity_by_its_spec(perplexity_store):
    store, ids = perplexity_store
    results, _ = paired(store, store.run(ids["gpt2"]), store.run(ids["gpt2-medium"]), resamples=200)
    word = next(r for r in results if r.metric == "word_perplexity")
    cells = collect_cells(store, store.runs())
    assert word.a == pytest.approx(cell(cells, "gpt2").value) and word.delta < 0 and word.significant
    row = next(r for r in paired_table(results, "a", "b").rows if r[0] == "wikitext2" and r[1] == "word_perplexity")
    assert row[3] == f"{word.a:.2f}"  # not x100, no "(%)"


def test_fractions_are_shown_x100_with_percent(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    a = add_eval_run(store, "gpt2", AR_FP, tasks=("piqa",), outcomes={"piqa": [1.0, 0.0, 0.0] * 20})
    b = add_eval_run(store, "diffugpt-s", DLM_FP, tasks=("piqa",), outcomes={"piqa": [1.0, 1.0, 0.0] * 20})
    results, _ = paired(store, store.run(a), store.run(b), resamples=100)
    rows = {r[1]: r for r in paired_table(results, a, b).rows}
    assert rows["acc_norm (%)"][3:6] == ["33.33", "66.67", "+33.33"]
    cells = collect_cells(store, store.runs())
    acc_norm = cell(cells, "gpt2", "acc_norm")
    assert acc_norm.spec.label == "acc_norm (%)" and acc_norm.spec.scale == 100
    (board,) = leaderboards(cells)
    assert board.subheader[-1].startswith("acc (%)")
    (row,) = dlm_vs_ar(cells, known_parents(load_papers())).rows
    assert row[1] == "acc (%)" and row[6].startswith("66.7 ± ") and row[8] == "+33.3"


def registered_tasks():
    for name in catalog().tasks:
        code = issubclass(import_string(catalog().tasks.get(name).builder), CodeTask)
        yield name, catalog().task(name, DATA_DIR, {"allow_code_exec": True} if code else None)


def test_every_registered_task_declares_one_primary_metric_with_known_unit_and_aggregation():
    tasks = dict(registered_tasks())
    assert {"piqa", "wikitext2", "lambada_openai"} <= set(tasks)
    for name, task in tasks.items():
        specs = task.metric_specs()
        assert isinstance(task.metrics, Metrics) and specs, name
        assert sum(spec.primary for spec in specs) == 1, name
        assert task.output_type in OUTPUT_TYPES, name
        for spec in specs:
            assert spec.unit in UNITS and spec.aggregation in AGGREGATIONS, (name, spec)
            assert isinstance(spec.higher_is_better, bool), (name, spec)
            assert Metric.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    wikitext = tasks["wikitext2"].metrics
    assert wikitext.primary.name == "word_perplexity" and not any(wikitext.higher_is_better.values())
    assert {s.unit for s in wikitext.values()} == {"perplexity", "bits"}
    assert tasks["lambada_openai"].metrics["perplexity"].unit == "perplexity"


def test_specs_are_checked_and_a_new_aggregation_is_one_function():
    with pytest.raises(HarnessError, match="unknown unit"):
        Metric("acc", "mean", True, "percentage")
    with pytest.raises(HarnessError, match="unknown aggregation"):
        Metric("acc", "median", True, "fraction")
    with pytest.raises(HarnessError, match="exactly one"):
        Metrics(Metric("a", "mean", True, "fraction"), Metric("b", "mean", True, "fraction"))
    with pytest.raises(TypeError, match="Metrics"):
        type("Bad", (WikiText,), {"metrics": {"acc": "mean"}})

    @aggregation("test_maximum")
    def maximum(values):
        return float(np.max(values))

    spec = Metric("best", "test_maximum", True, "nats", primary=True)
    out = aggregate([{"best": 1.0}, {"best": 3.0}], [spec])
    assert out["best"] == 3.0 and out["best_stderr"] >= 0
    assert fraction_metrics("x", "y", primary="y").primary.name == "y"


OLD_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, created_at REAL NOT NULL, updated_at REAL NOT NULL, status TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'eval', model TEXT NOT NULL, config TEXT NOT NULL, model_fingerprint TEXT NOT NULL,
    env TEXT NOT NULL, output_dir TEXT);
CREATE TABLE task_results (run_id TEXT NOT NULL REFERENCES runs(run_id), task TEXT NOT NULL, task_hash TEXT NOT NULL,
    prompt_hash TEXT NOT NULL, n INTEGER NOT NULL, metrics TEXT NOT NULL, settings TEXT NOT NULL,
    PRIMARY KEY (run_id, task));
CREATE TABLE records (run_id TEXT NOT NULL, task TEXT NOT NULL, doc_id INTEGER NOT NULL, metrics TEXT NOT NULL,
    record TEXT NOT NULL, PRIMARY KEY (run_id, task, doc_id));
CREATE TABLE measurements (run_id TEXT NOT NULL, seq INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (run_id, seq));
"""


def old_store(path):
    """A store as the harness wrote it before metric specs: a known task and an unknown one."""
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    results = {"gpt2": {"word_perplexity": 37.4, "legacy_perplexity": 12.0},
               "gpt2-medium": {"word_perplexity": 26.8, "legacy_perplexity": 9.0},
               "diffugpt-s": {"word_perplexity": 44.1, "legacy_perplexity": 15.0}}
    for i, (model, values) in enumerate(results.items()):
        fp = {**(DLM_FP if model.startswith("diffu") else AR_FP), "name": model}
        run_id = f"old-{model}"
        db.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (run_id, 1.7e9 + i, 1.7e9 + i, "complete", "eval", model,
                    json.dumps({"model": model, "tasks": ["wikitext2", "legacy_task"], "suite": "old", "seed": 1234}),
                    json.dumps(fp), json.dumps(ENV), ""))
        for task, metric in (("wikitext2", "word_perplexity"), ("legacy_task", "legacy_perplexity")):
            db.execute("INSERT INTO task_results VALUES (?,?,?,?,?,?,?)",
                       (run_id, task, "th-" + task, "ph-" + task, 20,
                        json.dumps({metric: values[metric], f"{metric}_stderr": 0.5}), json.dumps({"options": {}})))
    db.commit()
    db.close()


def test_an_old_store_opens_migrates_and_reports(tmp_path):
    path = tmp_path / "old.sqlite"
    old_store(path)
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {"metric_specs", "output_type"} <= store.columns("task_results")
    result = store.task_results("old-gpt2")["legacy_task"]
    assert result["specs"] is None and result["output_type"] is None and result["metrics"]["legacy_perplexity"] == 12.0
    cells = collect_cells(store, store.runs())
    # a task the catalog knows: its declared specs; an unknown one: shown as stored, no direction
    assert cell(cells, "gpt2").spec == WikiText.metrics["word_perplexity"]
    legacy = cell(cells, "gpt2", "legacy_perplexity").spec
    assert (legacy.unit, legacy.higher_is_better) == ("number", None)  # no guessing from the name
    (board,) = leaderboards(cells)
    assert next(r for r in board.rows if r[0] == "gpt2")[-2:] == ["37.4 ± 0.5", "12.0 ± 0.5"]
    table = dlm_vs_ar(cells, known_parents(load_papers()))
    relations = {(r[0], r[4], r[5]) for r in table.rows}
    assert ("wikitext2", "gpt2-medium", "best AR") in relations
    assert ("legacy_task", "gpt2", "parent") in relations and not any(r[0] == "legacy_task" and "best" in r[5]
                                                                      for r in table.rows)
    assert any("no best AR" in note for note in table.notes)
    assert "## Leaderboard" in render_markdown("old", build_sections(store, store.runs()))
    Store(path)  # opening again is a no-op
    store.set_task_result("old-gpt2", "wikitext2", task_hash="th", prompt_hash="ph", n=1, metrics={}, settings={},
                          specs=WikiText.metrics.to_list(), output_type="loglikelihood_rolling")
    assert store.task_results("old-gpt2")["wikitext2"]["specs"] == WikiText.metrics.to_list()
