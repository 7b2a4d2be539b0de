"""The serving benchmark: its arithmetic by hand, seeded prompts and arrivals, and the driver
against a scripted fake endpoint (no network)."""
from __future__ import annotations

import math
import threading
import time

import pytest

from harness.errors import HarnessError
from harness.perf.serving import (RequestTiming, ServingPrompt, ServingSetting, arrival_times, prompt_set,
                                  prompts_hash, serving_settings, summarize)
from harness.perf.serving_run import bench_endpoint, one_request, request_payload, run_setting
from harness.serving.client import EndpointError
from harness.store import Store


@pytest.fixture(autouse=True)
def own_store(monkeypatch):
    monkeypatch.delenv("HARNESS_STORE", raising=False)  # the store goes under each test's tmp_path


class FakeEndpoint:
    """Streams ``chunks`` content chunks ``delay`` seconds apart, then a usage event; counts the
    requests in flight. ``fail``: a predicate on the prompt text saying which requests fail."""

    base_url = "http://fake:8000/v1"

    def __init__(self, chunks: int = 3, delay: float = 0.01, fail=lambda text: False, usage: bool = True):
        self.chunks, self.delay, self.fail, self.usage = chunks, delay, fail, usage
        self.lock = threading.Lock()
        self.active = self.max_active = self.calls = 0

    def stream(self, path, payload):
        with self.lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            if self.fail(payload["prompt"]):
                raise EndpointError("endpoint http://fake:8000/v1/completions: HTTP 500: boom")
            yield time.perf_counter(), {"choices": [{"text": ""}]}  # an empty first chunk is not content
            for _ in range(self.chunks):
                time.sleep(self.delay)
                yield time.perf_counter(), {"choices": [{"text": "ab"}]}
            if self.usage:
                yield time.perf_counter(), {"choices": [], "usage": {"completion_tokens": 2 * self.chunks,
                                                                     "prompt_tokens": 7}}
        finally:
            with self.lock:
                self.active -= 1

    def post(self, path, payload):
        return {"choices": [{"text": "ab"}], **({"usage": {"completion_tokens": 5}} if self.usage else {})}


def timing(start, chunks, end, tokens, prompt=None, source="usage", error=None):
    return RequestTiming(scheduled=0.0, start=start, first_chunk=chunks[0] if chunks else None, chunk_times=chunks,
                         end=end, output_tokens=tokens, prompt_tokens=prompt, token_source=source, error=error)


def test_summarize_by_hand():
    timings = [
        timing(0.0, [1.0, 1.5, 2.0], 2.0, 3, prompt=10),  # TTFT 1, TPOT 1/2, ITL .5 .5, e2e 2
        timing(1.0, [1.5, 1.75, 2.0, 2.25, 2.5], 3.0, 10, prompt=20),  # 2 tokens a chunk: TTFT .5, TPOT 1.5/9
        timing(0.5, [2.5], 3.5, 1, source="chunks"),  # TTFT 2, no TPOT, no ITL, e2e 3
        timing(0.0, [], 10.0, None, error="HTTP 500: boom"),
        timing(0.0, [], 20.0, None, error="HTTP 500: boom"),
        timing(0.0, [], 30.0, None, error="stream ended"),
    ]
    s = summarize(timings, 4.0)
    assert (s["completed"], s["failed"], s["errors"]) == (3, 3, ["HTTP 500: boom", "stream ended"])
    assert s["request_throughput"] == 0.75 and s["output_tokens"] == 14 and s["prompt_tokens"] == 30
    assert s["tokens_per_s"] == 3.5 and s["total_tokens_per_s"] == 11.0
    # e2e [2, 2, 3]: rank (n-1)q = 1.9 for p95 -> 2 + 0.9
    assert s["latency_s"] == pytest.approx({"mean": 7 / 3, "p50": 2.0, "p95": 2.9, "p99": 2.98})
    assert s["first_token_s"] == pytest.approx({"mean": 3.5 / 3, "p50": 1.0, "p95": 1.9, "p99": 1.98})
    low, high = 1.5 / 9, 0.5
    assert s["tpot_s"] == pytest.approx({"mean": (low + high) / 2, "p50": (low + high) / 2,
                                         "p95": low + 0.95 * (high - low), "p99": low + 0.99 * (high - low)})
    # ITL [.5, .5, .25, .25, .25, .25]: sorted ranks 2.5 (p50), 4.75 (p95), 4.95 (p99)
    assert s["itl_s"] == pytest.approx({"mean": 2 / 6, "p50": 0.25, "p95": 0.5, "p99": 0.5})
    assert s["tokens_per_chunk"] == pytest.approx(4 / 3)
    assert s["token_count_source"] == "chunks"
    assert summarize(timings[:2], 4.0)["token_count_source"] == "usage"
    empty = summarize(timings[3:], 4.0)
    assert empty["completed"] == 0 and empty["latency_s"] is None and empty["itl_s"] is None


