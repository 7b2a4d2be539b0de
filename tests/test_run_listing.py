"""`ls runs`, `show` and `rm` over a store built by hand: no model is loaded."""
from __future__ import annotations

import sys
import time

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

import harness.cli
import harness.run_listing
from harness.run_listing import rm, runs_table, show
from harness.store import Store

T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC
TABLES = ("runs", "task_results", "records", "measurements")
ENV = {"packages": {"dlm-harness": "0.3.0", "torch": "2.4.0", "transformers": "4.44.0", "numpy": "1.26.4"},
       "git_sha": "abc123-dirty", "python": "3.11.7", "hardware": {"cpu": "Test CPU", "cpu_cores": 2, "memory_gb": 8.0}}


def config(**changes) -> dict:
    """What ``RunPlan.recorded()`` stores."""
    return {"model": "tiny", "tasks": ["arc_easy", "piqa"], "suite": None, "limit": 5, "seed": 1234,
            "batch_size": "16", "device": "cpu", "dtype": "float32", "model_args": {"mc_samples": 8, "cfg": 0.5},
            "task_options": {}, "data_dir": None, "output": "runs", **changes}


@pytest.fixture
def utc():
    """Local time is UTC, so dates are exact."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TZ", "UTC")
    time.tzset()
    yield
    mp.undo()
    time.tzset()


@pytest.fixture
def output(tmp_path, monkeypatch, utc):
    """A runs folder whose store holds two eval runs and a throughput run (created oldest first:
    the throughput run, then tiny-aaa111, then tiny-bbb222). The throughput run's folder lies outside."""
    monkeypatch.delenv("HARNESS_STORE", raising=False)
    output = tmp_path / "runs"
    store = Store(output / "store.sqlite")
    outside = tmp_path / "elsewhere" / "bench-tiny-ccc333"
    for run_id, kind, conf, folder in (
            ("tiny-aaa111", "eval", config(), output / "tiny-aaa111"),
            ("tiny-bbb222", "eval", config(tasks=["hellaswag"], limit=0.1, model_args={}, prompt_format="chat"),
             output / "tiny-bbb222"),
            ("bench-tiny-ccc333", "throughput", {"suite": None, "device": "cpu", "untrained": False, "model": "tiny",
                                                 "model_args": {}, "seed": 1234}, outside)):
        store.start_run(run_id, model="tiny", config=conf, fingerprint={"weights": "tiny", "dtype": "float32"},
                        env=ENV, output_dir=str(folder), kind=kind)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text("{}")
    store.add_records("tiny-aaa111", "arc_easy", [(d, {"acc": 1.0}, {"doc_id": d}) for d in range(3)])
    store.add_records("tiny-aaa111", "piqa", [(0, {"acc": 0.0}, {"doc_id": 0})])
    store.add_records("tiny-bbb222", "hellaswag", [(0, {"acc": 1.0}, {"doc_id": 0})])
    store.set_task_result("tiny-aaa111", "arc_easy", task_hash="t", prompt_hash="p", n=3,
                          metrics={"acc": 0.5, "acc_stderr": 0.25, "acc_norm": 0.75, "acc_norm_stderr": 0.125},
                          settings={}, specs=[], output_type="multiple_choice")
    store.finish_run("tiny-aaa111")
    store.finish_run("tiny-bbb222", "failed")
    store.add_measurement("bench-tiny-ccc333", {"key": "a"})
    store.add_measurement("bench-tiny-ccc333", {"key": "b"})
    for run_id, created in (("bench-tiny-ccc333", T0), ("tiny-aaa111", T0 + 60), ("tiny-bbb222", T0 + 3600)):
        store.db.execute("UPDATE runs SET created_at=?, updated_at=? WHERE run_id=?", (created, created + 300, run_id))
    return output


def rows(table) -> list[list[str]]:
    return [list(row) for row in zip(*([str(cell) for cell in column._cells] for column in table.columns))]


def stored(output) -> dict[str, list[tuple]]:
    store = Store(output / "store.sqlite")
    return {table: store.db.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall() for table in TABLES}


def invoke(*args, stdin: str | None = None):
    app = typer.Typer()
    app.command()(show)
    app.command()(rm)
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin)


def lines(text: str) -> list[str]:
    """The output's lines, whitespace collapsed and table borders dropped."""
    return [" ".join(line.replace("│", " ").replace("┃", " ").split()) for line in text.splitlines()]


