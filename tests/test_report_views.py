"""The report's newer views: readable numbers, checkpoint names and loss curves, steps curves,
every metric, paper cells out of reach, a wide leaderboard, and tables without matplotlib."""
import json
from dataclasses import replace

import pytest

from harness.report.collect import collect_cells
from harness.report.commands import NO_MATPLOTLIB, build_sections
from harness.report.format import fmt, number
from harness.report.reference import load_papers, references, unreachable_table
from harness.report.tables import leaderboards, metric_boards, results_table
from harness.scoring.metric import Metric, Metrics, fraction_metrics
from harness.store import Store
from harness.train.config import PRESETS, TrainConfig
from test_reports import AR_FP, DLM_FP, ENV

PPL = Metrics(Metric("word_perplexity", "mean", False, "perplexity", True))


def add_result_run(store, run_id, model, fingerprint, results, *, suite="", output_type="multiple_choice",
                   specs=None):
    """A run with aggregate results only: {task: (metrics, n)}."""
    specs = specs or fraction_metrics("acc", "acc_norm")
    store.start_run(run_id, model=model, config={"model": model, "tasks": list(results), "suite": suite,
                                                 "seed": 1234, "limit": None, "model_args": {}},
                    fingerprint={"name": model, "weights": model, **fingerprint}, env=ENV, output_dir="")
    for task, (metrics, n) in results.items():
        store.set_task_result(run_id, task, task_hash=f"{task}-v1", prompt_hash=f"{task}-prompts", n=n,
                              metrics=metrics, settings={"task": task, "version": 1, "options": {}},
                              specs=specs.to_list(), output_type=output_type)
    store.finish_run(run_id)
    return run_id


def wide_store(path, n_runs=30, n_tasks=20):
    """A synthetic leaderboard of ``n_runs`` AR runs x ``n_tasks`` tasks, run i scoring (i + t) % 97 / 100."""
    store = Store(path)
    for i in range(n_runs):
        results = {f"task_{t:02d}": ({"acc": ((i + t) % 97) / 100, "acc_stderr": 0.012, "acc_norm": 0.5,
                                      "acc_norm_stderr": 0.01}, 400) for t in range(n_tasks)}
        add_result_run(store, f"run-{i:02d}", f"model-{i:02d}", AR_FP, results, suite="wide")
    return store


def test_a_stderr_of_1e19_prints_as_a_readable_number(tmp_path):
    assert fmt(3.2e19, 1e19) == "3.2e19 ± 1.0e19" and fmt(1e19) == "1.0e19" and number(2.5e12) == "2.5e12"
    assert fmt(0.25, 0.112, 100) == "25.0 ± 11.2" and fmt(0.25, 0.0012, 100) == "25.00 ± 0.12" and fmt(0.077, 0.026, 100) == "7.7 ± 2.6"
    assert fmt(0.5, 0.0, 100) == "50.0 ± 0.0" and fmt(123.456, 0.0123) == "123.456 ± 0.012"
    store = Store(tmp_path / "store.sqlite")
    add_result_run(store, "dlm", "diffugpt-s", DLM_FP, {"wikitext": ({"word_perplexity": 3.2e19,
                                                                     "word_perplexity_stderr": 1e19}, 8)},
                   output_type="loglikelihood_rolling", specs=PPL)
    cells = collect_cells(store, store.runs())
    (board,) = leaderboards(cells)
    assert board.rows[0][5] == "3.2e19 ± 1.0e19" and board.subheader[5] == "word_perplexity · n=8 · 0-shot · ↓ lower is better"
    assert board.numeric()[5]
    assert results_table(cells).rows[0][5:7] == ["3.2e19", "1.0e19"]


