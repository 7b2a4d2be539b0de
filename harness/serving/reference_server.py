"""A small OpenAI-compatible server over a Hugging Face causal LM (``harness serve``, and the loopback
server of the tests): starlette routes served by uvicorn, the model in ``reference_decode``.

Routes: ``GET /health``, ``/version``, ``/v1/models``, ``/server_info``; ``POST /tokenize`` (vLLM's),
``/v1/completions`` (legacy logprobs, ``echo``, vLLM's ``prompt_logprobs``, several prompts) and
``/v1/chat/completions``, both streamed as server-sent events on ``stream: true``. Each forward
pass runs in a worker thread under the model's lock and waits between tokens are ``asyncio``
sleeps, so concurrent requests interleave token by token. Errors are OpenAI error bodies.

``ServerOptions`` injects faults for the client's tests. POSTs to the two completion routes are
counted (``app.state.requests_seen``): the first ``fail_first`` get ``fail_status``, the next
``hang_first`` sleep ``hang_s`` first, the next ``close_first`` get a 200 whose body breaks off (half
a JSON object, or one event of a stream) as the connection drops.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from harness import __version__
from harness.errors import HarnessError
from harness.serving.reference_decode import (Decoder, Generation, Sampling, chat_chunk, completion_choice,
                                              prompt_pieces, text_chunk, usage)

try:
    from starlette.applications import Starlette
    from starlette.datastructures import State
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:
    raise HarnessError("the reference server needs starlette and uvicorn: pip install 'dlm-harness[serve]'") from exc

MAX_LOGPROBS = 20
HARDWARE_KEYS = ("cpu", "cpu_cores", "gpu", "gpu_count", "gpu_memory_gb")
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


@dataclass
class ServerOptions:
    """What the server reports about itself, which requests it refuses, and the faults it injects."""

    token_delay_s: float = 0.0  # slept before each generated token, off the model lock
    first_token_delay_s: float = 0.0  # slept once more before the first one
    fail_first: int = 0
    fail_status: int = 500
    hang_first: int = 0
    hang_s: float = 3600.0
    close_first: int = 0
    echo_logprobs: bool = True  # False: echo=true is refused
    prompt_logprobs: bool = True  # False: prompt_logprobs is refused
    version: str = __version__
    engine: str = "harness-reference"
    hardware: dict | None = None  # default: part of harness.env.hardware()
    dtype: str | None = None  # default: the model's


class RequestError(Exception):
    """A request the server refuses: answered with an OpenAI error body and ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ConnectionDropped(Exception):
    """Raised inside a started response to cut the connection (the ``close_first`` fault)."""