def test_runs_table_lists_every_run_newest_last(output):
    table = runs_table(Store(output / "store.sqlite"))
    assert [c.header for c in table.columns] == ["run", "kind", "date", "model", "model args", "limit", "tasks",
                                                 "docs", "status"]
    assert rows(table) == [
        ["bench-tiny-ccc333", "throughput", "2023-11-14 22:13", "tiny", "-", "-", "-", "0", "running"],
        ["tiny-aaa111", "eval", "2023-11-14 22:14", "tiny", "mc_samples=8,cfg=0.5", "5", "arc_easy", "4", "complete"],
        ["tiny-bbb222", "eval", "2023-11-14 23:13", "tiny", "-", "0.1", "hellaswag", "1", "failed"]]
    recorder = Console(record=True, width=200)
    recorder.print(table)
    assert [line for line in lines(recorder.export_text()) if line.strip("─")][:2] == [
        "run kind date model model args limit tasks docs status",
        "bench-tiny-ccc333 throughput 2023-11-14 22:13 tiny - - - 0 running"]


def test_runs_table_of_one_kind(output):
    assert [row[0] for row in rows(runs_table(Store(output / "store.sqlite"), "eval"))] == ["tiny-aaa111",
                                                                                         "tiny-bbb222"]


def test_show_prints_settings_fingerprint_environment_and_results(output):
    result = invoke("show", "tiny-a", "--output", output)
    assert result.exit_code == 0, result.output
    shown = lines(result.stdout)
    for line in ("run tiny-aaa111", "status complete", "kind eval", "created 2023-11-14 22:14",
                 "updated 2023-11-14 22:19", "model tiny", "settings", "tasks arc_easy,piqa", "suite -", "limit 5",
                 "seed 1234", "batch size 16", "device cpu", "dtype float32", "model args mc_samples=8,cfg=0.5",
                 "task options -", "model fingerprint", "weights tiny", "environment", "torch 2.4.0",
                 "transformers 4.44.0", "harness 0.3.0", "git sha abc123-dirty", "python 3.11.7", "cpu Test CPU",
                 "cpu cores 2", "memory GB 8.0", "results", "task metric value ± stderr n",
                 "arc_easy acc 0.5000 0.2500 3", "arc_easy acc_norm 0.7500 0.1250 3"):
        assert line in shown, line
    assert not any(line.startswith(("prompt format", "numpy", "measurements")) for line in shown)


def test_show_a_run_without_results_and_its_prompt_format(output):
    shown = lines(invoke("show", "tiny-b", "--output_path", output).stdout)
    assert {"status failed", "limit 0.1", "model args -", "prompt format chat", "no task results stored"} <= set(shown)


def test_show_a_throughput_run_counts_its_measurements(output):
    shown = lines(invoke("show", "bench", "--output", output).stdout)
    assert {"kind throughput", "status running", "measurements 2"} <= set(shown)
    assert "no task results stored" not in shown and "tasks -" not in shown


def test_rm_removes_only_that_run_and_its_folder(output):
    before = stored(output)
    result = invoke("rm", "tiny-a", "--output", output, "--yes")
    assert result.exit_code == 0, result.output
    assert result.stderr == f"removed tiny-aaa111 from {output / 'store.sqlite'} and {output / 'tiny-aaa111'}\n"
    after = stored(output)
    for table in TABLES:
        assert after[table] == [row for row in before[table] if row[0] != "tiny-aaa111"], table
    assert len(before["records"]) - len(after["records"]) == 4 and len(before["task_results"]) == 1
    assert not (output / "tiny-aaa111").exists()
    assert (output / "tiny-bbb222" / "results.json").is_file() and (output / "store.sqlite").is_file()


def test_rm_keeps_a_folder_outside_the_output_folder(output):
    outside = output.parent / "elsewhere" / "bench-tiny-ccc333"
    result = invoke("rm", "bench", "-y", "--output", output)
    assert result.stderr.splitlines() == [f"removed bench-tiny-ccc333 from {output / 'store.sqlite'}",
                                          f"kept {outside}: not a run folder inside {output}"]
    assert (outside / "results.json").is_file()
    assert [r[0] for r in stored(output)["runs"]] == ["tiny-aaa111", "tiny-bbb222"]
    assert stored(output)["measurements"] == []


@pytest.mark.parametrize("store_inside", [False, True])
def test_rm_never_removes_the_output_folder_or_one_holding_the_store(output, monkeypatch, store_inside):
    path = output / "store.sqlite"
    if store_inside:  # $HARNESS_STORE inside the run's folder
        path = output / "tiny-bbb222" / "store.sqlite"
        Store(output / "store.sqlite").db.backup(Store(path).db)
        monkeypatch.setenv("HARNESS_STORE", str(path))
    else:
        Store(path).db.execute("UPDATE runs SET output_dir=? WHERE run_id='tiny-bbb222'", (str(output),))
    kept = output / "tiny-bbb222" if store_inside else output
    result = invoke("rm", "tiny-b", "-y", "--output", output)
    assert result.stderr.splitlines() == [f"removed tiny-bbb222 from {path}",
                                          f"kept {kept}: not a run folder inside {output}"]
    assert path.is_file() and (output / "tiny-bbb222" / "results.json").is_file()
    assert [r["run_id"] for r in Store(path).runs()] == ["bench-tiny-ccc333", "tiny-aaa111"]


