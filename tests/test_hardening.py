"""Bad input is one line and exit 2, before any weights load: corrupt, missing and read-only stores,
read-only output folders, a missing model path, a disk that fills during a run."""
from __future__ import annotations

import errno
import os
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import harness.cli
import harness.runner
from harness.plan import RunConfig
from harness.run_listing import status
from harness.runner import evaluate
from harness.store import Store


def main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``harness ARGS`` through the real entry point: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["harness", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        harness.cli.main()
    return exit.value.code, capsys.readouterr().err


def one_line_error(code: int, err: str, *parts: str) -> None:
    err = err.strip()  # a run's progress display may leave an empty line above
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert all(part in err for part in parts), err


def no_weights(monkeypatch) -> None:
    """Loading a model fails the test: every error here comes before that."""
    import harness.models.factory

    monkeypatch.setattr(harness.models.factory, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))


def fill_store(path: Path, runs: int = 2, docs: int = 300) -> None:
    store = Store(path)
    for n in range(runs):
        store.start_run(f"tiny-{n}", model="tiny", config={"tasks": ["piqa"]}, fingerprint={}, env={},
                        output_dir=str(path.parent / f"tiny-{n}"))
        store.add_records(f"tiny-{n}", "piqa", [(d, {"acc": d % 2}, {"doc": "x" * 200}) for d in range(docs)])
        store.finish_run(f"tiny-{n}")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.db.close()


@pytest.fixture
def corrupt(tmp_path) -> Path:
    """A store whose pages after the first (the schema) are overwritten mid-file."""
    path = tmp_path / "store.sqlite"
    fill_store(path)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(4096)
        handle.write(os.urandom(size - 8192))
    return tmp_path


@pytest.mark.parametrize("command", [["ls", "runs"], ["report", "--all", "--out", "{tmp}/report"],
                                     ["compare", "tiny-0", "tiny-1"], ["show", "tiny-0"]])
def test_a_corrupt_store_is_one_line(corrupt, monkeypatch, capsys, command):
    args = [a.replace("{tmp}", str(corrupt)) for a in command]
    code, err = main(monkeypatch, capsys, *args, "--output", corrupt)
    one_line_error(code, err, str(corrupt / "store.sqlite"), "corrupt or not a harness store")


def test_a_run_on_a_corrupt_store_fails_before_loading_weights(corrupt, tiny_llama_dir, data_dir, monkeypatch, capsys):
    no_weights(monkeypatch)
    code, err = main(monkeypatch, capsys, "run", "--model", tiny_llama_dir, "--tasks", "piqa", "--limit", "2",
                     "--data-dir", data_dir, "--output", corrupt)
    one_line_error(code, err, "corrupt or not a harness store")


@pytest.mark.parametrize("command", [["ls", "runs"], ["show", "x"], ["rm", "x", "--yes"],
                                     ["report", "--all", "--out", "{tmp}/report"], ["compare", "a", "b"]])
