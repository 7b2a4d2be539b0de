"""Log-likelihoods from a served model: the log-probabilities the server returns for the prompt.

A pair is sent as one prompt, context then continuation, with ``max_tokens: 1``, and scored from
one of two answers: ``echo`` with ``logprobs: 1`` (the legacy completions form vLLM, SGLang and
the reference server return: per prompt token its log-probability and its most likely
alternatives) or vLLM's ``prompt_logprobs: 1`` (per prompt token a dict by token id with its
rank). With token ids (``EndpointLM.token_source``) the pair is split as lm-eval splits it (or by
its segments) and the continuation is the tail of the ids; without, the prompt is text and the
continuation is every token that starts at or after the context's end (its trailing spaces move
to the continuation, as in lm-eval), read from ``text_offset``. The logprob is the sum over the
continuation's tokens; greedy means each was the most likely token. ``logprobs: auto`` tries echo,
then prompt_logprobs, and keeps the first the server answers; a server that answers neither gets
one clear error. Perplexity (``score_rolling``) scores a text's windows the same way.
"""
from __future__ import annotations

from typing import Any

from harness.errors import HarnessError
from harness.models.base import (LoglikelihoodRequest, LoglikelihoodResult, RollingRequest, RollingResult,
                                 encode_segments, split_pair)
from harness.serving.client import EndpointError

REJECTED = (400, 404, 405, 422, 501)  # statuses of a server that does not take the request's form
TIE = 1e-6


class Unsupported(Exception):
    """The server does not answer this form of request (the reason is the message)."""


def score_pair(lm, request: LoglikelihoodRequest) -> LoglikelihoodResult:
    """(sum of the continuation's log-probabilities, whether it is greedy) for one pair."""
    if lm.token_source is not None:
        encoded = encode_segments(lm.encode, request.context, request.segments) if request.segments \
            else split_pair(lm.encode, request.context, request.continuation)
        logprob, greedy, n = score_ids(lm, encoded[0] or lm.start_ids(), encoded[1])
    else:
        context, continuation = text_split(request)
        logprob, greedy, n = scored(lm, context + continuation, [], len(context))
    return LoglikelihoodResult(logprob=logprob, is_greedy=greedy, n_tokens=n)


def score_rolling(lm, request: RollingRequest) -> RollingResult:
    """A whole text in disjoint windows, each after the token before it (the first after the start
    token), as the AR backend scores it; windows leave room for the one generated token."""
    if lm.tokenizer is None:
        raise HarnessError("perplexity through an endpoint needs the model's start token: give --model_args "
                           "tokenizer=DIR_OR_HUB_ID")
    ids, limit = lm.encode(request.text), lm.server["max_model_len"]
    size = min(request.window or limit or len(ids) or 1, limit - 2 if limit else len(ids) or 1)
    total, tokens = 0.0, 0
    for start in range(0, len(ids), size):
        logprob, _, n = score_ids(lm, ids[start - 1:start] if start else lm.start_ids(), ids[start:start + size])
        total, tokens = total + logprob, tokens + n
    return RollingResult(logprob=total, n_tokens=tokens, exact=not lm.is_diffusion)


def score_ids(lm, context: list[int], continuation: list[int]) -> tuple[float, bool, int]:
    return scored(lm, context + continuation, list(range(len(context), len(context) + len(continuation))), None)


def scored(lm, prompt: str | list[int], positions: list[int], boundary: int | None) -> tuple[float, bool, int]:
    """(logprob, greedy, tokens) of the scored positions, by the first form the server answers."""
    reasons = []
    for mode in [lm.logprobs_mode] if lm.logprobs_mode else ["echo", "prompt_logprobs"]:
        try:
            result = FORMS[mode](lm, prompt, positions, boundary)
        except Unsupported as exc:
            reasons.append(f"{mode}: {exc}")
            continue
        lm.logprobs_mode = mode
        return result
    raise HarnessError(f"endpoint {lm.settings.base_url} returns no prompt log-probabilities ({'; '.join(reasons)}); "
                       f"log-likelihood tasks need a server that does (vLLM, SGLang), or run generation tasks only")


def text_split(request: LoglikelihoodRequest) -> tuple[str, str]:
    """(context, continuation) as text, the context's trailing spaces moved to the continuation."""
    context = request.context
    continuation = "".join(request.segments) if request.segments else request.continuation
    stripped = context.rstrip(" ")
    if not stripped:
        raise HarnessError("an empty context needs the model's start token: give --model_args tokenizer=DIR_OR_HUB_ID")
    return stripped, context[len(stripped):] + continuation


def ask(lm, prompt: str | list[int], extra: dict[str, Any]) -> dict[str, Any]:
    """The first choice of a one-token completion of ``prompt`` with ``extra``."""
    try:
        answer = lm.endpoint.post("completions", {"model": lm.model, "prompt": prompt, "max_tokens": 1,
                                                  "temperature": 0.0, "seed": lm.seed, **extra})
    except EndpointError as exc:
        if exc.status in REJECTED:
            raise Unsupported(str(exc).split(": ", 1)[-1]) from None
        raise
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Unsupported("an answer without choices")
    return {**answer, **choices[0]}


def echo_form(lm, prompt, positions: list[int], boundary: int | None) -> tuple[float, bool, int]:
    choice = ask(lm, prompt, {"echo": True, "logprobs": 1})
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list):
        raise Unsupported("an answer without logprobs.token_logprobs")
    values, tops, offsets = (logprobs.get(k) for k in ("token_logprobs", "top_logprobs", "text_offset"))
    if boundary is not None:
        if not isinstance(offsets, list):
            raise Unsupported("an answer without text_offset (give --model_args tokenizer=... to send token ids)")
        end = len(prompt)
        positions = [i for i, offset in enumerate(offsets) if isinstance(offset, int) and boundary <= offset < end]
    total, greedy = 0.0, True
    for i in positions:
        value = values[i] if i < len(values) else None
        top = tops[i] if isinstance(tops, list) and i < len(tops) else None
        if not isinstance(value, (int, float)) or not isinstance(top, dict) or not top:
            raise Unsupported(f"no log-probability or alternatives for prompt token {i}")
        total += value
        greedy = greedy and value >= max(float(v) for v in top.values()) - TIE
    return total, greedy, len(positions)


def prompt_logprobs_form(lm, prompt, positions: list[int], boundary: int | None) -> tuple[float, bool, int]:
    if boundary is not None:
        raise Unsupported("needs token ids (give --model_args tokenizer=...)")
    choice = ask(lm, prompt, {"prompt_logprobs": 1})
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) < len(prompt):
        raise Unsupported("an answer without prompt_logprobs for every prompt token")
    total, greedy = 0.0, True
    for i in positions:
        entry = entries[i]
        mine = entry.get(str(prompt[i])) if isinstance(entry, dict) else None
        if not isinstance(mine, dict) or not isinstance(mine.get("logprob"), (int, float)):
            raise Unsupported(f"no log-probability for prompt token {i}")
        total += mine["logprob"]
        rank = mine.get("rank")
        best = max(float(e["logprob"]) for e in entry.values() if isinstance(e, dict) and "logprob" in e)
        greedy = greedy and (rank == 1 if isinstance(rank, int) else mine["logprob"] >= best - TIE)
    return total, greedy, len(positions)


FORMS = {"echo": echo_form, "prompt_logprobs": prompt_logprobs_form}