def test_rm_a_relative_output_folder(output, monkeypatch):
    """The runner records ``runs/<run id>`` when --output is the default, relative ``runs``."""
    monkeypatch.chdir(output.parent)
    Store(output / "store.sqlite").db.execute("UPDATE runs SET output_dir=? WHERE run_id=?",
                                              ("runs/tiny-aaa111", "tiny-aaa111"))
    result = invoke("rm", "tiny-a", "-y")
    assert result.stderr == f"removed tiny-aaa111 from runs/store.sqlite and {output / 'tiny-aaa111'}\n"
    assert not (output / "tiny-aaa111").exists() and (output / "tiny-bbb222").is_dir()


def test_rm_asks_at_a_terminal(output, monkeypatch):
    monkeypatch.setattr(harness.run_listing, "interactive", lambda: True)
    before = stored(output)
    declined = invoke("rm", "tiny-a", "tiny-b", "--output", output, stdin="n\n")
    assert declined.exit_code == 1
    assert declined.stdout.startswith(f"remove tiny-aaa111, tiny-bbb222 from {output / 'store.sqlite'} "
                                      "with their folders? [y/N]: ")
    assert stored(output) == before and (output / "tiny-aaa111").is_dir()
    assert invoke("rm", "tiny-a", "tiny-b", "--output", output, stdin="y\n").exit_code == 0
    assert [r[0] for r in stored(output)["runs"]] == ["bench-tiny-ccc333"]
    assert not (output / "tiny-aaa111").exists() and not (output / "tiny-bbb222").exists()


def main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``harness ARGS`` through the real entry point, with these commands: (exit code, stderr)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(show)
    app.command()(rm)
    monkeypatch.setattr(harness.cli, "app", app)
    monkeypatch.setattr(harness.cli, "register_optional_commands", lambda: None)
    monkeypatch.setattr(sys, "argv", ["harness", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        harness.cli.main()
    return exit.value.code, capsys.readouterr().err


def test_rm_without_yes_off_a_terminal_refuses(output, monkeypatch, capsys):
    monkeypatch.setattr(harness.run_listing, "interactive", lambda: False)
    before = stored(output)
    code, err = main(monkeypatch, capsys, "rm", "tiny-a", "--output", output)
    assert (code, err) == (2, "error: not removing tiny-aaa111 without confirmation: pass --yes\n")
    assert stored(output) == before and (output / "tiny-aaa111").is_dir()


@pytest.mark.parametrize("prefix, what", [("nope", "no run"), ("tiny-", "2 runs")])
def test_rm_an_unknown_or_ambiguous_prefix_removes_nothing(output, monkeypatch, capsys, prefix, what):
    before = stored(output)
    code, err = main(monkeypatch, capsys, "rm", "tiny-a", prefix, "--yes", "--output", output)
    assert (code, err) == (2, f"error: {what} matching '{prefix}' in {output / 'store.sqlite'} "
                              "(recent: bench-tiny-c, tiny-aaa111, tiny-bbb222)\n")
    assert stored(output) == before and (output / "tiny-aaa111").is_dir()


def test_show_an_unknown_run_or_a_missing_store(output, monkeypatch, capsys):
    code, err = main(monkeypatch, capsys, "show", "nope", "--output", output)
    assert code == 2 and err.startswith("error: no run matching 'nope'") and err.count("\n") == 1
    missing = output.parent / "none"
    code, err = main(monkeypatch, capsys, "show", "tiny", "--output", missing)
    assert (code, err) == (2, f"error: no results store at {missing / 'store.sqlite'}: "
                              "pass the --output folder of the runs\n")
    assert not missing.exists()


def test_show_a_run_with_nothing_recorded(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_STORE", raising=False)
    Store(tmp_path / "store.sqlite").start_run("r1", model="m", config={}, fingerprint={}, env={}, output_dir="")
    shown = lines(invoke("show", "r1", "--output", tmp_path).stdout)
    assert shown[7:] == ["", "settings", "none recorded", "", "model fingerprint", "none recorded", "",
                         "environment", "none recorded", "", "no task results stored"]


def test_values_print_as_text_not_markup(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    store.start_run("r1", model="org/[bold]m[/bold]", config=config(model_args={"tag": "[red]"}), fingerprint={},
                    env={}, output_dir=str(tmp_path / "r1"))
    recorder = Console(record=True, width=200)
    recorder.print(runs_table(store))
    assert lines(recorder.export_text())[3].endswith(" org/[bold]m[/bold] tag=[red] 5 arc_easy,piqa 0 running")
