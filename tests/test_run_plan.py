"""The run plan: settings resolved once, typed and validated before any weights load."""
from __future__ import annotations

import sqlite3
from pathlib import Path
import subprocess
import sys

import pytest

from harness.errors import HarnessError
from harness.models.settings import (AR_ARGS, DIFFUSION_ARGS, EstimatorSettings, SamplerSettings, ar_settings,
                                     diffusion_settings)
from harness.plan import RunConfig, plan_run


@pytest.mark.parametrize("args, message", [
    ({"samples": 0}, "samples must be >= 1"),
    ({"samples": "abc"}, "samples must be an integer"),
    ({"steps": -1}, "steps must be >= 1"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0}, "top_p must be > 0"),
    ({"estimator": "mc_tim"}, "method must be one of"),
    ({"greedy": "both"}, "greedy must be one of parallel, sequential"),
    ({"samplez": 3}, "unknown model argument(s) samplez"),
])
def test_bad_diffusion_arguments_are_one_line_errors(args, message):
    with pytest.raises(HarnessError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        diffusion_settings(args)
    assert "\n" not in str(caught.value)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(HarnessError) as caught:
        ar_settings({"samples": 4})
    assert all(key in str(caught.value) for key in AR_ARGS)
    with pytest.raises(HarnessError) as caught:
        diffusion_settings({"max_length": 4})
    assert "steps" in str(caught.value) and "estimator" in str(caught.value)


def test_one_default_per_setting():
    settings = diffusion_settings({})
    assert settings.estimator == EstimatorSettings() and settings.sampler == SamplerSettings()
    assert settings.estimator.method == "mc_time" and settings.sampler.name == "llada"
    both = diffusion_settings({"cfg_scale": 1.5, "samples": 8.0})
    assert both.estimator.cfg_scale == both.sampler.cfg_scale == 1.5 and both.estimator.samples == 8
    assert set(DIFFUSION_ARGS) >= {"estimator", "sampler", "samples", "steps", "start_token", "rope_cache_dtype"}


def test_plan_merges_card_suite_and_command_once(tiny_dlm_dir):
    plan = plan_run(RunConfig(model=str(tiny_dlm_dir), tasks=["piqa"], suite="diffugpt-table1",
                              model_args={"samples": 8}))
    assert plan.family == "diffusion" and plan.tasks[-1] == "piqa" and plan.tasks[0] == "triviaqa_diffugpt"
    assert plan.model_args == {"estimator": "paper_grid", "samples": 8, "sampler": "diffugpt", "temperature": 1.0}
    assert plan.settings.estimator.samples == 8 and plan.settings.sampler.name == "diffugpt"
    card = plan_run(RunConfig(model="diffugpt-s", tasks=["piqa"])).settings
    assert card.start_token == "none" and card.sampler.temperature == 0.95 and card.estimator.method == "paper_grid"


@pytest.mark.parametrize("extra, message", [
    (["--model-args", "samples=0"], "samples must be >= 1"),
    (["--model-args", "samples=abc"], "samples must be an integer"),
    (["--model-args", "steps=-1"], "steps must be >= 1"),
    (["--device", "foo"], "unknown --device 'foo'"),
    (["--dtype", "float8"], "--dtype must be one of"),
])
def test_cli_rejects_bad_model_arguments_before_loading_and_stores_no_run(tiny_dlm_dir, tiny_llama_dir, data_dir,
                                                                          tmp_path, extra, message):
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--model", str(tiny_dlm_dir), "--tasks", "piqa",
                           "--limit", "2", "--data-dir", str(data_dir), "--output", str(tmp_path), *extra],
                          capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    store = tmp_path / "store.sqlite"
    assert not store.exists() or not sqlite3.connect(store).execute("SELECT count(*) FROM runs").fetchone()[0]


def test_cli_rejects_bad_ar_argument(tiny_llama_dir, data_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--model", str(tiny_llama_dir), "--tasks",
                           "piqa", "--limit", "2", "--data-dir", str(data_dir), "--output", str(tmp_path),
                           "--model-args", "max_length=abc"], capture_output=True, text=True)
    assert done.returncode == 2 and "max_length must be an integer" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_run_that_fails_midway_is_marked_failed_not_running(tiny_dlm_dir, data_dir, tmp_path, monkeypatch):
    from harness.models.diffusion.backend import DiffusionLM
    from harness.runner import evaluate
    from harness.store import Store, default_store_path

    def broken(self, requests):
        raise HarnessError("the backend broke")

    monkeypatch.setattr(DiffusionLM, "loglikelihood", broken)
    with pytest.raises(HarnessError, match="broke"):
        evaluate(RunConfig(model=str(tiny_dlm_dir), tasks=["piqa"], limit=2, data_dir=data_dir, output=tmp_path))
    [run] = Store(default_store_path(tmp_path)).runs()
    assert run["status"] == "failed"


def test_cli_include_path_adds_a_user_task(tiny_llama_dir, data_dir, tmp_path):
    from harness.catalog import catalog

    tasks = tmp_path / "mine" / "tasks"
    tasks.mkdir(parents=True)
    builtin = catalog().tasks.get("piqa")
    tasks.joinpath("my_piqa.yaml").write_text(Path(builtin.path).read_text().replace("name: piqa", "name: my_piqa"))
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--model", str(tiny_llama_dir), "--tasks",
                           "my_piqa", "--limit", "2", "--data-dir", str(data_dir), "--output", str(tmp_path / "runs"),
                           "--include-path", str(tmp_path / "mine")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "my_piqa" in done.stdout