def test_arrival_times():
    assert arrival_times(5, 2.0, seed=3) == arrival_times(5, 2.0, seed=3) != arrival_times(5, 2.0, seed=4)
    times = arrival_times(20000, 4.0, seed=0)
    assert times[0] == 0.0 and times == sorted(times)
    assert times[-1] / (len(times) - 1) == pytest.approx(0.25, rel=0.03)
    assert arrival_times(4, math.inf, seed=0) == [0.0] * 4


def test_prompt_set_is_seeded_and_bounded(tmp_path):
    prompts, source = prompt_set(None, 50, [3, 9], [5, 6], seed=1)
    assert source.startswith("builtin") and len(prompts) == 50
    assert all(3 <= len(p.text.split()) <= 9 and 5 <= p.max_tokens <= 6 for p in prompts)
    assert {len(p.text.split()) for p in prompts} == set(range(3, 10))  # the bounds are inclusive
    again, _ = prompt_set(None, 50, [3, 9], [5, 6], seed=1)
    assert prompts_hash(again) == prompts_hash(prompts)
    assert prompts_hash(prompt_set(None, 50, [3, 9], [5, 6], seed=2)[0]) != prompts_hash(prompts)
    corpus = tmp_path / "pretrain_corpus" / "wiki_demo.txt"
    corpus.parent.mkdir()
    corpus.write_text("one two three four five")
    real, source = prompt_set(tmp_path, 4, 12, 8, seed=0)  # longer than the text: windows wrap
    assert source.startswith("data:") and all(len(p.text.split()) == 12 for p in real)
    with pytest.raises(HarnessError, match="input_words"):
        prompt_set(None, 2, [9, 3], 4, seed=0)


def test_serving_settings_and_labels():
    settings = serving_settings({"request_rates": [4, "inf"], "concurrency": [8]})
    assert [s.label() for s in settings] == ["rate 4/s", "rate inf/s", "concurrency 8"]
    assert settings[1].recorded() == {"request_rate": "inf", "max_concurrency": None}
    assert ServingSetting(0.5, 8).label() == "rate 0.5/s, concurrency 8"
    for options, name in (({"request_rates": [0]}, "request_rates"), ({"request_rates": ["fast"]}, "request_rates"),
                          ({"concurrency": [0]}, "concurrency"), ({"concurrency": [2.5]}, "concurrency"),
                          ({"concurrency": 4}, "concurrency"), ({}, "request_rates or concurrency")):
        with pytest.raises(HarnessError, match=name):
            serving_settings(options)


def test_request_payloads():
    prompt = ServingPrompt("hello there", 5)
    path, body = request_payload("completions", "m", prompt, streaming=True)
    assert path == "completions" and body["min_tokens"] == body["max_tokens"] == 5 and body["ignore_eos"]
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
    path, body = request_payload("chat", "m", prompt, streaming=False)
    assert path == "chat/completions" and body["messages"] == [{"role": "user", "content": "hello there"}]
    assert body["max_completion_tokens"] == 5 and "stream_options" not in body


def test_one_request_counts_chunks_without_usage():
    result = one_request(FakeEndpoint(chunks=4, delay=0.001, usage=False), "completions", "m",
                         ServingPrompt("x", 4), True, 0.0)
    assert result.error is None and result.output_tokens == 4 and result.token_source == "chunks"
    assert len(result.chunk_times) == 4 and result.first_chunk == result.chunk_times[0] > result.start


def test_one_request_not_streamed_needs_usage():
    prompt = ServingPrompt("x", 5)
    counted = one_request(FakeEndpoint(), "completions", "m", prompt, False, 0.0)
    assert counted.error is None and counted.output_tokens == 5 and counted.first_chunk is None
    assert "usage" in one_request(FakeEndpoint(usage=False), "completions", "m", prompt, False, 0.0).error


