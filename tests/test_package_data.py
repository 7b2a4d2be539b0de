"""The YAML ships inside the package; user directories add to it; one broken file breaks only its own name."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import harness.catalog as catalog_module
from harness.catalog import Catalog, add_include_paths, catalog
from harness.config import MODELS_DIR, RESOURCES_DIR, SUITES_DIR, TASKS_DIR
from harness.errors import HarnessError
from harness.models.factory import resolve_card

REPO = Path(__file__).resolve().parent.parent
BROKEN = "name: broken\nbuilder: a: b\ndescription: x\n"  # malformed on line 2


@pytest.fixture(autouse=True)
def clean_include_paths(monkeypatch):
    """Each test starts and ends with no user include directories and a fresh process-wide catalog."""
    monkeypatch.delenv("HARNESS_INCLUDE_PATH", raising=False)
    monkeypatch.setattr(catalog_module, "_added", [])
    monkeypatch.setattr(catalog_module, "_warned", set())
    catalog.cache_clear()
    yield
    catalog.cache_clear()


def user_dir(root: Path, **files: str) -> Path:
    """An include directory; keyword ``tasks__mine`` becomes ``tasks/mine.yaml``."""
    for key, text in files.items():
        folder, name = key.split("__")
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"{name}.yaml").write_text(text)
    return root


def renamed(path: Path, name: str) -> str:
    return re.sub(r"(?m)^name: .*$", f"name: {name}", path.read_text(), count=1)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", **env})


def test_the_yaml_lives_in_the_package():
    assert RESOURCES_DIR == Path(catalog_module.__file__).resolve().parent / "resources"
    assert TASKS_DIR.parent == SUITES_DIR.parent == MODELS_DIR.parent == RESOURCES_DIR
    assert not (REPO / "suites").exists() and not (REPO / "baselines").exists()


def test_a_user_task_suite_and_model_join_the_catalog(tmp_path, data_dir):
    folder = user_dir(tmp_path, tasks__piqa_mine=renamed(TASKS_DIR / "piqa.yaml", "piqa_mine"),
                      suites__mine="name: mine\ntasks: [piqa_mine, hellaswag]\n",
                      models__smol_mine=renamed(MODELS_DIR / "smollm2-135m.yaml", "smol-mine"))
    add_include_paths([folder])
    c = catalog()
    assert "piqa_mine" in c.tasks.names() and "piqa" in c.tasks.names() and not c.problems
    task = c.task("piqa_mine", data_dir)
    assert task.spec.path == str(folder / "tasks" / "piqa_mine.yaml")
    assert len(task.docs()) == len(c.task("piqa", data_dir).docs())
    assert c.suites.get("mine").tasks == ("piqa_mine", "hellaswag")
    assert resolve_card("smol-mine").weights == resolve_card("smollm2-135m").weights


def test_the_environment_variable_adds_directories(tmp_path, monkeypatch):
    one = user_dir(tmp_path / "one", tasks__t1=renamed(TASKS_DIR / "piqa.yaml", "t1"))
    two = user_dir(tmp_path / "two", tasks__t2=renamed(TASKS_DIR / "piqa.yaml", "t2"))
    monkeypatch.setenv("HARNESS_INCLUDE_PATH", f"{one}{os.pathsep}{two}")
    assert {"t1", "t2", "piqa"} <= set(catalog().tasks.names())


def test_a_malformed_file_is_a_warning_and_an_error_only_when_used(tmp_path, capsys):
    builtin = Catalog().tasks.names()
    folder = user_dir(tmp_path, tasks__broken=BROKEN,
                      tasks__piqa_mine=renamed(TASKS_DIR / "piqa.yaml", "piqa_mine"))
    add_include_paths([folder])
    c = catalog()
    assert c.tasks.names() == sorted([*builtin, "piqa_mine"])
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and re.match(r"warning: .*tasks/broken\.yaml:2: malformed YAML", warnings[0])
    add_include_paths([folder])  # rebuilt, but not warned again
    catalog()
    assert capsys.readouterr().err == ""
    with pytest.raises(HarnessError, match=r"tasks/broken\.yaml:2: malformed YAML"):
        catalog().task("broken", None)
    with pytest.raises(HarnessError, match=r"broken\.yaml:2"):
        catalog().tasks.get("broken")


def test_an_invalid_model_card_and_a_suite_with_a_missing_task(tmp_path):
    folder = user_dir(tmp_path, models__bad="name: bad-card\nbackend: tpu\nweights: {}\n",
                      suites__lost="name: lost\ntasks: [piqa, no_such_task]\n")
    c = Catalog([folder])
    assert len(c.problems) == 2 and "bad-card" not in c.models.names() and "lost" not in c.suites.names()
    with pytest.raises(HarnessError, match=r"models/bad\.yaml: backend must be"):
        c.models.get("bad-card")  # by its name, and by its file's stem
    with pytest.raises(HarnessError, match=r"models/bad\.yaml: backend must be"):
        c.models.get("bad")
    with pytest.raises(HarnessError, match=r"suites/lost\.yaml: unknown task 'no_such_task'"):
        c.suites.get("lost")


def test_a_missing_include_directory_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(HarnessError, match="include directory .*nope does not exist"):
        add_include_paths([tmp_path / "nope"])
    with pytest.raises(HarnessError, match="holds none of tasks/, suites/, models/"):
        add_include_paths([tmp_path])
    monkeypatch.setenv("HARNESS_INCLUDE_PATH", str(tmp_path / "nope"))
    with pytest.raises(HarnessError, match=r"\$HARNESS_INCLUDE_PATH: include directory .*nope does not exist"):
        catalog()


def test_a_name_defined_twice_is_an_error_naming_both_files(tmp_path):
    folder = user_dir(tmp_path, tasks__piqa_copy=(TASKS_DIR / "piqa.yaml").read_text())
    with pytest.raises(HarnessError) as caught:
        Catalog([folder])
    message = str(caught.value)
    assert "task 'piqa' is defined twice" in message
    assert str(folder / "tasks" / "piqa_copy.yaml") in message and str(TASKS_DIR / "piqa.yaml") in message


def test_the_cli_lists_good_tasks_warns_once_and_fails_on_the_broken_one(tmp_path, data_dir):
    folder = user_dir(tmp_path / "inc", tasks__broken=BROKEN,
                      tasks__piqa_mine=renamed(TASKS_DIR / "piqa.yaml", "piqa_mine"))
    done = cli("ls", "tasks", HARNESS_INCLUDE_PATH=str(folder))
    assert done.returncode == 0 and "piqa_mine" in done.stdout and "hellaswag" in done.stdout
    assert done.stderr.count("warning:") == 1 and "broken.yaml:2" in done.stderr
    done = cli("run", "--model", "smollm2-135m", "--tasks", "broken", "--data-dir", str(data_dir), "--output",
               str(tmp_path / "out"), HARNESS_INCLUDE_PATH=str(folder))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert re.search(r"error: .*broken\.yaml:2: malformed YAML", done.stderr)
    done = cli("ls", "tasks", HARNESS_INCLUDE_PATH=str(tmp_path / "nope"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "does not exist" in done.stderr


def test_the_wheel_holds_every_yaml(tmp_path):
    """Built from a copy of the sources (the build writes build/ and *.egg-info next to pyproject.toml)."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    shutil.copytree(REPO / "harness", source / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - started < 60
    [wheel] = (tmp_path / "dist").glob("dlm_harness-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "harness").rglob("*.y*ml")}
    assert len(expected) >= 50 and expected <= names
    assert sum(n.startswith("harness/resources/") and n.endswith(".yaml") for n in names) == len(expected)
    for folder in ("tasks", "suites", "models", "papers"):
        assert any(n.startswith(f"harness/resources/{folder}/") for n in names)
