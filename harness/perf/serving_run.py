"""The serving benchmark's driver: send a setting's requests to an OpenAI-compatible endpoint on
threads at their arrival times (``run_setting``) and store one record per setting in a run of kind
``serving`` (``bench_endpoint``). ``harness.perf.serving`` documents the numbers.

Every request asks for exactly its ``max_tokens`` (``min_tokens`` = ``max_tokens``, ``ignore_eos``,
greedy), as the engines' own benchmarks do, and, streamed, for a final ``usage`` event. A request
that fails (the endpoint's error, a broken stream) is counted with its message, never raised. The
run id ``serve-<model>-<hash>`` hashes the model, the endpoint, what the server reports (engine,
version, model, max_model_len), the options, the seed and the server's hardware; the same command
resumes its run and skips the settings stored. A setting whose every request failed is not stored,
so the next run of the command measures it again.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.perf.serving import (RequestTiming, ServingPrompt, ServingSetting, arrival_times, bounds,
                                  prompt_set, prompts_hash, serving_settings, summarize)

APIS = ("completions", "chat")
STREAM_UNITS = ("token", "block", "canvas")
MAX_WORKERS = 256  # threads for a setting without a concurrency cap
DEFAULTS: dict[str, Any] = {
    "api": "completions", "request_rates": [], "concurrency": [1], "num_prompts": 16, "input_words": [32, 128],
    "output_tokens": [16, 64], "streaming": True, "warmup": 1, "stream_unit": "token", "quality": None,
}


def request_payload(api: str, model: str, prompt: ServingPrompt, streaming: bool) -> tuple[str, dict[str, Any]]:
    """(path under the API, JSON body) of one request."""
    extras: dict[str, Any] = {"temperature": 0, "ignore_eos": True, "min_tokens": prompt.max_tokens}
    if streaming:
        extras["stream_options"] = {"include_usage": True}
    if api == "completions":
        return "completions", {"model": model, "prompt": prompt.text, "max_tokens": prompt.max_tokens, **extras}
    if api == "chat":
        return "chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt.text}],
                                    "max_tokens": prompt.max_tokens, "max_completion_tokens": prompt.max_tokens,
                                    **extras}
    raise HarnessError(f"api must be one of {', '.join(APIS)}, not '{api}'")


def take_usage(usage: dict[str, Any] | None, timing: RequestTiming) -> None:
    if usage and usage.get("completion_tokens") is not None:
        timing.output_tokens, timing.token_source = int(usage["completion_tokens"]), "usage"
    if usage and usage.get("prompt_tokens") is not None:
        timing.prompt_tokens = int(usage["prompt_tokens"])


def read_stream(events, api: str, timing: RequestTiming) -> None:
    """Record the content chunks' arrival times and the usage of a stream of events."""
    for arrived, event in events:
        choices = event.get("choices") or []
        if choices:
            choice = choices[0]
            content = choice.get("text") if api == "completions" else (choice.get("delta") or {}).get("content")
            if content:
                timing.chunk_times.append(arrived)
        take_usage(event.get("usage"), timing)
    timing.first_chunk = timing.chunk_times[0] if timing.chunk_times else None
    if timing.output_tokens is None:
        timing.output_tokens = len(timing.chunk_times)


def one_request(endpoint, api: str, model: str, prompt: ServingPrompt, streaming: bool,
                scheduled: float) -> RequestTiming:
    """Send one request and time it; a failure is the timing's ``error`` (one line), never raised."""
    path, payload = request_payload(api, model, prompt, streaming)
    timing = RequestTiming(scheduled=scheduled, start=time.perf_counter(), end=0.0)
    try:
        if streaming:
            read_stream(endpoint.stream(path, payload), api, timing)
        else:
            take_usage(endpoint.post(path, payload).get("usage"), timing)
            if timing.output_tokens is None:
                raise HarnessError("the answer has no usage.completion_tokens to count its tokens by")
    except Exception as exc:  # noqa: BLE001 - any transport failure is this request's error
        timing.error = " ".join(str(exc).split()) or type(exc).__name__
    timing.end = time.perf_counter()
    return timing


def run_setting(endpoint, api: str, model: str, prompts: Sequence[ServingPrompt], setting: ServingSetting, *,
                streaming: bool, seed: int) -> tuple[list[RequestTiming], float]:
    """Send request i at its arrival offset (under a cap, once a slot is free); (timings in prompt
    order, seconds from the first send to the last end)."""
    offsets = arrival_times(len(prompts), setting.request_rate, seed)
    workers = setting.max_concurrency or min(len(prompts), MAX_WORKERS)
    slots = threading.Semaphore(workers)

    def task(prompt: ServingPrompt, offset: float) -> RequestTiming:
        try:
            return one_request(endpoint, api, model, prompt, streaming, offset)
        finally:
            slots.release()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures, origin = [], time.perf_counter()
        for prompt, offset in zip(prompts, offsets):
            wait = origin + offset - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            slots.acquire()
            futures.append(pool.submit(task, prompt, offset))
        timings = [future.result() for future in futures]
    duration = max(t.end for t in timings) - min(t.start for t in timings) if timings else 0.0
    return timings, duration


