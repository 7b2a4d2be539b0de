"""The serving benchmark and the endpoint backend over real HTTP on loopback: the benchmark's
arithmetic on the reference server with a known injected delay, ``harness bench --endpoint`` end to
end (stored, resumed, reported), and a hostile server (garbage answers, the API key)."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import DATA_DIR  # noqa: E402
from serving_local import running_app, running_server, tiny_chat_model  # noqa: E402

from harness.errors import HarnessError  # noqa: E402
from harness.serving.reference_server import ServerOptions  # noqa: E402

TOKEN_DELAY, FIRST_DELAY, OUTPUT = 0.04, 0.1, 5


@pytest.fixture(autouse=True)
def own_store(monkeypatch):
    monkeypatch.delenv("HARNESS_STORE", raising=False)


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    return tiny_chat_model()


def bench(url, tmp_path, **options):
    from harness.perf.serving_command import bench_serving

    options = {"num_prompts": 4, "input_words": [8, 16], "output_tokens": OUTPUT, "warmup": 0, **options}
    return bench_serving(url, None, options, model_args={}, output=tmp_path, seed=7, data_dir=DATA_DIR, log=print)


def one_letter_model(tiny):
    """A copy of the tiny model that always writes "a" (one whole character a token, so one
    streamed chunk a token)."""
    import copy

    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    (letter,) = tokenizer("a", add_special_tokens=False)["input_ids"]
    model.lm_head.register_forward_hook(lambda module, inputs, logits: (logits * 0).index_fill(-1, torch_index(letter), 10.0))
    return model, tokenizer


def torch_index(i: int):
    import torch

    return torch.tensor([i])


def test_benchmark_arithmetic_on_a_known_delay(tiny, tmp_path):
    """Every token waits TOKEN_DELAY (the first FIRST_DELAY more), off the model lock, so every
    latency is at least what the delays add up to, whatever the machine; per request e2e = TTFT +
    (tokens - 1) x TPOT exactly, so the means obey it too; two streams in flight finish sooner than
    the four requests could one after another. No upper bound on a time: the machine's speed is
    not what is tested."""
    options = ServerOptions(token_delay_s=TOKEN_DELAY, first_token_delay_s=FIRST_DELAY)
    with running_server(*one_letter_model(tiny), options=options) as url:
        _, records = bench(url, tmp_path, concurrency=[1, 2])
    one, two = records
    serial = 4 * (FIRST_DELAY + OUTPUT * TOKEN_DELAY)  # the four requests one after another, compute aside
    assert (one["variant"], two["variant"]) == ("concurrency 1", "concurrency 2")
    for r in records:
        assert r["completed"] == 4 and r["failed"] == 0 and r["output_tokens"] == 4 * OUTPUT
        assert r["token_count_source"] == "usage" and r["tokens_per_chunk"] == 1.0
        assert r["request_throughput"] == pytest.approx(4 / r["duration_s"], rel=1e-12)
        assert r["tokens_per_s"] == pytest.approx(4 * OUTPUT / r["duration_s"], rel=1e-12)
        assert r["first_token_s"]["p50"] >= FIRST_DELAY + TOKEN_DELAY
        assert r["tpot_s"]["p50"] >= TOKEN_DELAY and r["itl_s"]["p50"] >= TOKEN_DELAY
        assert r["latency_s"]["p50"] >= FIRST_DELAY + OUTPUT * TOKEN_DELAY
        assert r["latency_s"]["mean"] == pytest.approx(r["first_token_s"]["mean"] + (OUTPUT - 1) * r["tpot_s"]["mean"],
                                                       rel=1e-9)
    assert one["duration_s"] >= serial > two["duration_s"]
    assert one["server"]["engine"] == "harness-reference" and one["hardware"]["source"] == "reported"
    assert one["client"]["cpu_cores"] and one["stream_unit"] == "token"


def test_bench_endpoint_command_stores_resumes_and_reports(tiny, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                              timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})

    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "serving-tiny.yaml").write_text(  # the tiny model's context is 512 tokens
        "name: serving-tiny\nkind: serving\ntasks: []\noptions: {input_words: [4, 12], output_tokens: [2, 6]}\n")
    with running_server(*tiny) as url:
        failing = cli("bench", "--endpoint", url, "--suite", "serving-quick", "--num-prompts", "2", "--concurrency", "1",
                      "--data-dir", str(DATA_DIR), "--output", str(tmp_path / "too-long"))
        assert failing.returncode == 2 and "maximum context length" in failing.stderr
        assert "error: nothing measured for serve-tiny-" in failing.stderr
        seen = url.app.state.requests_seen
        command = ["bench", "--endpoint", url, "--suite", "serving-tiny", "--num-prompts", "3", "--concurrency", "1",
                   "--request-rates", "20", "--data-dir", str(DATA_DIR), "--output", str(tmp_path),
                   "--include-path", str(tmp_path)]
        first = cli(*command)
        assert first.returncode == 0, first.stderr
        assert url.app.state.requests_seen == seen + 1 + 2 * 3  # the warm-up request, then 3 a setting
        seen = url.app.state.requests_seen
        again = cli(*command)
        assert again.returncode == 0 and url.app.state.requests_seen == seen  # resumed: nothing sent again
    assert "rate 20/s" in first.stdout and "concurrency 1" in first.stdout
    report = cli("report", "--all", "--output", str(tmp_path), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "index.md").read_text()
    assert "Local and served: tiny" in text and "reference server (served)" in text


def test_quality_scores_the_endpoint_once_for_every_record(tiny, tmp_path):
    """``options.quality``: the endpoint scored on a task (an eval run of openai:URL); each record
    carries that run's score, which equals the local backend's on the same weights."""
    from harness.plan import RunConfig
    from harness.runner import evaluate

    with running_server(*tiny) as url:
        _, records = bench(url, tmp_path, concurrency=[1, 2], quality={"task": "lambada_openai", "limit": 4})
    for part in tiny:
        part.save_pretrained(tmp_path / "tiny")
    expected = evaluate(RunConfig(model=str(tmp_path / "tiny"), tasks=["lambada_openai"], limit=4, device="cpu",
                                  data_dir=DATA_DIR, output=tmp_path / "local"))["results"]["lambada_openai"]
    qualities = [r["quality"] for r in records]
    assert qualities[0] == qualities[1] and qualities[0]["n"] == 4 and qualities[0]["metric"] == "acc"
    assert qualities[0]["value"] == expected["acc,none"]
    assert qualities[0]["run_id"].startswith("tiny-harness-reference-")


def test_a_serving_suite_needs_an_endpoint_and_an_endpoint_a_serving_suite(tmp_path):
    from harness.perf.command import bench_options
    from harness.perf.serving_command import serving_suite_options

    with pytest.raises(HarnessError, match="is a serving suite: give the served model with --endpoint"):
        bench_options("serving-quick", {})
    with pytest.raises(HarnessError, match="is not a serving suite"):
        serving_suite_options("throughput-quick")


def hostile_app(seen: list):
    """A server whose completions answer ``MODE`` (set by the test) and which records the headers."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    state = {"mode": "ok"}

    async def models(request):
        return JSONResponse({"data": [{"id": "m", "owned_by": "vllm"}]})

    async def completions(request):
        seen.append(dict(request.headers))
        mode = state["mode"]
        if mode == "ok":
            return JSONResponse({"choices": [{"text": " Paris", "finish_reason": "stop"}],
                                 "usage": {"completion_tokens": 1, "prompt_tokens": 3}})
        if mode == "not json":
            return PlainTextResponse("<html>oops</html>")
        if mode == "bad choices":
            return JSONResponse({"choices": "nothing"})
        if mode == "bad stream":
            return StreamingResponse(iter([b"data: {not json}\n\n"]), media_type="text/event-stream")
        return JSONResponse({"error": {"message": "This model has no echo support.\nSorry"}}, status_code=400)

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])
    return app, state