def test_run_setting_caps_in_flight_requests():
    prompts = [ServingPrompt(f"p{i}", 3) for i in range(12)]
    capped = FakeEndpoint()
    timings, duration = run_setting(capped, "completions", "m", prompts, ServingSetting(math.inf, 3),
                                    streaming=True, seed=0)
    assert capped.max_active == 3 and len(timings) == 12 and duration > 0
    assert [t.output_tokens for t in timings] == [6] * 12 and all(t.token_source == "usage" for t in timings)
    free = FakeEndpoint()
    run_setting(free, "completions", "m", prompts, ServingSetting(math.inf), streaming=True, seed=0)
    assert free.max_active == 12  # rate inf without a cap: all at once


def test_run_setting_counts_errors():
    prompts = [ServingPrompt(f"p{i}", 3) for i in range(6)]
    endpoint = FakeEndpoint(fail=lambda text: text in ("p1", "p4"))
    timings, duration = run_setting(endpoint, "completions", "m", prompts, ServingSetting(50.0),
                                    streaming=True, seed=0)
    assert [t.error is not None for t in timings] == [False, True, False, False, True, False]
    assert "HTTP 500: boom" in timings[1].error
    summary = summarize(timings, duration)
    assert summary["completed"] == 4 and summary["failed"] == 2 and len(summary["errors"]) == 1


def bench(tmp_path, endpoint, **options):
    options = {"concurrency": [1, 2], "num_prompts": 4, "input_words": [2, 4], "output_tokens": 3, **options}
    return bench_endpoint(endpoint, options, model="tiny-model", server={"engine": "fake", "version": "1",
                          "model": "tiny-model"}, hardware={"gpu": "none"}, env={"hardware": {"cpu": "test"}},
                          output=tmp_path, seed=0, data_dir=None, suite=None, log=lambda line: None)


def test_bench_endpoint_stores_and_resumes(tmp_path):
    endpoint = FakeEndpoint(delay=0.002)
    run_id, records = bench(tmp_path, endpoint)
    assert run_id.startswith("serve-tiny-model-") and len(records) == 2 and endpoint.calls == 4 * 2 + 1
    record = records[0]
    assert record["variant"] == "concurrency 1" and record["kind"] == "serving" and record["backend"] == "fake"
    assert record["setting"] == {"request_rate": "inf", "max_concurrency": 1, "num_prompts": 4,
                                 "input_words": [2, 4], "output_tokens": 3, "streaming": True}
    for key in ("key", "model", "served", "endpoint", "api", "dtype", "completed", "failed", "errors",
                "request_throughput", "tokens_per_s", "total_tokens_per_s", "latency_s", "first_token_s", "tpot_s",
                "itl_s", "tokens_per_chunk", "token_count_source", "stream_unit", "hardware", "client", "server",
                "prompt_source", "prompts_hash", "seed"):
        assert key in record, key
    assert record["completed"] == 4 and record["dtype"] == "—" and record["stream_unit"] == "token"
    assert (tmp_path / run_id / "measurements.jsonl").read_text().count("\n") == 2
    again_id, again = bench(tmp_path, endpoint)
    assert again_id == run_id and again == records and endpoint.calls == 9  # resumed: nothing sent
    (run,) = Store(tmp_path / "store.sqlite").runs(kind="serving")
    assert run["status"] == "complete" and run["model_fingerprint"]["served"] is True


def test_bench_endpoint_skips_a_setting_that_all_failed(tmp_path):
    failing = FakeEndpoint(delay=0.001, fail=lambda text: True)
    run_id, records = bench(tmp_path, failing, concurrency=[2], warmup=0)
    assert records == [] and failing.calls == 4
    (run,) = Store(tmp_path / "store.sqlite").runs(kind="serving")
    assert run["status"] == "failed"
    _, records = bench(tmp_path, FakeEndpoint(delay=0.001), concurrency=[2], warmup=0)
    assert len(records) == 1 and records[0]["completed"] == 4  # measured again, now stored


def test_bench_endpoint_rejects_unknown_options(tmp_path):
    with pytest.raises(HarnessError, match="unknown serving option.*known: api"):
        bench(tmp_path, FakeEndpoint(), rates=[1])