def error_body(message: str, status: int) -> JSONResponse:
    error = {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": None, "code": status}
    return JSONResponse({"error": error}, status_code=status)


async def request_error(request: Request, exc: Exception) -> JSONResponse:
    return error_body(str(exc), getattr(exc, "status", 400))


def quiet_dropped_connections(record: logging.LogRecord) -> bool:
    """A logging filter: uvicorn's traceback for a deliberately dropped connection is noise."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(ConnectionDropped) is None
    return not isinstance(exc, ConnectionDropped)


def fault_for(seen: int, options: ServerOptions) -> str | None:
    """The fault the ``seen``-th completion POST meets: fail, then hang, then close, in turn."""
    for name, count in (("fail", options.fail_first), ("hang", options.hang_first), ("close", options.close_first)):
        if seen <= count:
            return name
        seen -= count
    return None


async def hang(request: Request, seconds: float) -> None:
    """Sleep ``seconds``, or until the client has gone (then shutting down need not wait for it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not await request.is_disconnected():
        await asyncio.sleep(0.05)


def sse(event: dict | str) -> bytes:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()


# ---- request fields -------------------------------------------------------------------------------
def number(body: dict, name: str, default: Any, *, integer: bool = False, low: float | None = None,
           high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(f"{name} must be {bounds}, not {value}")
    return value


def flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, not {json.dumps(value)}")
    return value


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise RequestError("stop must be a string or a list of strings")


def sampling_fields(body: dict, max_tokens: int | None, *, logprobs: int | None = None,
                    prompt_top: int | None = None) -> Sampling:
    """The generation options both completion routes share."""
    if number(body, "n", 1, integer=True) != 1:
        raise RequestError("n must be 1: this server returns one choice per prompt")
    top_p = number(body, "top_p", 1.0, low=0, high=1)
    if top_p <= 0:
        raise RequestError("top_p must be above 0")
    return Sampling(max_tokens=max_tokens, temperature=float(number(body, "temperature", 0.0, low=0)),
                    top_p=float(top_p), seed=number(body, "seed", 0, integer=True), stop=stop_strings(body),
                    ignore_eos=flag(body, "ignore_eos", False),
                    min_tokens=number(body, "min_tokens", 0, integer=True, low=0),
                    logprobs=logprobs, prompt_top=prompt_top)


def chat_prompt(messages: Any) -> list[dict[str, str]]:
    """``messages`` as role/content pairs (content parts of type text are joined)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError("each message must be an object with a role and a content")
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise RequestError("a message's content must be a string or a list of text parts")
        out.append({"role": message["role"], "content": content})
    return out


class ReferenceServer:
    """The routes over one model; ``build_app`` wraps them in a Starlette app."""

    def __init__(self, model: Any, tokenizer: Any, served_name: str, options: ServerOptions) -> None:
        self.decoder, self.tokenizer = Decoder(model, tokenizer), tokenizer
        self.served_name, self.options = served_name, options
        self.root = getattr(model, "name_or_path", "") or served_name
        self.dtype = options.dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        self.hardware = options.hardware if options.hardware is not None else default_hardware()
        self.state = State({"server": self, "requests_seen": 0})  # the app's state
        self.seen_lock = threading.Lock()

    def routes(self) -> list[Route]:
        get = [("/health", self.health), ("/version", self.version), ("/v1/models", self.models),
               ("/server_info", self.server_info)]
        post = [("/tokenize", self.tokenize), ("/v1/completions", self.completions),
                ("/v1/chat/completions", self.chat)]
        return ([Route(path, endpoint, methods=["GET"]) for path, endpoint in get]
                + [Route(path, endpoint, methods=["POST"]) for path, endpoint in post])

    # ---- what the server says about itself ------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> JSONResponse:
        return JSONResponse({"version": self.options.version, "engine": self.options.engine})

    async def models(self, request: Request) -> JSONResponse:
        card = {"id": self.served_name, "object": "model", "created": int(time.time()), "owned_by": "dlm-harness",
                "root": self.root, "max_model_len": self.decoder.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def server_info(self, request: Request) -> JSONResponse:
        return JSONResponse({"engine": self.options.engine, "version": self.options.version,
                             "model": self.served_name, "max_model_len": self.decoder.max_model_len,
                             "dtype": self.dtype, "hardware": self.hardware})

    async def tokenize(self, request: Request) -> JSONResponse:
        body = await self.body(request)
        if not isinstance(body.get("prompt"), str):
            raise RequestError("prompt must be a string")
        extra = {"add_special_tokens": flag(body, "add_special_tokens", True)} if "add_special_tokens" in body else {}
        tokens = self.tokenizer(body["prompt"], **extra)["input_ids"]
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.decoder.max_model_len})

    # ---- checks ---------------------------------------------------------------------------------
    async def body(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if "model" in body and body["model"] != self.served_name:
            raise RequestError(f"the model '{body['model']}' does not exist (this server serves "
                               f"'{self.served_name}')", status=404)
        return body

    async def admit(self, request: Request, kind: str) -> tuple[dict, Response | None]:
        """Count one completion POST and read its body; the response of the fault it meets, if any."""
        with self.seen_lock:
            self.state.requests_seen = seen = self.state.requests_seen + 1
        fault = fault_for(seen, self.options)
        if fault == "fail":
            return {}, error_body("injected failure (fail_first)", self.options.fail_status)
        body = await self.body(request)
        if fault == "hang":
            await hang(request, self.options.hang_s)
        return body, self.broken(body, kind) if fault == "close" else None

    def token_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.decoder.vocab_size for t in prompt):
            raise RequestError(f"token ids must be integers from 0 to {self.decoder.vocab_size - 1}")
        return list(prompt)

    def prompts(self, prompt: Any) -> list[str | list[int]]:
        """A completion's ``prompt``: a string, token ids, or a list of either; one entry per prompt."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            return prompt
        raise RequestError("prompt must be a string, a list of token ids, or a list of strings or of id lists")

    def check_length(self, ids: list[int], max_tokens: int) -> None:
        limit = self.decoder.max_model_len
        if not ids:
            raise RequestError("the prompt is empty (it encodes to no tokens)")
        if len(ids) + max_tokens > limit:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                               f"model's maximum context length ({limit} tokens)")

    # ---- completions ----------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        body, faulty = await self.admit(request, "text_completion")
        if faulty:
            return faulty
        echo = flag(body, "echo", False)
        if echo and not self.options.echo_logprobs:
            raise RequestError("echo is not supported")
        if body.get("prompt_logprobs") is not None and not self.options.prompt_logprobs:
            raise RequestError("prompt_logprobs is not supported")
        logprobs = number(body, "logprobs", None, integer=True, low=0, high=MAX_LOGPROBS)
        prompt_logprobs = number(body, "prompt_logprobs", None, integer=True, low=0, high=MAX_LOGPROBS)
        asked = [k for k in (logprobs if echo else None, prompt_logprobs) if k is not None]
        sampling = sampling_fields(body, number(body, "max_tokens", 16, integer=True, low=0), logprobs=logprobs,
                                   prompt_top=max(asked) if asked else None)
        if sampling.max_tokens == 0 and not echo:
            raise RequestError("max_tokens must be at least 1 (0 only with echo)")
        generations = [Generation(self.decoder, self.token_ids(p), sampling, text=p if isinstance(p, str) else None)
                       for p in self.prompts(body.get("prompt"))]
        for generation in generations:
            self.check_length(generation.prompt, sampling.max_tokens)
        if flag(body, "stream", False):
            if len(generations) > 1:
                raise RequestError("streaming takes one prompt")
            first = generations[0]
            head = ["".join(prompt_pieces(self.decoder, first.prompt, first.prompt_text))] if echo else []
            return self.stream(body, first, "text_completion", head)
        for generation in generations:
            await self.finish(generation)
        choices = [completion_choice(self.decoder, i, g, echo, logprobs, prompt_logprobs)
                   for i, g in enumerate(generations)]
        return JSONResponse({**self.header("text_completion"), "choices": choices,
                             "usage": usage(generations)})

    # ---- chat -----------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body, faulty = await self.admit(request, "chat.completion.chunk")
        if faulty:
            return faulty
        messages = chat_prompt(body.get("messages"))
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("the model has no chat template")
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        default = max(1, self.decoder.max_model_len - len(ids))  # as vLLM: the rest of the context
        sampling = sampling_fields(body, number(body, limit, default, integer=True, low=1))
        self.check_length(ids, sampling.max_tokens)
        generation = Generation(self.decoder, ids, sampling)
        if flag(body, "stream", False):
            return self.stream(body, generation, "chat.completion.chunk", [{"role": "assistant", "content": ""}])
        await self.finish(generation)
        choice = {"index": 0, "message": {"role": "assistant", "content": generation.text}, "logprobs": None,
                  "finish_reason": generation.finish_reason}
        return JSONResponse({**self.header("chat.completion"), "choices": [choice],
                             "usage": usage([generation])})

    # ---- generation and streams -----------------------------------------------------------------
    def header(self, kind: str) -> dict:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.served_name}

    async def tokens(self, generation: Generation) -> AsyncIterator[str]:
        """Decode in worker threads; yields the text each generated token releases."""
        await run_in_threadpool(generation.start)
        delay = self.options.first_token_delay_s
        while generation.finish_reason is None:
            delay += self.options.token_delay_s
            if delay > 0:
                await asyncio.sleep(delay)
            delay = 0.0
            yield await run_in_threadpool(generation.step)

    async def finish(self, generation: Generation) -> None:
        async for _ in self.tokens(generation):
            pass

    def stream(self, body: dict, generation: Generation, kind: str, head: list) -> StreamingResponse:
        """Server-sent events: ``head`` deltas, one chunk per token, the usage chunk when asked, [DONE]."""
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and flag(options, "include_usage", False)
        header, chunk = self.header(kind), chat_chunk if kind.startswith("chat") else text_chunk

        async def events() -> AsyncIterator[bytes]:
            for delta in head:
                yield sse({**header, "choices": [chunk(delta, None)]})
            finished = False
            async for text in self.tokens(generation):
                finished = generation.finish_reason is not None
                yield sse({**header, "choices": [chunk(text, generation.finish_reason)]})
            if not finished:
                yield sse({**header, "choices": [chunk("", generation.finish_reason)]})
            if include_usage:
                yield sse({**header, "choices": [], "usage": usage([generation])})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    def broken(self, body: dict, kind: str) -> StreamingResponse:
        """A 200 that breaks off: one event of a stream, or half a JSON object, then the connection drops."""
        streaming, chunk = body.get("stream") is True, chat_chunk if kind.startswith("chat") else text_chunk
        first = sse({**self.header(kind), "choices": [chunk("", None)]}) if streaming else b'{"id": "cmpl-'

        async def parts() -> AsyncIterator[bytes]:
            yield first
            logging.getLogger("uvicorn.error").addFilter(quiet_dropped_connections)
            raise ConnectionDropped("injected dropped connection (close_first)")

        return StreamingResponse(parts(), media_type="text/event-stream" if streaming else "application/json")


def default_hardware() -> dict:
    from harness.env import hardware

    return {key: value for key, value in hardware().items() if key in HARDWARE_KEYS}


def build_app(model: Any, tokenizer: Any, *, served_name: str, options: ServerOptions | None = None) -> Starlette:
    """The Starlette app; ``app.state.server`` is the ``ReferenceServer`` and
    ``app.state.requests_seen`` the number of completion POSTs so far. ``options`` are read at each
    request, so a test may change the faults of a running server."""
    server = ReferenceServer(model, tokenizer, served_name, options or ServerOptions())
    app = Starlette(routes=server.routes(), exception_handlers={RequestError: request_error})
    app.state = server.state
    return app
