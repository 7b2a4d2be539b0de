"""The endpoint backend (``--model openai:URL``) against the reference server on loopback: every
number it returns equals the local AR backend's on the same tiny model, and a server that fails,
hangs or drops the connection is retried, then reported on one line, with nothing stored for the
failed requests and the run resumable."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import DATA_DIR  # noqa: E402
from serving_local import running_server, tiny_chat_model  # noqa: E402

from harness.errors import HarnessError  # noqa: E402
from harness.models.base import GenerateRequest, InfillRequest, LoglikelihoodRequest  # noqa: E402
from harness.models.endpoint import EndpointLM  # noqa: E402
from harness.models.hf_ar import HFCausalLM  # noqa: E402
from harness.models.settings import ARSettings, EndpointSettings  # noqa: E402
from harness.serving.client import EndpointError  # noqa: E402
from harness.serving.reference_server import ServerOptions  # noqa: E402

PAIRS = [LoglikelihoodRequest("The quick brown", " fox"),
         LoglikelihoodRequest("Question: How do I boil an egg?\nAnswer: ", "Put it in"),  # trailing space moves
         LoglikelihoodRequest("def add(a, b):", "\n    return a + b"),
         LoglikelihoodRequest("In my palm is", "", segments=(" a clear", " stone"))]
GENERATIONS = [GenerateRequest("The quick brown", 12, ("\n",)), GenerateRequest("In my palm is", 10, ()),
               GenerateRequest("Sarah was a much", 6, (), reference=" better surgeon")]


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    return tiny_chat_model()


@pytest.fixture(scope="module")
def local(tiny):
    model, tokenizer = tiny
    return HFCausalLM(model, tokenizer, name="tiny", weights="tiny", settings=ARSettings())


@pytest.fixture(scope="module")
def options():
    return ServerOptions()


@pytest.fixture(scope="module")
def url(tiny, options):
    with running_server(*tiny, options=options) as base:
        yield base


@pytest.fixture
def faults(options):
    """The module server's options, restored after the test."""
    saved = dict(vars(options))
    yield options
    vars(options).update(saved)


def served(url, **args) -> EndpointLM:
    return EndpointLM(EndpointSettings(base_url=url, **args))


def greedy_pair(local) -> LoglikelihoodRequest:
    """A pair whose continuation is the model's greedy next token (so is_greedy must be True)."""
    import torch

    ids = local.encode("The quick brown")
    with torch.no_grad():
        best = local.model(torch.tensor([ids])).logits[0, -1].argmax().item()
    return LoglikelihoodRequest("The quick brown", local.tokenizer.decode([best]))


@pytest.mark.parametrize("args", [{}, {"logprobs": "echo"}, {"logprobs": "prompt_logprobs"}])
def test_loglikelihoods_equal_the_local_backend(url, local, args):
    pairs = PAIRS + [greedy_pair(local)]
    expected = local.loglikelihood(pairs)
    got = served(url, **args).loglikelihood(pairs)
    assert [r.n_tokens for r in got] == [r.n_tokens for r in expected]
    assert [r.is_greedy for r in got] == [r.is_greedy for r in expected]
    assert expected[-1].is_greedy
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, expected)) < 1e-4


def test_text_prompts_split_at_the_context_end(url, local):
    """Without token ids the continuation is the tokens from the context's end (text offsets);
    with this tokenizer the split falls where lm-eval's does."""
    lm = served(url)
    lm.token_source = None
    pairs = PAIRS[:3]
    for got, want in zip(lm.loglikelihood(pairs), local.loglikelihood(pairs)):
        assert got.n_tokens == want.n_tokens and abs(got.logprob - want.logprob) < 1e-4


def test_a_local_tokenizer_gives_the_same_numbers(url, local, tmp_path):
    local.tokenizer.save_pretrained(tmp_path)
    lm = served(url, tokenizer=str(tmp_path))
    assert lm.token_source == "tokenizer"
    got, want = lm.loglikelihood(PAIRS), local.loglikelihood(PAIRS)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want)) < 1e-4


def test_generate_and_infill_equal_the_local_backend(url, local):
    lm = served(url)
    for got, want in zip(lm.generate(GENERATIONS), local.generate(GENERATIONS)):
        assert got.text == want.text
    fills = [InfillRequest("The quick", " dog.", 5), InfillRequest("def add(a, b):", "\n", 3, reference="x")]
    got, want = lm.infill(fills), local.infill(fills)
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.n_tokens for r in got] == [r.n_tokens for r in want] == [5, 3 + len(local.encode("x"))]
    assert all(r.extra["infill_mode"] == "prefix" for r in got)


def test_chat_prompts_go_through_the_chat_api(url, local, tiny):
    """A chat history rendered by the endpoint travels as messages; the server's template gives
    what the local backend generates from the locally rendered template."""
    _, tokenizer = tiny
    messages = [{"role": "user", "content": "How do I boil an egg?"}]
    lm = served(url)
    context = lm.render_chat(messages)
    assert json.loads(context) == {"chat_messages": messages}
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    got = lm.generate([GenerateRequest(context, 8, ())])[0]
    assert got.text == local.generate([GenerateRequest(rendered, 8, ())])[0].text
    with pytest.raises(HarnessError, match="chat-completions API scores no given continuation"):
        lm.loglikelihood([LoglikelihoodRequest(context, " Put")])
    with pytest.raises(HarnessError, match="server's chat template"):
        lm.chat_template("tool_use")


def test_a_server_without_prompt_logprobs_is_one_clear_error(url, local, faults):
    faults.echo_logprobs = False
    got = served(url).loglikelihood(PAIRS[:1])  # auto: echo refused, prompt_logprobs answers
    assert abs(got[0].logprob - local.loglikelihood(PAIRS[:1])[0].logprob) < 1e-4
    faults.prompt_logprobs = False
    with pytest.raises(HarnessError) as error:
        served(url).loglikelihood(PAIRS[:1])
    message = str(error.value)
    assert "returns no prompt log-probabilities" in message and "\n" not in message


