"""The serving benchmark's settings, prompt set, arrivals and arithmetic (the driver is
``harness.perf.serving_run``), measured as vLLM's ``vllm bench serve`` and SGLang's ``bench_serving``
measure: a fixed seeded prompt set sent to an OpenAI-compatible endpoint, streamed.

Settings: ``request_rates`` gives one setting per rate with no concurrency cap (requests arrive as
a Poisson process at that rate; ``inf`` sends them all at once); ``concurrency`` gives one setting
per cap at rate ``inf`` (at most that many requests in flight; a new one goes out as one ends).

Prompts: ``num_prompts`` windows of whole words cut at seeded word offsets from the shared corpus
(``pretrain_corpus/wiki_demo.txt`` under the data dir; without one, a built-in sentence repeated;
``prompt_source`` says which). Each prompt's word count and its ``max_tokens`` are uniform integers
in the ``input_words`` and ``output_tokens`` ranges, inclusive, all drawn from
``numpy.random.default_rng(seed)``: the same seed gives the same prompts (``prompts_hash``).

Arrivals: request 0 at offset 0, then cumulative gaps drawn from an exponential distribution with
mean 1 / rate (``default_rng(seed)``); the request goes out at its offset, or, under a cap, once a
slot is free. A request's ``start`` is when it is sent, its ``end`` when its answer is complete
(the stream's ``[DONE]``), and a content chunk is a streamed event with non-empty text.

Per setting (failed requests count in ``failed`` and ``errors`` only, never in the statistics):

* ``duration_s``: from the first request sent to the last one ended.
* ``request_throughput``: completed requests / ``duration_s``.
* ``tokens_per_s`` (output throughput): output tokens of the completed requests / ``duration_s``;
  ``total_tokens_per_s``: (prompt + output tokens) / ``duration_s``, prompt tokens where the
  server reported them. Output tokens come from the server's ``usage`` (``completion_tokens``);
  without it, each content chunk counts as one token. ``token_count_source`` is ``usage`` when
  every completed request was counted from usage, else ``chunks``.
* ``latency_s`` (end-to-end): ``end - start``.
* ``first_token_s`` (TTFT): first content chunk - ``start`` (streamed requests only).
* ``tpot_s`` (time per output token, first excluded): ``(end - first chunk) / (output tokens - 1)``,
  per request with more than one output token.
* ``itl_s`` (inter-token latency): every gap between consecutive content chunks of a request,
  pooled over the requests. A server that streams a block (or a whole canvas) per chunk gives one
  gap per block; ``stream_unit`` says what a chunk is and ``tokens_per_chunk`` (mean of output
  tokens / content chunks over the completed streamed requests) how many tokens one carries.
* Each statistic is ``{mean, p50, p95, p99}`` in seconds, percentiles by ``numpy.percentile``
  (linear interpolation, as vLLM), or None without a sample.
* ``errors``: the first 5 distinct error messages.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from harness.errors import HarnessError
from harness.hashing import stable_hash


@dataclass(frozen=True)
class ServingSetting:
    """A request rate (per second; ``math.inf``: all at once) and an optional in-flight cap."""

    request_rate: float
    max_concurrency: int | None = None

    def label(self) -> str:
        rate = f"rate {self.request_rate:g}/s"
        if self.max_concurrency is None:
            return rate
        cap = f"concurrency {self.max_concurrency}"
        return cap if math.isinf(self.request_rate) else f"{rate}, {cap}"

    def recorded(self) -> dict[str, Any]:
        """JSON-safe: the rate as a float, or ``"inf"``."""
        rate = "inf" if math.isinf(self.request_rate) else float(self.request_rate)
        return {"request_rate": rate, "max_concurrency": self.max_concurrency}


def parse_rate(value: Any) -> float:
    """A positive request rate, or ``inf`` (the string or the float)."""
    if isinstance(value, str) and value.strip().lower() == "inf":
        return math.inf
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise HarnessError(f"request_rates must be positive numbers or 'inf', not {value!r}")


def option_list(options: dict[str, Any], name: str) -> list:
    value = options.get(name) or []
    if not isinstance(value, (list, tuple)):
        raise HarnessError(f"{name} must be a list, not {value!r}")
    return list(value)


def serving_settings(options: dict[str, Any]) -> list[ServingSetting]:
    """One setting per ``request_rates`` entry (no cap), then one per ``concurrency`` cap (rate inf)."""
    settings = [ServingSetting(parse_rate(rate)) for rate in option_list(options, "request_rates")]
    for cap in option_list(options, "concurrency"):
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise HarnessError(f"concurrency must be positive integers, not {cap!r}")
        settings.append(ServingSetting(math.inf, cap))
    if not settings:
        raise HarnessError("a serving benchmark needs request_rates or concurrency")
    return list(dict.fromkeys(settings))


@dataclass(frozen=True)
class ServingPrompt:
    text: str
    max_tokens: int


def bounds(value: Any, name: str) -> tuple[int, int]:
    """``n`` or ``[lo, hi]`` as (lo, hi), with 1 <= lo <= hi."""
    pair = [value, value] if isinstance(value, int) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair) or not 1 <= pair[0] <= pair[1]):
        raise HarnessError(f"{name} must be a positive integer or [lo, hi] with 1 <= lo <= hi, not {value!r}")
    return pair[0], pair[1]


def prompt_set(data_dir: Path | None, count: int, input_words: int | Sequence[int],
               output_tokens: int | Sequence[int], seed: int) -> tuple[list[ServingPrompt], str]:
    """(``count`` seeded prompts, the text's source label); see the module docstring."""
    from harness.perf.throughput import prompt_text

    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise HarnessError(f"num_prompts must be a positive integer, not {count!r}")
    (in_lo, in_hi), (out_lo, out_hi) = bounds(input_words, "input_words"), bounds(output_tokens, "output_tokens")
    text, source = prompt_text(data_dir)
    words = text.split()
    if not words:
        raise HarnessError(f"no prompt words: the prompt text ({source}) is empty")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(in_lo, in_hi + 1, size=count)
    offsets = rng.integers(0, len(words), size=count)
    outputs = rng.integers(out_lo, out_hi + 1, size=count)
    pool = words * (in_hi // len(words) + 2)  # windows wrap round a short text
    prompts = [ServingPrompt(" ".join(pool[int(start):int(start) + int(length)]), int(new))
               for length, start, new in zip(lengths, offsets, outputs)]
    return prompts, source


def prompts_hash(prompts: Sequence[ServingPrompt]) -> str:
    return stable_hash([asdict(p) for p in prompts])


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send offsets (seconds from the start) of a Poisson process at ``rate``; inf: all zeros."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n - 1)
    return [0.0] + [float(t) for t in np.cumsum(gaps)]


@dataclass(kw_only=True)
class RequestTiming:
    """One request's clock readings (``time.perf_counter``), tokens and error."""

    scheduled: float  # its arrival offset from the start of the setting
    start: float
    first_chunk: float | None = None  # the first non-empty content chunk; None if none or not streamed
    chunk_times: list[float] = field(default_factory=list)  # arrival of every non-empty content chunk
    end: float
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    token_source: str = "chunks"  # usage | chunks
    error: str | None = None


def stats(values: Sequence[float]) -> dict[str, float] | None:
    """``{mean, p50, p95, p99}`` (numpy's linear percentiles), None for no values."""
    if not values:
        return None
    data = np.asarray(values, dtype=float)
    p50, p95, p99 = (float(v) for v in np.percentile(data, [50, 95, 99]))
    return {"mean": float(data.mean()), "p50": p50, "p95": p95, "p99": p99}


def summarize(timings: Sequence[RequestTiming], duration_s: float) -> dict[str, Any]:
    """A setting's numbers from its requests; the formulas are in the module docstring."""
    done = [t for t in timings if t.error is None]
    failed = [t.error for t in timings if t.error is not None]
    output = sum(t.output_tokens or 0 for t in done)
    prompt = sum(t.prompt_tokens for t in done if t.prompt_tokens is not None)
    rate = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: None)
    streamed = [t for t in done if t.first_chunk is not None]
    per_chunk = [t.output_tokens / len(t.chunk_times) for t in done if t.chunk_times and t.output_tokens is not None]
    return {
        "completed": len(done), "failed": len(failed), "errors": list(dict.fromkeys(failed))[:5],
        "duration_s": duration_s, "request_throughput": rate(len(done)), "tokens_per_s": rate(output),
        "total_tokens_per_s": rate(prompt + output), "output_tokens": output, "prompt_tokens": prompt,
        "latency_s": stats([t.end - t.start for t in done]),
        "first_token_s": stats([t.first_chunk - t.start for t in streamed]),
        "tpot_s": stats([(t.end - t.first_chunk) / (t.output_tokens - 1) for t in streamed
                         if (t.output_tokens or 0) > 1]),
        "itl_s": stats([b - a for t in done for a, b in zip(t.chunk_times, t.chunk_times[1:])]),
        "tokens_per_chunk": float(np.mean(per_chunk)) if per_chunk else None,
        "token_count_source": None if not done else
        "usage" if all(t.token_source == "usage" for t in done) else "chunks",
    }