def serving_options(options: dict[str, Any]) -> dict[str, Any]:
    """``DEFAULTS`` updated by ``options``, validated."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise HarnessError(f"unknown serving option(s) {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    merged = {**DEFAULTS, **options}
    if merged["api"] not in APIS:
        raise HarnessError(f"api must be one of {', '.join(APIS)}, not '{merged['api']}'")
    if merged["stream_unit"] not in STREAM_UNITS:
        raise HarnessError(f"stream_unit must be one of {', '.join(STREAM_UNITS)}, not '{merged['stream_unit']}'")
    if not isinstance(merged["streaming"], bool):
        raise HarnessError(f"streaming must be true or false, not {merged['streaming']!r}")
    for name, low in (("num_prompts", 1), ("warmup", 0)):
        if not isinstance(merged[name], int) or isinstance(merged[name], bool) or merged[name] < low:
            raise HarnessError(f"{name} must be an integer >= {low}, not {merged[name]!r}")
    bounds(merged["input_words"], "input_words")
    bounds(merged["output_tokens"], "output_tokens")
    serving_settings(merged)
    return merged


def bench_endpoint(endpoint, options: dict[str, Any], *, model: str, server: dict[str, Any],
                   hardware: dict[str, Any], env: dict[str, Any], output: Path, seed: int,
                   data_dir: Path | None, suite: str | None, quality: dict[str, Any] | None = None,
                   log: Callable[[str], Any] = print) -> tuple[str, list[dict[str, Any]]]:
    """Measure every setting not yet stored into the endpoint's serving run; (run id, its records).
    ``env``: the client machine's ``harness.env.environment()``; ``quality``: the endpoint's score
    on the quality task, put in every new record."""
    from harness.runner import slug
    from harness.store import Store, default_store_path, write_jsonl_atomic

    options = serving_options(options)
    identity = {"model": model, "endpoint": endpoint.base_url,
                "server": {k: server.get(k) for k in ("engine", "version", "model", "max_model_len")},
                "options": {k: v for k, v in options.items() if k != "quality"}, "seed": seed, "hardware": hardware}
    run_id = f"serve-{slug(model)}-{stable_hash(identity)[:10]}"
    store = Store(default_store_path(output))
    store.start_run(run_id, model=model, config={"suite": suite, **identity},
                    fingerprint={"name": model, "backend": server.get("engine"), "served": True,
                                 "endpoint": endpoint.base_url, "server": server},
                    env=env, output_dir=str(output / run_id), kind="serving")
    stored = {r.get("key") for r in store.measurements(run_id)}
    todo = [s for s in serving_settings(options) if stable_hash(s.recorded()) not in stored]
    prompts, source = prompt_set(data_dir, options["num_prompts"], options["input_words"],
                                 options["output_tokens"], seed)
    base = {"kind": "serving", "model": model, "backend": server.get("engine"), "served": True,
            "endpoint": endpoint.base_url, "api": options["api"], "dtype": server.get("dtype") or "—",
            "stream_unit": options["stream_unit"], "hardware": hardware, "client": client_fingerprint(env),
            "server": server,
            "prompt_source": source, "prompts_hash": prompts_hash(prompts), "seed": seed,
            **({"quality": quality} if quality else {})}
    missing = 0
    try:
        if todo:
            warm_up(endpoint, options, model, prompts, log)
        for setting in todo:
            record = measure_setting(endpoint, options, model, prompts, setting, base, seed, log)
            if record is None:
                missing += 1
            else:
                store.add_measurement(run_id, record)
    except BaseException:
        store.finish_run(run_id, "interrupted")
        raise
    store.finish_run(run_id, "failed" if missing else "complete")
    records = store.measurements(run_id)
    (output / run_id).mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(output / run_id / "measurements.jsonl", records)
    return run_id, records


def client_fingerprint(env: dict[str, Any]) -> dict[str, Any]:
    """The machine that sends the requests, for every record: its hardware and the harness's packages."""
    return {**(env.get("hardware") or {}), "python": env.get("python"), "packages": env.get("packages") or {},
            "git_sha": env.get("git_sha")}


def warm_up(endpoint, options: dict[str, Any], model: str, prompts: Sequence[ServingPrompt],
            log: Callable[[str], Any]) -> None:
    """Send ``warmup`` untimed requests one after another; a failure is logged, not raised."""
    for i in range(options["warmup"]):
        timing = one_request(endpoint, options["api"], model, prompts[i % len(prompts)], options["streaming"], 0.0)
        if timing.error:
            log(f"warm-up request {i + 1} failed: {timing.error}")


def measure_setting(endpoint, options: dict[str, Any], model: str, prompts: Sequence[ServingPrompt],
                    setting: ServingSetting, base: dict[str, Any], seed: int,
                    log: Callable[[str], Any]) -> dict[str, Any] | None:
    """The record of one setting, or None (logged) when every request failed."""
    timings, duration = run_setting(endpoint, options["api"], model, prompts, setting,
                                    streaming=options["streaming"], seed=seed)
    summary = summarize(timings, duration)
    if not summary["completed"]:
        log(f"{model} {setting.label()}: all {len(timings)} requests failed, not stored "
            f"(run the same command to measure it again): {summary['errors'][0]}")
        return None
    ttft = (summary["first_token_s"] or {}).get("p50")
    log(f"{model} {setting.label()}: {summary['completed']}/{len(timings)} ok, "
        f"{summary['request_throughput'] or 0:.2f} req/s, {summary['tokens_per_s'] or 0:.1f} tok/s"
        + (f", TTFT p50 {ttft * 1000:.0f} ms" if ttft is not None else ""))
    recorded = {**setting.recorded(), "num_prompts": options["num_prompts"], "input_words": options["input_words"],
                "output_tokens": options["output_tokens"], "streaming": options["streaming"]}
    return {"key": stable_hash(setting.recorded()), **base, "variant": setting.label(), "setting": recorded,
            **summary}
