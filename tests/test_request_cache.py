"""The request cache across runs, Ctrl-C then resume, and the run command's lm-eval option names."""
import json

import pytest
from typer.testing import CliRunner

from harness.cli import app, optional_values
from harness.models.factory import build_model
from harness.runner import RunConfig, RunInterrupted, evaluate
from harness.store import Store


class Counting:
    """A backend that counts the requests it scores and can be told to press Ctrl-C on call n."""

    def __init__(self, model, interrupt_on: int | None = None):
        self.model, self.interrupt_on, self.calls, self.scored = model, interrupt_on, 0, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def loglikelihood(self, requests):
        self.calls += 1
        if self.calls == self.interrupt_on:
            raise KeyboardInterrupt
        self.scored += len(requests)
        return self.model.loglikelihood(requests)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return build_model(str(tiny_llama_dir), batch_size=4)


def config(tiny_llama_dir, data_dir, output, tasks, limit, **extra):
    return RunConfig(model=str(tiny_llama_dir), tasks=tasks, limit=limit, data_dir=data_dir, output=output,
                     batch_size=4, **extra)


def test_a_second_run_scores_only_what_is_new(tiny, tiny_llama_dir, data_dir, tmp_path):
    first = evaluate(config(tiny_llama_dir, data_dir, tmp_path, ["piqa"], 4), model=Counting(tiny))
    model = Counting(tiny)
    second = evaluate(config(tiny_llama_dir, data_dir, tmp_path, ["piqa", "winogrande"], 4), model=model)
    assert second["harness"]["run_id"] != first["harness"]["run_id"]
    assert second["harness"]["cached_records"] == {"piqa": 4, "winogrande": 0}
    assert model.scored == 4 * 2  # winogrande's 4 documents, 2 requests each; piqa came from the first run
    assert second["results"]["piqa"] == first["results"]["piqa"]
    model = Counting(tiny)
    third = evaluate(config(tiny_llama_dir, data_dir, tmp_path, ["piqa"], 6), model=model)
    assert third["harness"]["cached_records"] == {"piqa": 4} and model.scored == 2 * 2
    model = Counting(tiny)
    fresh = evaluate(config(tiny_llama_dir, data_dir, tmp_path / "other", ["piqa"], 6), model=model)
    assert model.scored == 12  # another store: nothing to reuse
    model = Counting(tiny)
    evaluate(config(tiny_llama_dir, data_dir, tmp_path, ["piqa"], 6, seed=7, use_cache=False), model=model)
    assert model.scored == 12
    samples = [json.loads(line) for line in
               (tmp_path / third["harness"]["run_id"] / "samples_piqa.jsonl").read_text().splitlines()]
    others = [json.loads(line) for line in
              (tmp_path / "other" / fresh["harness"]["run_id"] / "samples_piqa.jsonl").read_text().splitlines()]
    assert samples == others  # a reused record is the record the model would have given


def test_cache_is_keyed_by_the_prompt(tiny, tiny_llama_dir, data_dir, tmp_path):
    evaluate(config(tiny_llama_dir, data_dir, tmp_path, ["piqa"], 3), model=Counting(tiny))
    model = Counting(tiny)
    shots = evaluate(config(tiny_llama_dir, data_dir, tmp_path, ["piqa"], 3, num_fewshot=1), model=model)
    assert shots["harness"]["cached_records"] == {"piqa": 0} and model.scored == 6
    assert shots["n-shot"] == {"piqa": 1}


def test_ctrl_c_keeps_finished_batches_and_the_same_command_resumes(tiny, tiny_llama_dir, data_dir, tmp_path):
    run = config(tiny_llama_dir, data_dir, tmp_path, ["piqa"], 10)
    with pytest.raises(RunInterrupted) as caught:  # batches of 4 requests = 2 documents; the third is lost
        evaluate(run, model=Counting(tiny, interrupt_on=3))
    store = Store(tmp_path / "store.sqlite")
    (stored_run,) = store.runs()
    assert stored_run["status"] == "interrupted"
    assert store.done_docs(stored_run["run_id"], "piqa") == {0, 1, 2, 3}
    assert str(caught.value) == (f"interrupted: 4 of 10 documents of run {stored_run['run_id']} are stored in "
                                 f"{tmp_path / 'store.sqlite'}; run the same command to resume")
    model = Counting(tiny)
    resumed = evaluate(run, model=model)
    assert resumed["harness"]["reused_records"] == {"piqa": 4} and model.scored == 12
    clean = evaluate(config(tiny_llama_dir, data_dir, tmp_path / "clean", ["piqa"], 10), model=Counting(tiny))
    assert resumed["results"] == clean["results"]


def test_run_accepts_lm_evals_option_names(tiny_llama_dir, data_dir, tmp_path):
    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_llama_dir), "--tasks", "piqa,gsm8k", "--limit", "0.001", "--batch_size", "4",
        "--output_path", str(tmp_path), "--model_args", "max_length=256", "--num_fewshot", "1",
        "--gen_kwargs", "max_gen_toks=3,until=Question:|\\n\\n", "--task_options", "gsm8k.fewshot_sampler=lm-eval",
        "--log_samples", "--data_dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["config"]["limit"] == 0.001 and saved["n-samples"]["piqa"]["effective"] == 2
    assert saved["config"]["model_args"] == {"max_length": 256} and saved["n-shot"] == {"piqa": 1, "gsm8k": 1}
    options = saved["configs"]["gsm8k"]["options"]
    assert (options["max_tokens"], options["until"], options["fewshot_sampler"]) == (3, ["Question:", "\n\n"], "lm-eval")
    sample = json.loads((run_dir / "samples_gsm8k.jsonl").read_text().splitlines()[0])
    assert len(sample["fewshot_ids"]) == 1 and len(sample["prompt_hash"]) == 64
    bad = CliRunner().invoke(app, ["run", "--model", str(tiny_llama_dir), "--tasks", "piqa", "--task_options", "piqa"])
    assert bad.exit_code != 0


def test_apply_chat_template_takes_an_optional_name():
    assert optional_values(["run", "--apply_chat_template", "--tasks", "x"]) == \
        ["run", "--apply_chat_template", "default", "--tasks", "x"]
    assert optional_values(["run", "--tasks", "x", "--apply-chat-template"])[-1] == "default"
    assert optional_values(["run", "--apply_chat_template", "tool_use"]) == ["run", "--apply_chat_template", "tool_use"]
    assert optional_values(["lm-eval", "--apply_chat_template"]) == ["lm-eval", "--apply_chat_template"]


def test_readme_python_api_example_runs(data_dir, tmp_path, monkeypatch):
    """The README's example, as written, on the default model (skipped where it is not installed)."""
    pytest.importorskip("gguf")
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("<!-- python-api-example -->")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_DATA_DIR", str(data_dir))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    results = scope["results"]
    assert set(results["results"]) == {"piqa", "lambada_openai"}
    assert results["n-samples"]["piqa"]["effective"] == 8
    assert (tmp_path / "runs" / results["harness"]["run_id"] / "results.json").exists()
