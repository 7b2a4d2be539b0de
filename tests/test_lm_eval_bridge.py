"""The harness's models as lm-eval's `harness` model, on a local task YAML over a local jsonl file."""
import json
import subprocess
import sys

import pytest
from lm_eval_local import write_local_mc

pytest.importorskip("lm_eval")

from harness.models.base import GenerateRequest, LoglikelihoodRequest  # noqa: E402
from harness.models.factory import build_model  # noqa: E402



@pytest.fixture()
def local_task(tmp_path):
    write_local_mc(tmp_path, tmp_path / "docs.jsonl")
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


def test_harness_lm_eval_runs_lm_evals_task_on_local_data(tiny_llama_dir, data_dir, tmp_path):
    """--data-dir (removed from lm-eval's arguments) adds the local task folder: lm-eval's own triviaqa
    runs offline, on the local documents."""
    done = subprocess.run([sys.executable, "-m", "harness.cli", "lm-eval", "--model", "harness", "--model_args",
                           f"model={tiny_llama_dir}", "--tasks", "triviaqa", "--limit", "2",
                           "--data-dir", str(data_dir), "--gen_kwargs", "max_gen_toks=2", "--log_samples",
                           "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "HARNESS_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    (samples,) = (tmp_path / "out").glob("*/samples_triviaqa_*.jsonl")
    first = json.loads(samples.read_text().splitlines()[0])
    assert first["doc"]["question"] == "Brunswick, Lancastrian and Pearl Pickler are types of which vegetable?"
    assert first["arguments"]["gen_args_0"]["arg_1"] == {"until": ["\n", ".", ","], "do_sample": False,
                                                          "temperature": 0.0, "max_gen_toks": 2}


# ---- plain `lm_eval --model harness` (the installed .pth hook) --------------------------------
def test_installed_hook_registers_harness_next_to_lm_eval_models():
    """At interpreter start nothing heavy is imported; lm-eval then resolves its own models and ours."""
    code = ("import sys; print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)); "
            "from lm_eval.api.registry import get_model; print(get_model('harness'), get_model('hf'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "[]", "<class 'harness.models.lm_eval_bridge.HarnessLM'> <class 'lm_eval.models.huggingface.HFLM'>"]


def test_hook_registers_only_after_lm_eval_models_ran(monkeypatch):
    import lm_eval
    from lm_eval.api.registry import model_registry

    from harness import lm_eval_hook

    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    lm_eval_hook.install()
    lm_eval_hook.install()
    assert sum(isinstance(f, lm_eval_hook._Finder) for f in sys.meta_path) == 1
    assert lm_eval_hook._Finder().find_spec("lm_eval.api", lm_eval.__path__) is None
    spec = lm_eval_hook._Finder().find_spec("lm_eval.models", lm_eval.__path__)
    assert isinstance(spec.loader, lm_eval_hook._RegisteringLoader) and spec.loader.get_filename().endswith(
        "lm_eval/models/__init__.py")
    assert "harness" in model_registry and "hf" in model_registry


def test_wheel_ships_the_pth_at_its_root(tmp_path):
    """A regular build puts dlm_harness_lm_eval.pth next to the package (the editable install is
    checked by the subprocess test above, in the environment `make setup` installs)."""
    import shutil
    import zipfile

    from conftest import REPO

    source = tmp_path / "src"
    shutil.copytree(REPO / "harness", source / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        pth = archive.read("dlm_harness_lm_eval.pth")
        assert pth == b"import harness.lm_eval_hook; harness.lm_eval_hook.install()\n"
        assert "harness/lm_eval_hook.py" in archive.namelist()


# ---- generation kwargs, batching, chat templates ---------------------------------------------
@pytest.mark.parametrize("gen_kwargs, can_sample, expected", [
    ({}, False, GenerateRequest("c", 256, ())),
    ({"until": "\n"}, False, GenerateRequest("c", 256, ("\n",))),
    ({"until": ["Q:", "\n\n"], "max_gen_toks": 7, "do_sample": False, "temperature": 0.0}, False,
     GenerateRequest("c", 7, ("Q:", "\n\n"))),
    ({"until": ["Q:"], "do_sample": False, "temperature": 0.0}, True,
     GenerateRequest("c", 256, ("Q:",), gen_kwargs={"temperature": 0.0})),
    ({"do_sample": False, "temperature": 0.7}, True, GenerateRequest("c", 256, (), gen_kwargs={"temperature": 0.0})),
    ({"do_sample": True}, True, GenerateRequest("c", 256, (), gen_kwargs={"temperature": 0.0})),
    ({"do_sample": True, "temperature": 0.7, "top_p": 0.9}, True,
     GenerateRequest("c", 256, (), gen_kwargs={"temperature": 0.7, "top_p": 0.9})),
    ({"temperature": 1}, True, GenerateRequest("c", 256, (), gen_kwargs={"temperature": 1.0})),
])
def test_gen_kwargs_mapping(gen_kwargs, can_sample, expected):
    from harness.models.lm_eval_bridge import generate_request

    assert generate_request("c", gen_kwargs, can_sample) == expected


@pytest.mark.parametrize("gen_kwargs, can_sample, message", [
    ({"do_sample": True, "temperature": 0.7}, False,
     "lm-eval asks to sample (temperature=0.7), but this backend decodes greedily only; set do_sample=false or "
     "temperature=0 in --gen_kwargs"),
    ({"num_beams": 2, "top_k": 5}, True, "lm-eval gen_kwargs num_beams, top_k are not supported by the harness model "
                                         "(supported: until, max_gen_toks, do_sample, temperature, top_p)"),
    ({"until": 3}, True, "lm-eval gen_kwargs until must be a string or a list of strings, not 3"),
    ({"max_gen_toks": 0}, True, "lm-eval gen_kwargs max_gen_toks must be a positive integer, not 0"),
    ({"temperature": -1}, True, "lm-eval gen_kwargs temperature must be a non-negative number, not -1"),
])
def test_gen_kwargs_refused(gen_kwargs, can_sample, message):
    from harness.errors import HarnessError
    from harness.models.lm_eval_bridge import generate_request

    with pytest.raises(HarnessError) as error:
        generate_request("c", gen_kwargs, can_sample)
    assert str(error.value) == message


@pytest.fixture(scope="module")
def ar_lm(tiny_llama_dir):
    from harness.models.lm_eval_bridge import HarnessLM

    return HarnessLM(model=str(tiny_llama_dir), batch_size=4)


def instances(*args):
    from types import SimpleNamespace

    return [SimpleNamespace(args=a) for a in args]


def test_generation_is_one_backend_call(ar_lm, monkeypatch):
    calls = []
    generate = ar_lm.scorer.generate
    monkeypatch.setattr(ar_lm.scorer, "generate", lambda requests: calls.append(list(requests)) or generate(requests))
    texts = ar_lm.generate_until(instances(("Question: a\nAnswer:", {"until": "\n", "max_gen_toks": 5}),
                                           ("The quick", {"until": [".", ","], "do_sample": False}),
                                           ("def add(a, b):", {"max_gen_toks": 3})))
    assert calls == [[GenerateRequest("Question: a\nAnswer:", 5, ("\n",)),
                      GenerateRequest("The quick", 256, (".", ",")), GenerateRequest("def add(a, b):", 3, ())]]
    assert texts == [r.text for r in generate(calls[0])]
    assert ar_lm.generate_until([]) == []


def test_sampling_reaches_only_the_diffusion_backend(ar_lm, tiny_dlm_dir):
    from harness.errors import HarnessError
    from harness.models.lm_eval_bridge import HarnessLM

    dlm = HarnessLM(model=str(tiny_dlm_dir), batch_size=2)
    assert (ar_lm.can_sample, dlm.can_sample) == (False, True)
    with pytest.raises(HarnessError, match="decodes greedily only"):
        ar_lm.generate_until(instances(("a", {"do_sample": True, "temperature": 0.5})))
    assert [len(t) >= 0 for t in dlm.generate_until(instances(("a", {"do_sample": True, "temperature": 0.5,
                                                                       "max_gen_toks": 2})))] == [True]


def test_device_defaults_to_cuda_when_there_is_one(ar_lm, monkeypatch):
    import torch

    from harness.models.lm_eval_bridge import default_device

    assert ar_lm.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"


def test_loglikelihood_rolling_kept(ar_lm):
    from harness.models.base import RollingRequest

    text = "The quick brown fox jumps over the lazy dog."
    assert ar_lm.loglikelihood_rolling(instances((text,))) == [
        ar_lm.scorer.loglikelihood_rolling([RollingRequest(text)])[0].logprob]


TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
            "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture()
def chat_lm(ar_lm, monkeypatch):
    monkeypatch.setattr(ar_lm.scorer.tokenizer, "chat_template", TEMPLATE, raising=False)
    return ar_lm


def test_chat_template_hooks(chat_lm, tiny_llama_dir):
    from harness.errors import HarnessError

    assert chat_lm.tokenizer_name == str(tiny_llama_dir).replace("/", "__")
    assert chat_lm.chat_template(True) == TEMPLATE and chat_lm.template == "default"
    assert chat_lm.chat_template(False) is None
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 2+2?"}]
    assert chat_lm.apply_chat_template(history) == "<user>Q: 2+2?</user><assistant>"
    assert chat_lm.apply_chat_template([*history, {"role": "assistant", "content": "A:"}],
                                       add_generation_prompt=False) == "<user>Q: 2+2?</user><assistant>A:"
    with pytest.raises(HarnessError, match="has one unnamed template"):
        chat_lm.chat_template("tool_use")


def test_apply_chat_template_through_lm_eval(chat_lm, local_task):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=chat_lm, tasks=["local_mc"], apply_chat_template=True, log_samples=True,
                                  task_manager=TaskManager(include_path=str(local_task)), limit=1)
    assert out["samples"]["local_mc"][0]["arguments"][0][0] == \
        "<user>Question: How do I boil an egg?\nAnswer:</user><assistant>"


# ---- `harness lm-eval` arguments ---------------------------------------------------------------
def test_lm_eval_argv(tmp_path, monkeypatch, data_dir):
    from harness.errors import HarnessError
    from harness.lm_eval_tasks import lm_eval_argv, task_folder

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    folder = str(task_folder(data_dir))
    run = ["run", "--model", "harness", "--tasks", "gsm8k"]
    assert lm_eval_argv(run, None) == run
    assert lm_eval_argv(run, str(data_dir)) == [*run, "--include_path", folder]
    assert lm_eval_argv(["--data-dir", str(data_dir), *run], None) == [*run, "--include_path", folder]
    assert lm_eval_argv([*run, f"--data-dir={data_dir}"], "/nowhere") == [*run, "--include_path", folder]
    assert lm_eval_argv(["--help"], str(data_dir)) == ["--help"]
    assert lm_eval_argv([*run, "--include_path", "mine"], str(data_dir)) == [*run, "--include_path", "mine"]
    with pytest.raises(HarnessError, match="lm-eval takes one --include_path: give it or --data-dir, not both"):
        lm_eval_argv([*run, "--include_path", "mine", "--data-dir", str(data_dir)], None)
    with pytest.raises(HarnessError, match="--data-dir needs a folder"):
        lm_eval_argv([*run, "--data-dir"], None)
    with pytest.raises(HarnessError, match=f"data directory '{tmp_path / 'missing'}' does not exist"):
        lm_eval_argv(run, str(tmp_path / "missing"))


def test_lm_eval_tasks_command_prints_the_folder(tmp_path, monkeypatch, data_dir):
    import typer
    from typer.testing import CliRunner

    from harness.lm_eval_tasks import lm_eval_tasks, task_folder

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    app = typer.Typer()
    app.command()(lm_eval_tasks)
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert result.output == f"{task_folder(data_dir)}\n"
