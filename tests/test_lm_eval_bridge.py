"""The harness's models as lm-eval's `harness` model, on a local task YAML over a local jsonl file."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from harness.models.base import LoglikelihoodRequest  # noqa: E402
from harness.models.factory import build_model  # noqa: E402

DOCS = [{"question": "How do I boil an egg?", "choices": ["Put it in boiling water.", "Throw it."], "label": 0},
        {"question": "What is two plus two?", "choices": ["Four.", "Five."], "label": 0},
        {"question": "Where do fish live?", "choices": ["In trees.", "In water."], "label": 1}]


@pytest.fixture()
def local_task(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    (tmp_path / "local_mc.yaml").write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    return tmp_path


@pytest.mark.parametrize("which", ["ar", "dlm"])
def test_simple_evaluate_through_the_bridge(which, local_task, tiny_llama_dir, tiny_dlm_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from harness.models.lm_eval_bridge import HarnessLM

    path = str(tiny_llama_dir if which == "ar" else tiny_dlm_dir)
    extra = {} if which == "ar" else {"estimator": "mc_time", "samples": 4}
    lm = HarnessLM(model=path, batch_size=4, **extra)
    out = lm_eval.simple_evaluate(model=lm, tasks=["local_mc"], task_manager=TaskManager(include_path=str(local_task)),
                                  log_samples=True)
    assert 0.0 <= out["results"]["local_mc"]["acc,none"] <= 1.0
    sample = out["samples"]["local_mc"][0]
    direct = build_model(path, batch_size=4, model_args=extra).loglikelihood(
        [LoglikelihoodRequest("Question: How do I boil an egg?\nAnswer:", " Put it in boiling water.")])[0]
    assert sample["resps"][0][0][0] == pytest.approx(direct.logprob, abs=1e-4)


def test_harness_lm_eval_command(local_task, tiny_dlm_dir):
    done = subprocess.run([sys.executable, "-m", "harness.cli", "lm-eval", "run", "--model", "harness", "--model_args",
                           f"model={tiny_dlm_dir},estimator=mc_count,samples=2", "--tasks", "local_mc",
                           "--include_path", str(local_task), "--limit", "2"], capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "local_mc" in done.stdout