@pytest.fixture()
def checkpoint(tmp_path):
    """A harness checkpoint directory as the trainer leaves it, with a three-step log."""
    final = tmp_path / "adapted" / "final"
    final.mkdir(parents=True)
    recipe = replace(TrainConfig(), **PRESETS["quick"]).recipe()
    (final / "diffusion_config.json").write_text(json.dumps({"format": "dlm-harness", "base_model": "smollm2-135m",
                                                             "step": 60, "recipe": recipe}))
    log = [{"step": s, "loss": loss, "unweighted_loss": loss - 1, "lr": 3e-4, "tokens_seen": 512 * s}
           for s, loss in ((1, 7.71), (30, 7.1), (60, 6.55))]
    (final.parent / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    return final


def test_a_checkpoint_is_named_by_base_recipe_and_step_and_shows_its_loss(checkpoint, tmp_path):
    store = Store(tmp_path / "store.sqlite")
    add_result_run(store, "dlm", "final", {**DLM_FP, "weights": str(checkpoint), "base_model": "smollm2-135m"},
                   {"piqa": ({"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.5}, 16)})
    sections = {s.title: s for s in build_sections(store, store.runs())}
    assert sections["Leaderboard"].tables[0].rows[0][0] == "smollm2-135m-dlm-quick@60"
    section = sections["Adapted checkpoint smollm2-135m-dlm-quick@60"]
    assert section.tables[0].rows == [["piqa", "acc (%)", "50.0 ± 10.0", "16", "paper_grid ×32", "dlm"]]
    (loss,) = section.figures
    assert loss.png[:8] == b"\x89PNG\r\n\x1a\n" and "loss 7.710 → 6.550" in loss.caption
    assert loss.table.rows == [["1", "7.710", "6.710", "0.000300"], ["30", "7.100", "6.100", "0.000300"],
                               ["60", "6.550", "5.550", "0.000300"]]


def test_a_checkpoint_no_longer_on_disk_keeps_its_base_model_in_its_name(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    add_result_run(store, "dlm", "final", {**DLM_FP, "weights": "gone/final", "base_model": "smollm2-135m"},
                   {"piqa": ({"acc": 0.5, "acc_stderr": 0.1}, 16)})
    assert collect_cells(store, store.runs())[0].model == "smollm2-135m-dlm (final)"


def test_accuracy_against_diffusion_steps_from_runs_that_vary_them(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    for steps, value in ((8, 0.2), (32, 0.35), (16, 0.3)):
        fp = {**DLM_FP, "sampler": {**DLM_FP["sampler"], "steps": steps}}
        add_result_run(store, f"dlm-{steps}", "diffugpt-s", fp, {"gsm8k": ({"exact_match": value,
                                                                            "exact_match_stderr": 0.05}, 40)},
                       output_type="generate_until", specs=fraction_metrics("exact_match"))
    sections = {s.title: s for s in build_sections(store, store.runs())}
    (figure,) = sections["Diffusion steps and samples"].figures
    assert figure.title == "gsm8k: exact_match (%) against diffusion steps"
    assert [row[1:3] for row in figure.table.rows] == [["8", "20.0 ± 5.0"], ["16", "30.0 ± 5.0"],
                                                       ["32", "35.0 ± 5.0"]]


def test_published_cells_out_of_reach_say_so(tmp_path):
    refs = references(load_papers())
    out = next(r for r in refs if not r.match and r.harness)
    store = Store(tmp_path / "store.sqlite")
    add_result_run(store, "run", out.harness, DLM_FP, {"piqa": ({"acc": 0.5, "acc_stderr": 0.1}, 16)})
    table = unreachable_table(refs, collect_cells(store, store.runs()))
    assert table.collapsed and [out.model, out.column] in [row[:2] for row in table.rows]
    assert all(row[3].startswith("not reproducible here: ") for row in table.rows)


def test_a_wide_leaderboard_keeps_one_column_per_task(tmp_path):
    store = wide_store(tmp_path / "store.sqlite")
    cells = collect_cells(store, store.runs())
    (board,), (every,) = leaderboards(cells, link=True), metric_boards(cells, link=True)
    assert len(board.rows) == 30 and board.header[5:] == [f"task_{t:02d}" for t in range(20)]
    assert board.rows[3][0].href == "runs/run-03.html" and board.rows[3][7] == "5.0 ± 1.2"
    assert len(every.header) == 5 + 40 and every.collapsed


def test_without_matplotlib_the_tables_remain(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.report.commands.have_matplotlib", lambda: False)
    store = wide_store(tmp_path / "store.sqlite", n_runs=2, n_tasks=2)
    sections = build_sections(store, store.runs())
    assert sections[0].text[0] == NO_MATPLOTLIB and not any(s.figures for s in sections)
    assert len(sections[0].tables[0].rows) == 2