def test_a_hostile_server_gets_one_line_errors_and_never_sees_a_stored_key(tmp_path, monkeypatch):
    from harness.models.base import GenerateRequest, LoglikelihoodRequest
    from harness.models.endpoint import EndpointLM
    from harness.models.settings import EndpointSettings
    from harness.perf.serving import ServingPrompt
    from harness.perf.serving_run import one_request
    from harness.plan import RunConfig
    from harness.runner import evaluate

    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-store-me")
    seen: list = []
    app, state = hostile_app(seen)
    with running_app(app) as url:
        results = evaluate(RunConfig(model=f"openai:{url}", tasks=["triviaqa"], limit=2, data_dir=DATA_DIR,
                                     output=tmp_path))
        assert results["harness"]["run_id"].startswith("m-vllm-")
        assert seen[0]["authorization"] == "Bearer sk-do-not-store-me"
        lm = EndpointLM(EndpointSettings(base_url=url, max_retries=0))
        for mode, message in (("not json", "the answer is not JSON"), ("bad choices", "without choices[0] text"),
                              ("refuse", "HTTP 400: This model has no echo support. Sorry")):
            state["mode"] = mode
            with pytest.raises(HarnessError) as error:
                lm.generate([GenerateRequest("Q", 4)])
            assert message in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(HarnessError, match="returns no prompt log-probabilities"):
            lm.loglikelihood([LoglikelihoodRequest("The capital", " Paris")])
        state["mode"] = "bad stream"
        timing = one_request(lm.endpoint, "completions", "m", ServingPrompt("Q", 4), True, 0.0)
        assert "a streamed event is not JSON" in timing.error
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"sk-do-not-store-me" not in stored and b"OPENAI_API_KEY" not in stored


def test_an_endpoint_card_names_the_server(tmp_path, tiny, monkeypatch):
    from harness.models.factory import build_model

    with running_server(*tiny, served_name="tiny") as url:
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "tiny-served.yaml").write_text(
            f"name: tiny-served\nbackend: endpoint\ndefaults: {{base_url: '{url}', model: tiny, num_concurrent: 2}}\n")
        monkeypatch.setenv("HARNESS_INCLUDE_PATH", str(tmp_path))
        lm = build_model("tiny-served")
        assert lm.model == "tiny" and lm.settings.num_concurrent == 2 and lm.fingerprint["engine"] == "harness-reference"
        (tmp_path / "models" / "tiny-served.yaml").write_text("name: tiny-served\nbackend: endpoint\ndefaults: {model: tiny}\n")
        from harness.catalog import catalog

        catalog.cache_clear()
        with pytest.raises(HarnessError, match="needs base_url"):
            build_model("tiny-served")
