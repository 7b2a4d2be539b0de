"""`harness import-lm-eval`: a folder written by lm-eval (run here through the bridge on a tiny model)
stored as a run that the report's loader and the paired comparison read."""
import hashlib
import json
import math
from pathlib import Path

import pytest
from lm_eval_local import write_local_mc

pytest.importorskip("lm_eval")

from harness.errors import HarnessError  # noqa: E402
from harness.lm_eval_import import import_results, results_files  # noqa: E402
from harness.store import Store  # noqa: E402

LIMIT = 3
# lm-eval key -> the harness's name, per task
NAMES = {"triviaqa": {"exact_match,remove_whitespace": "exact_match",
                      "exact_match_stderr,remove_whitespace": "exact_match_stderr"},
         "gsm8k": {"exact_match,strict-match": "exact_match_strict",
                   "exact_match_stderr,strict-match": "exact_match_strict_stderr",
                   "exact_match,flexible-extract": "exact_match_flexible",
                   "exact_match_stderr,flexible-extract": "exact_match_flexible_stderr"},
         "local_mc": {"acc,none": "acc", "acc_stderr,none": "acc_stderr"}}


@pytest.fixture(scope="module")
def lm_eval_output(tmp_path_factory, tiny_llama_dir, data_dir):
    """lm-eval's --output_path folder (results and samples) of the harness model on three local tasks."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from harness.lm_eval_tasks import task_folder

    root = tmp_path_factory.mktemp("lm-eval")
    (root / "tasks").mkdir()
    write_local_mc(root / "tasks", root / "docs.jsonl")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_CACHE_DIR", str(root / "cache"))
        manager = TaskManager(include_path=[str(task_folder(data_dir)), str(root / "tasks")])
    tracker = EvaluationTracker(output_path=str(root / "out"))
    results = lm_eval.simple_evaluate(model="harness", model_args=f"model={tiny_llama_dir}", batch_size=4,
                                      tasks=["triviaqa", "gsm8k", "local_mc"], num_fewshot=0, limit=LIMIT,
                                      gen_kwargs="max_gen_toks=6", task_manager=manager, log_samples=True,
                                      evaluation_tracker=tracker)
    samples = results.pop("samples")  # as lm-eval's command line saves them
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return root / "out"


@pytest.fixture()
def store(tmp_path):
    return Store(tmp_path / "store.sqlite")


def samples_of(folder: Path, task: str) -> list[dict]:
    (path,) = folder.glob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.open()]


def test_import_stores_the_results_files_numbers(lm_eval_output, store, tiny_llama_dir):
    (results_path,) = results_files(lm_eval_output)
    data = json.loads(results_path.read_text())
    run_id, existed = import_results(store, results_path)
    assert (run_id, existed) == ("lm-eval-" + hashlib.sha256(results_path.read_bytes()).hexdigest()[:12], False)
    (run,) = store.runs()
    assert (run["run_id"], run["status"], run["kind"], run["model"]) == (run_id, "complete", "eval",
                                                                         f"harness:model={tiny_llama_dir}")
    assert run["model_fingerprint"] == {**data["config"], "backend": "lm-eval:harness"}
    assert run["config"]["tasks"] == list(data["results"]) and sorted(data["results"]) == sorted(NAMES)
    assert run["config"]["model_args"] == {"model": str(tiny_llama_dir)}
    assert run["env"]["packages"]["lm_eval"] == "0.4.13" and run["env"]["git_sha"] == data["git_hash"]
    stored = store.task_results(run_id)
    for task, names in NAMES.items():
        expected = {name: data["results"][task][key] for key, name in names.items()}
        assert stored[task]["metrics"] == {k: None if isinstance(v, str) else v for k, v in expected.items()}
        assert stored[task]["n"] == LIMIT
    assert stored["triviaqa"]["specs"] == [{"name": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                            "unit": "fraction", "primary": True}]
    assert [(s["name"], s["unit"], s["primary"]) for s in stored["gsm8k"]["specs"]] == [
        ("exact_match_strict", "fraction", True), ("exact_match_flexible", "fraction", False)]
    assert stored["local_mc"]["specs"] == [{"name": "acc", "aggregation": "mean", "higher_is_better": True,
                                            "unit": "number", "primary": True}]
    assert (stored["gsm8k"]["output_type"], stored["local_mc"]["output_type"]) == ("generate_until", "multiple_choice")
    assert stored["gsm8k"]["prompt_hash"] == data["task_hashes"]["gsm8k"]


def test_import_stores_one_record_per_document(lm_eval_output, store):
    (results_path,) = results_files(lm_eval_output)
    run_id, _ = import_results(store, results_path)
    lines = samples_of(lm_eval_output / results_path.parent.name, "gsm8k")
    records = store.records(run_id, "gsm8k")
    assert [doc for doc, _, _ in records] == list(range(LIMIT))
    for doc, metrics, record in records:
        strict, flexible = (next(s for s in lines if s["doc_id"] == doc and s["filter"] == f) for f in
                            ("strict-match", "flexible-extract"))
        assert metrics == {"exact_match_strict": strict["exact_match"], "exact_match_flexible": flexible["exact_match"]}
        assert record["filtered_resps"] == {"strict-match": strict["filtered_resps"],
                                            "flexible-extract": flexible["filtered_resps"]}
        assert record["prompt_hash"] == strict["prompt_hash"] and record["resps"] == strict["resps"]
    (_, metrics, record), = [r for r in store.records(run_id, "local_mc") if r[0] == 0]
    line = next(s for s in samples_of(lm_eval_output / results_path.parent.name, "local_mc") if s["doc_id"] == 0)
    assert metrics == {"acc": line["acc"]} and record == line
    mean = sum(m["acc"] for _, m, _ in store.records(run_id, "local_mc")) / LIMIT
    assert math.isclose(mean, store.task_results(run_id)["local_mc"]["metrics"]["acc"])


def test_report_and_compare_read_the_imported_run(lm_eval_output, store):
    from harness.report.collect import collect_cells, select_runs
    from harness.report.compare import paired

    run_id, _ = import_results(store, results_files(lm_eval_output)[0])
    data = json.loads(results_files(lm_eval_output)[0].read_text())
    cells = collect_cells(store, select_runs(store, [run_id], False))
    assert sorted((c.task, c.metric, c.value, c.n) for c in cells) == sorted(
        (task, name, data["results"][task][key], LIMIT) for task, names in NAMES.items()
        for key, name in names.items() if "_stderr" not in key)
    run = store.run(run_id)
    deltas, _ = paired(store, run, run, resamples=10)
    assert sorted((d.task, d.metric, d.n, d.delta) for d in deltas) == [
        ("gsm8k", "exact_match_flexible", 3, 0.0), ("gsm8k", "exact_match_strict", 3, 0.0),
        ("local_mc", "acc", 3, 0.0), ("triviaqa", "exact_match", 3, 0.0)]


def test_import_is_idempotent_whichever_path_is_given(lm_eval_output, store, tmp_path):
    import typer
    from typer.testing import CliRunner

    from harness.lm_eval_import import import_lm_eval

    (results_path,) = results_files(lm_eval_output)
    assert results_files(results_path.parent) == results_files(results_path) == [results_path]
    app = typer.Typer()
    app.command()(import_lm_eval)
    first = CliRunner().invoke(app, [str(lm_eval_output), "--output", str(tmp_path / "runs")])
    again = CliRunner().invoke(app, [str(results_path), "--output_path", str(tmp_path / "runs")])
    run_id = "lm-eval-" + hashlib.sha256(results_path.read_bytes()).hexdigest()[:12]
    assert (first.exit_code, again.exit_code) == (0, 0)
    assert first.output == f"{results_path}: imported as run {run_id}\n"
    assert again.output == f"{results_path}: already imported as run {run_id}\n"
    assert [r["run_id"] for r in Store(tmp_path / "runs" / "store.sqlite").runs()] == [run_id]


def copy_output(lm_eval_output: Path, where: Path) -> Path:
    import shutil

    shutil.copytree(lm_eval_output, where)
    (results_path,) = results_files(where)
    return results_path


def test_malformed_input_is_one_line_and_stores_nothing(lm_eval_output, store, tmp_path):
    with pytest.raises(HarnessError, match=f"^no lm-eval results_\\*.json in '{tmp_path}' or its subfolders$"):
        results_files(tmp_path)
    with pytest.raises(HarnessError, match="is neither an lm-eval output folder nor a results file$"):
        results_files(tmp_path / "missing")
    broken = tmp_path / "results_2020.json"
    broken.write_text('{"results": ')
    with pytest.raises(HarnessError, match=r"results_2020.json: not a readable JSON file \(Expecting value"):
        import_results(store, broken)
    broken.write_text('{"config": {}}')
    with pytest.raises(HarnessError, match=r"results_2020.json: not an lm-eval results file \(no 'results' per "
                                           r"task\)$"):
        import_results(store, broken)
    results_path = copy_output(lm_eval_output, tmp_path / "bad-samples")
    (samples,) = results_path.parent.glob("samples_gsm8k_*.jsonl")
    samples.write_text(samples.read_text() + "{not json\n")
    with pytest.raises(HarnessError, match=rf"samples_gsm8k_.*\.jsonl:{2 * LIMIT + 1}: not valid JSON"):
        import_results(store, results_path)
    samples.write_text('{"doc_id": "0", "metrics": []}\n')
    with pytest.raises(HarnessError, match=r"samples_gsm8k_.*\.jsonl:1: not an lm-eval sample \(doc_id, metrics\)$"):
        import_results(store, results_path)
    assert store.runs() == []


def test_a_failure_while_writing_leaves_no_run(lm_eval_output, store, monkeypatch):
    def fail(*args, **kwargs):
        raise HarnessError("disk full")

    monkeypatch.setattr(store, "set_task_result", fail)
    with pytest.raises(HarnessError, match="disk full"):
        import_results(store, results_files(lm_eval_output)[0])
    assert store.runs() == []
    assert store.db.execute("SELECT COUNT(*) FROM records").fetchone() == (0,)
