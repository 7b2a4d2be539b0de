"""Registries and YAML validation, and the CLI's handling of bad input: one line, exit code 2."""
import subprocess
import sys

import pytest

from harness.catalog import Catalog, catalog
from harness.config import MODELS_DIR, SUITES_DIR, TASKS_DIR, read_yaml
from harness.errors import HarnessError
from harness.registry import Registry


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", **kwargs})


def test_every_built_in_yaml_validates():
    c = Catalog()
    assert not c.problems  # a broken built-in file would only be a warning at run time
    assert {"lambada_openai", "lambada_plain", "hellaswag", "winogrande", "social_iqa", "piqa"} <= set(c.tasks)
    assert "smollm2-135m" in c.models
    for name in c.tasks:
        c.task(name, None)  # builders import
    assert len(list(TASKS_DIR.glob("*.yaml"))) == len(c.tasks.names())
    assert len(list(SUITES_DIR.glob("*.yaml"))) == len(c.suites.names())
    assert len(list(MODELS_DIR.glob("*.yaml"))) == len(c.models.names())


def test_unknown_name_suggests_close_matches():
    registry = Registry("task")
    for name in ("hellaswag", "piqa", "winogrande"):
        registry.register(name, name)
    with pytest.raises(HarnessError, match="did you mean hellaswag"):
        registry.get("hellaswg")


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbuilder: [unclosed\n")
    with pytest.raises(HarnessError, match=r"bad\.yaml:\d+: malformed YAML"):
        read_yaml(bad)


def test_unknown_and_missing_keys_are_rejected_when_used(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text("name: t\nbuilder: harness.tasks.likelihood:PIQA\nprompt: x\n")
    c = Catalog([tmp_path], builtin=None)
    assert c.tasks.names() == [] and len(c.problems) == 1
    with pytest.raises(HarnessError, match="t.yaml: unknown key.*prompt"):
        c.tasks.get("t")
    (tmp_path / "tasks" / "t.yaml").write_text("name: t\n")
    with pytest.raises(HarnessError, match="missing required key.*builder"):
        Catalog([tmp_path], builtin=None).task("t", None)


def test_suite_naming_an_unknown_task_is_rejected_when_used(tmp_path):
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "s.yaml").write_text("name: s\ntasks: [hellaswag]\n")
    c = Catalog([tmp_path], builtin=None)
    assert "s" not in c.suites.names() and "unknown task 'hellaswag'" in c.problems[0]
    with pytest.raises(HarnessError, match=r"s\.yaml: unknown task 'hellaswag'"):
        c.suites.get("s")


@pytest.mark.parametrize("args, message", [
    (["run", "--model", "smollm2-135n", "--tasks", "piqa"], "unknown model 'smollm2-135n'; did you mean smollm2-135m"),
    (["run", "--model", "smollm2-135m", "--tasks", "hellaswg"], "did you mean hellaswag"),
    (["run", "--model", "smollm2-135m", "--tasks", "piqa", "--limit", "0"], "--limit must be a positive integer"),
    (["run", "--model", "smollm2-135m", "--tasks", "piqa", "--limit", "-3"], "--limit must be a positive integer"),
    (["ls", "widgets"], "cannot list 'widgets'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    done = cli(*args, "--output", str(tmp_path)) if args[0] == "run" else cli(*args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_data_file_names_the_path(tmp_path):
    done = cli("run", "--model", "smollm2-135m", "--tasks", "piqa", "--data-dir", str(tmp_path), "--output",
               str(tmp_path / "out"))
    assert done.returncode == 2 and "piqa/valid.jsonl" in done.stderr and "not found" in done.stderr


def test_model_directory_without_weights(tmp_path, data_dir):
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    done = cli("run", "--model", str(empty), "--tasks", "piqa", "--data-dir", str(data_dir), "--limit", "1",
               "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and "holds no weights" in done.stderr


def test_output_path_that_is_a_file(tmp_path, data_dir):
    target = tmp_path / "file"
    target.write_text("keep me")
    done = cli("run", "--model", "smollm2-135m", "--tasks", "piqa", "--data-dir", str(data_dir), "--output", str(target))
    assert done.returncode == 2 and "is a file" in done.stderr
    assert target.read_text() == "keep me"


def test_ls_lists_registered_names():
    done = cli("ls", "tasks")
    assert done.returncode == 0 and "hellaswag" in done.stdout
    assert catalog().models.get("smollm2-135m").backend == "hf_ar"
