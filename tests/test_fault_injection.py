"""SIGKILL at random points (and inside a store commit or a checkpoint write, through the
``HARNESS_PAUSE_AT`` hook), 20 times: the store opens, the resumed run equals an uninterrupted one and
scores only what was missing. Ten concurrent writers lose and duplicate nothing; the same run started
twice at once is computed once."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import harness.store
from harness.models.factory import build_model
from harness.plan import RunConfig, plan_run
from harness.run_listing import status
from harness.runner import evaluate
from harness.store import Store
from harness.train.checkpoints import latest_checkpoint
from harness.train.config import build_config
from harness.train.recipe import run as train
from training import assert_same_weights

DOCS = 16  # piqa documents; 2 requests each, batch 4: 8 record commits after the migration and start_run
FIRST_RECORDS_COMMIT = 3
EVAL_KILLS, COMMIT_KILLS = 18, (3, 5, 8, 10)  # the 3rd, 5th, 8th and 10th commit of a fresh run
TINY_TRAINING = dict(steps=8, seq_len=32, batch_size=2, lr=3e-3, warmup_steps=2, anneal_steps=4,
                     checkpoint_every=2, keep_checkpoints=2)


def fork(work, env: dict[str, str] | None = None, log: Path | None = None) -> int:
    """Run ``work()`` in a forked child (no interpreter start-up); its pause points count from zero."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.environ.update(env or {})
        harness.store.PASSES.clear()
        sink = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
        work()
        code = 0
    finally:
        sys.stderr.flush()
        os._exit(code)