def test_readers_never_create_a_store(tmp_path, monkeypatch, capsys, command):
    typo = tmp_path / "TYPO"
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    code, err = main(monkeypatch, capsys, *args, "--output", typo)
    one_line_error(code, err, "no results store at", str(typo / "store.sqlite"))
    assert not typo.exists()


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: writes under ``folder`` fail as on a read-only mount (chmod is no use to root)."""
    folders: list[Path] = []

    def under(path) -> bool:
        return any(Path(path).resolve().is_relative_to(f) for f in folders)

    access, touch, mkdir = os.access, Path.touch, Path.mkdir

    def fake_access(path, mode, **kwargs):
        return False if mode & os.W_OK and under(path) else access(path, mode, **kwargs)

    def refuse(original):
        def call(self, *args, **kwargs):
            if under(self) and not (original is mkdir and self.is_dir()):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return original(self, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "access", fake_access)
    monkeypatch.setattr(Path, "touch", refuse(touch))
    monkeypatch.setattr(Path, "mkdir", refuse(mkdir))
    return lambda folder: folders.append(Path(folder).resolve())


def test_a_store_on_a_read_only_mount_is_read_and_never_written(tmp_path, read_only, monkeypatch, capsys):
    fill_store(tmp_path / "store.sqlite", docs=3)
    read_only(tmp_path)
    monkeypatch.setattr(sys, "argv", ["harness", "ls", "runs", "--output", str(tmp_path)])
    with pytest.raises(SystemExit) as exit:
        harness.cli.main()
    listing = capsys.readouterr().out
    assert exit.value.code == 0 and "tiny-0" in listing and "tiny-1" in listing
    assert Store(tmp_path / "store.sqlite").records("tiny-0", "piqa")[2][1] == {"acc": 0}
    code, err = main(monkeypatch, capsys, "rm", "tiny-0", "--yes", "--output", tmp_path)
    one_line_error(code, err, "is read-only")
    assert not (tmp_path / "store.sqlite-wal").exists()


def test_read_only_output_folders(tmp_path, read_only, tiny_llama_dir, data_dir, monkeypatch, capsys, corpus):
    fill_store(tmp_path / "runs" / "store.sqlite", docs=3)
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    no_weights(monkeypatch)
    code, err = main(monkeypatch, capsys, "run", "--model", tiny_llama_dir, "--tasks", "piqa", "--limit", "2",
                     "--data-dir", data_dir, "--output", locked / "runs")
    one_line_error(code, err, "output folder", "not writable")
    code, err = main(monkeypatch, capsys, "report", "--all", "--out", locked / "report", "--output", tmp_path / "runs")
    one_line_error(code, err, "--out folder", "not writable")
    code, err = main(monkeypatch, capsys, "adapt", "--data", corpus, "--base", tiny_llama_dir, "--out", locked / "a",
                     "--steps", "1")
    one_line_error(code, err, "--out folder", "not writable")


@pytest.mark.parametrize("model", ["./missing/dir", "/no/such/model", "~/missing"])
def test_a_missing_model_path_says_so(tmp_path, data_dir, monkeypatch, capsys, model):
    code, err = main(monkeypatch, capsys, "run", "--model", model, "--tasks", "piqa", "--limit", "2",
                     "--data-dir", data_dir, "--output", tmp_path)
    one_line_error(code, err, f"model path '{model}' does not exist")


class FullDisk(Store):
    """A store whose disk fills a few pages after it is opened (SQLite's max_page_count: a real SQLITE_FULL)."""

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count={pages + 6}")


def test_a_full_disk_keeps_what_was_stored_and_the_run_resumes(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    config = RunConfig(model=str(tiny_llama_dir), tasks=["piqa"], limit=40, batch_size="4", data_dir=data_dir,
                       output=tmp_path / "full")
    clean = evaluate(replace(config, output=tmp_path / "clean"))
    monkeypatch.setattr(harness.runner, "Store", FullDisk)
    with pytest.raises(harness.runner.HarnessError, match="the disk is full") as failure:
        evaluate(config)
    assert "\n" not in str(failure.value)
    monkeypatch.undo()
    store = Store(tmp_path / "full" / "store.sqlite")
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = store.document_counts()[clean["harness"]["run_id"]]
    assert 0 < stored < 40
    assert status(store.run(clean["harness"]["run_id"])).plain in ("failed", "interrupted")  # not running
    resumed = evaluate(config)
    assert resumed["results"] == clean["results"]
    assert resumed["harness"]["reused_records"] == {"piqa": stored}


def open_at(path: Path, start: float, results) -> None:
    import time

    while time.time() < start:
        pass
    try:
        Store(path)
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - the test reports what went wrong
        results.put(str(exc))


def test_two_processes_creating_one_new_store_at_once(tmp_path):
    """Two ranks of a run start together on a new store: SQLite refuses the switch to WAL at once
    ("locked") while the other creates it; both must open it (30 rounds: 0 failures, where an
    unretried switch failed about 4 openings in 10)."""
    import multiprocessing
    import time

    context = multiprocessing.get_context("fork")
    outcomes = []
    for round_ in range(30):
        path, results, start = tmp_path / f"store-{round_}.sqlite", context.Queue(), time.time() + 0.05
        processes = [context.Process(target=open_at, args=(path, start, results)) for _ in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        outcomes += [results.get(timeout=10) for _ in processes]
    assert outcomes == ["ok"] * 60