def test_fingerprint_records_the_server_and_never_the_key(url, monkeypatch):
    monkeypatch.setenv("TEST_SERVED_KEY", "sk-secret-value")
    fingerprint = served(url, api_key_env="TEST_SERVED_KEY").fingerprint
    assert fingerprint["engine"] == "harness-reference" and fingerprint["model"] == "tiny"
    assert fingerprint["server"]["max_model_len"] == 512 and fingerprint["server_hardware"]["source"] == "reported"
    assert "sk-secret-value" not in json.dumps(fingerprint)


def test_errors_are_retried_then_reported(url, faults):
    seen = url.app.state.requests_seen
    faults.fail_first = seen + 2  # the next two completion requests fail
    assert served(url, max_retries=2).generate(GENERATIONS[:1])[0].text
    assert url.app.state.requests_seen == seen + 3
    faults.fail_first = 10 ** 6
    with pytest.raises(EndpointError, match=r"HTTP 500.*\(2 attempts\)"):
        served(url, max_retries=1).generate(GENERATIONS[:1])


def test_timeouts_and_dropped_connections_are_retried(url, faults, local):
    lm = served(url, max_retries=1, timeout=0.5)
    seen = url.app.state.requests_seen
    faults.hang_first, faults.hang_s = 1, 5.0
    vars(faults).update(fail_first=seen)  # the next request hangs, the retry answers
    assert lm.generate(GENERATIONS[:1])[0].text == local.generate(GENERATIONS[:1])[0].text
    seen = url.app.state.requests_seen
    faults.hang_first, faults.close_first, faults.fail_first = 0, 1, seen
    assert lm.generate(GENERATIONS[:1])[0].text == local.generate(GENERATIONS[:1])[0].text
    faults.hang_first, faults.close_first, faults.fail_first = 10 ** 6, 0, url.app.state.requests_seen
    with pytest.raises(EndpointError, match=r"no answer within the 0.5 s timeout \(2 attempts\)"):
        lm.generate(GENERATIONS[:1])


def test_a_failed_batch_stores_nothing_and_the_run_resumes(url, faults, tmp_path):
    from harness.plan import RunConfig
    from harness.runner import evaluate
    from harness.store import Store

    config = RunConfig(model=f"openai:{url}", tasks=["lambada_openai"], limit=6, batch_size=2,
                       data_dir=DATA_DIR, output=tmp_path, model_args={"max_retries": 0})
    healthy = evaluate(RunConfig(**{**vars(config), "output": tmp_path / "healthy"}))
    faults.fail_first = 10 ** 6
    with pytest.raises(EndpointError):
        evaluate(config)
    store = Store(tmp_path / "store.sqlite")
    (run,) = store.runs()
    assert run["status"] == "failed" and not store.done_docs(run["run_id"], "lambada_openai")
    faults.fail_first = 0
    seen = url.app.state.requests_seen
    resumed = evaluate(RunConfig(**{**vars(config), "model_args": {"max_retries": 3, "num_concurrent": 2}}))
    assert resumed["harness"]["run_id"] == run["run_id"]  # transport settings are not the run's identity
    assert url.app.state.requests_seen == seen + 6
    assert resumed["results"] == healthy["results"]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    for model, expected in (("openai:http://127.0.0.1:9/v1", "connection refused"),
                            ("openai:ftp://host/v1", "must look like http://HOST:PORT/v1")):
        done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--model", model, "--tasks", "triviaqa",
                               "--limit", "1", "--output", str(tmp_path), "--model_args", "max_retries=0",
                               "--data-dir", str(DATA_DIR)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_endpoint_arguments_are_validated():
    with pytest.raises(HarnessError, match="unknown model argument"):
        from harness.models.settings import settings_for

        settings_for("endpoint", {"base_url": "http://127.0.0.1:1/v1", "temperature": 0.5})
    with pytest.raises(HarnessError, match="num_concurrent must be"):
        EndpointSettings(base_url="http://127.0.0.1:1/v1", num_concurrent=0)


def test_perplexity_equals_the_local_backend_with_a_local_tokenizer(url, local, tmp_path):
    from harness.models.base import RollingRequest

    local.tokenizer.save_pretrained(tmp_path)
    texts = [RollingRequest("The quick brown fox jumps over the lazy dog. " * 3),
             RollingRequest("In my palm is a clear stone, and inside it is a small ivory statuette.", window=7)]
    got, want = served(url, tokenizer=str(tmp_path)).loglikelihood_rolling(texts), local.loglikelihood_rolling(texts)
    assert [r.n_tokens for r in got] == [r.n_tokens for r in want] and all(r.exact for r in got)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want)) < 1e-4
    with pytest.raises(HarnessError, match="needs the model's start token"):
        served(url).loglikelihood_rolling(texts[:1])


def test_lm_eval_model_names_take_the_route_url(url):
    """lm-eval's ``--model local-completions --model_args base_url=.../v1/completions,model=...``."""
    from harness.models.factory import build_model
    from harness.plan import RunConfig, plan_run

    plan = plan_run(RunConfig(model="local-completions", tasks=["triviaqa"],
                              model_args={"base_url": f"{url}/completions", "model": "tiny", "num_concurrent": 2}))
    lm = build_model(plan.card, settings=plan.settings)
    assert lm.fingerprint == {**served(url).fingerprint, "batch_size": lm.batch_size}
    with pytest.raises(HarnessError, match="needs base_url"):
        plan_run(RunConfig(model="local-chat-completions", tasks=["triviaqa"]))