def kill_when(pid: int, ready, delay: float) -> None:
    """SIGKILL the child ``delay`` seconds after ``ready()`` holds (it waits at its pause point, or
    stored enough records); sooner when it finishes first."""
    deadline = time.time() + 60
    while not ready():
        assert time.time() < deadline, "the child never got to the kill point"
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.005)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def records_in(path: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def kill_point(kill: int, output: Path, rng: random.Random, seconds: float):
    """(pause env, ready condition, delay) of a kill: inside a chosen commit, at a random moment of
    the whole run (model loading included), or just after a random number of stored documents."""
    if kill < len(COMMIT_KILLS):
        pause = output.parent / f"paused-{kill}"
        return ({"HARNESS_PAUSE_AT": f"commit:{COMMIT_KILLS[kill]}", "HARNESS_PAUSE_FILE": str(pause)},
                pause.exists, 0.0)
    if kill < 8:
        return {}, lambda: True, rng.uniform(0, seconds)
    target = rng.randrange(DOCS)
    return {}, lambda: records_in(output / "store.sqlite") >= target, rng.uniform(0, 0.02)


class Counting:
    """The tiny model, counting the documents it scores (piqa: two requests a document)."""

    def __init__(self, model) -> None:
        self.model, self.requests = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __setattr__(self, name, value):
        if name in ("model", "requests"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.model, name, value)

    def loglikelihood(self, requests):
        self.requests += len(requests)
        return self.model.loglikelihood(requests)


@pytest.fixture(scope="module")
def setting(tiny_llama_dir, data_dir, tmp_path_factory, one_torch_thread):
    """(config, counting model, clean results, seconds of a clean run in a child)."""
    config = RunConfig(model=str(tiny_llama_dir), tasks=["piqa"], limit=DOCS, batch_size="4", data_dir=data_dir,
                       output=tmp_path_factory.mktemp("clean"))
    plan = plan_run(config)
    model = Counting(build_model(plan.card, dtype=plan.dtype, batch_size=plan.batch_size, settings=plan.settings))
    clean = evaluate(config, model=model)
    started = time.time()
    pid = fork(lambda: evaluate(replace(config, output=tmp_path_factory.mktemp("timed"))))
    assert os.waitpid(pid, 0)[1] == 0
    return config, model, clean, time.time() - started


def stored_after_kill(output: Path, run_id: str) -> int:
    """What the killed run left stored; a run left ``running`` is listed as interrupted."""
    store = Store(output / "store.sqlite")
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    runs = store.runs()
    if runs:
        assert status(runs[0]).plain in ("interrupted", "complete")
    return store.document_counts().get(run_id, 0)


def test_sigkill_at_random_points_and_inside_commits_then_resume(setting, tmp_path):
    config, model, clean, seconds = setting
    run_id = clean["harness"]["run_id"]
    rng = random.Random(20261202)
    landed = []
    for kill in range(EVAL_KILLS):
        output = tmp_path / f"kill-{kill}"
        env, ready, delay = kill_point(kill, output, rng, seconds)
        pid = fork(lambda: evaluate(replace(config, output=output)), env)
        kill_when(pid, ready, delay)
        stored = stored_after_kill(output, run_id) if (output / "store.sqlite").exists() else 0
        if kill < len(COMMIT_KILLS):  # the transaction in flight is rolled back whole; those before it stay
            assert stored == 2 * (COMMIT_KILLS[kill] - FIRST_RECORDS_COMMIT)
        landed.append(stored)
        model.requests = 0
        resumed = evaluate(replace(config, output=output), model=model)
        assert resumed["results"] == clean["results"]
        assert resumed["harness"]["reused_records"] == {"piqa": stored}
        assert model.requests == 2 * (DOCS - stored)  # only the missing documents were scored
    print("documents stored at the kills:", landed)
    assert len(set(landed)) >= 6, landed  # the kills landed at different points


def test_sigkill_during_a_checkpoint_write_then_resume(tiny_llama_dir, corpus, tmp_path, one_torch_thread):
    def config(out: Path, **changes):
        return build_config(base=str(tiny_llama_dir), data=str(corpus), output_dir=str(out),
                            **{**TINY_TRAINING, **changes})

    train(config(tmp_path / "clean"), str(tiny_llama_dir))
    for kill, publish in enumerate((2, 3)):  # while checkpoint-4 / checkpoint-6 is being written
        out, pause = tmp_path / f"killed-{kill}", tmp_path / f"paused-{kill}"
        pid = fork(lambda: train(config(out), str(tiny_llama_dir)),
                   {"HARNESS_PAUSE_AT": f"checkpoint:{publish}", "HARNESS_PAUSE_FILE": str(pause)})
        kill_when(pid, pause.exists, 0)
        assert latest_checkpoint(out).name == f"checkpoint-{2 * (publish - 1)}"
        assert (out / f".tmp-checkpoint-{2 * publish}").is_dir()
        train(config(out, resume=True), str(tiny_llama_dir))
        assert_same_weights(out / "final", tmp_path / "clean" / "final", atol=0)


def test_ten_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    path = tmp_path / "store.sqlite"
    Store(path)

    def write(writer: int) -> None:
        store = Store(path)
        for run_id in ("shared", f"writer-{writer}"):
            store.start_run(run_id, model="m", config={}, fingerprint={}, env={}, output_dir="")
        for start in range(0, 40, 5):  # the shared run's documents overlap those of the next writer
            docs = range(writer * 20 + start, writer * 20 + start + 5)
            store.add_records("shared", "t", [(d, {"x": d}, {"doc": d}) for d in docs])
            store.add_records(f"writer-{writer}", "t", [(d, {"x": d}, {"doc": d}) for d in range(start, start + 5)])

    pids = [fork(lambda w=w: write(w)) for w in range(10)]
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    shared = db.execute("SELECT doc_id, metrics FROM records WHERE run_id='shared' ORDER BY doc_id").fetchall()
    assert shared == [(d, json.dumps({"x": d})) for d in range(9 * 20 + 40)]
    counts = dict(db.execute("SELECT run_id, COUNT(*) FROM records WHERE run_id != 'shared' GROUP BY run_id"))
    assert counts == {f"writer-{w}": 40 for w in range(10)}
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 11


def test_the_same_run_started_twice_is_computed_once(setting, tmp_path):
    config, _, clean, _ = setting
    output, pause = tmp_path / "runs", tmp_path / "paused"

    def run(name: str) -> None:
        results = evaluate(replace(config, output=output))
        (tmp_path / f"{name}.json").write_text(json.dumps(results["harness"]["reused_records"]))

    first = fork(lambda: run("first"), {"HARNESS_PAUSE_AT": "commit:4", "HARNESS_PAUSE_FILE": str(pause),
                                        "HARNESS_PAUSE_S": "2"})
    deadline = time.time() + 60
    while not pause.exists() and time.time() < deadline:
        time.sleep(0.01)
    second = fork(lambda: run("second"), log=tmp_path / "second.log")
    assert os.waitpid(first, 0)[1] == 0 and os.waitpid(second, 0)[1] == 0
    said = (tmp_path / "second.log").read_text()
    assert f"run {clean['harness']['run_id']} is being computed by pid {first}; waiting" in said, said
    assert json.loads((tmp_path / "first.json").read_text()) == {"piqa": 0}
    assert json.loads((tmp_path / "second.json").read_text()) == {"piqa": DOCS}  # nothing scored again
