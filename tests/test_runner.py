"""Runs end to end on a tiny model: store contents, lm-eval file layout, resume after SIGKILL, concurrency."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from harness.runner import RunConfig, evaluate
from harness.store import Store

TASKS = ["piqa", "winogrande"]


def harness_cmd(model_dir, output, data_dir, limit=24, tasks="piqa,winogrande", extra=()):
    return [sys.executable, "-m", "harness.cli", "run", "--model", str(model_dir), "--tasks", tasks,
            "--limit", str(limit), "--data-dir", str(data_dir), "--output", str(output), "--batch-size", "4", *extra]


def run_env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HARNESS_CHUNK_DOCS": "4", **extra}


def test_run_writes_store_results_and_samples(tiny_llama_dir, data_dir, tmp_path):
    config = RunConfig(model=str(tiny_llama_dir), tasks=TASKS, limit=10, data_dir=data_dir, output=tmp_path)
    results = evaluate(config)
    run_id = results["harness"]["run_id"]
    run_dir = tmp_path / run_id
    saved = json.loads((run_dir / "results.json").read_text())
    for task in TASKS:
        metrics = saved["results"][task]
        assert 0.0 <= metrics["acc,none"] <= 1.0 and "acc_stderr,none" in metrics
        lines = [json.loads(line) for line in (run_dir / f"samples_{task}.jsonl").read_text().splitlines()]
        assert len(lines) == 10
        assert len(lines[0]["loglikelihoods"]) == 2 and lines[0]["prediction"] in (0, 1)
        assert saved["n-samples"][task]["effective"] == 10
        assert saved["task_hashes"][task]
    store = Store(tmp_path / "store.sqlite")
    run = store.run(run_id)
    assert run["status"] == "complete"
    assert {"packages", "git_sha", "hardware"} <= set(run["env"])
    assert run["env"]["packages"]["torch"] and run["config"]["seed"] == 1234
    assert set(store.task_results(run_id)) == set(TASKS)
    # the metric specs: lm-eval's higher_is_better, the full specs in results.json and in the store
    specs = [{"name": "acc", "aggregation": "mean", "higher_is_better": True, "unit": "fraction", "primary": True},
             {"name": "acc_norm", "aggregation": "mean", "higher_is_better": True, "unit": "fraction",
              "primary": False}]
    for task in TASKS:
        assert saved["higher_is_better"][task] == {"acc": True, "acc_norm": True}
        assert saved["harness"]["metric_specs"][task] == specs
        assert saved["configs"][task]["output_type"] == "multiple_choice"
        stored = store.task_results(run_id)[task]
        assert stored["specs"] == specs and stored["output_type"] == "multiple_choice"


def test_same_command_resumes_without_recomputing(tiny_llama_dir, data_dir, tmp_path):
    config = RunConfig(model=str(tiny_llama_dir), tasks=["piqa"], limit=6, data_dir=data_dir, output=tmp_path)
    first = evaluate(config)
    again = evaluate(config)
    assert again["harness"]["run_id"] == first["harness"]["run_id"]
    assert again["harness"]["reused_records"] == {"piqa": 6}
    assert again["results"] == first["results"]


def test_sigkill_then_rerun_matches_uninterrupted_run(tiny_llama_dir, data_dir, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(harness_cmd(tiny_llama_dir, killed, data_dir, limit=60), env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stored = 0
    deadline = time.time() + 120
    while time.time() < deadline and stored < 8:
        time.sleep(0.2)
        try:
            db = sqlite3.connect(killed / "store.sqlite", timeout=5)
            stored = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            db.close()
        except sqlite3.Error:
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stored >= 8, "the run stored nothing before it was killed"
    resumed = subprocess.run(harness_cmd(tiny_llama_dir, killed, data_dir, limit=60), env=run_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed:" in resumed.stderr
    subprocess.run(harness_cmd(tiny_llama_dir, clean, data_dir, limit=60), env=run_env(), check=True,
                   capture_output=True)
    (run_a,) = [p for p in killed.iterdir() if p.is_dir()]
    (run_b,) = [p for p in clean.iterdir() if p.is_dir()]
    a = json.loads((run_a / "results.json").read_text())["results"]
    b = json.loads((run_b / "results.json").read_text())["results"]
    assert a == b


def test_two_runs_writing_one_store_at_once(tiny_llama_dir, data_dir, tmp_path):
    procs = [subprocess.Popen(harness_cmd(tiny_llama_dir, tmp_path, data_dir, limit=20, tasks=task), env=run_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for task in ("piqa", "winogrande")]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    store = Store(tmp_path / "store.sqlite")
    runs = store.runs()
    assert len(runs) == 2 and all(r["status"] == "complete" for r in runs)
    assert sorted(len(store.records(r["run_id"], t)) for r in runs for t in store.task_results(r["run_id"])) == [20, 20]
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")
def test_two_process_data_parallel_equals_single_process(tiny_llama_dir, data_dir, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(harness_cmd(tiny_llama_dir, single, data_dir, limit=12), env=run_env(), check=True,
                   capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "harness.cli", *harness_cmd(tiny_llama_dir, multi, data_dir, limit=12)[3:]]
    done = subprocess.run(cmd, env=run_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_a,) = [p for p in single.iterdir() if p.is_dir()]
    (run_b,) = [p for p in multi.iterdir() if p.is_dir()]
    a = json.loads((run_a / "results.json").read_text())
    b = json.loads((run_b / "results.json").read_text())
    assert a["results"] == b["results"]
    assert b["harness"]["env"]["world_size"] == 2
    samples_a = (run_a / "samples_piqa.jsonl").read_text().splitlines()
    samples_b = (run_b / "samples_piqa.jsonl").read_text().splitlines()
    lls_a = [ll for line in samples_a for ll in json.loads(line)["loglikelihoods"]]
    lls_b = [ll for line in samples_b for ll in json.loads(line)["loglikelihoods"]]
    assert lls_a == pytest.approx(lls_b, abs=1e-4)
