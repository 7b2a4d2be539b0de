"""A small OpenAI-compatible HTTP client on the standard library (``http.client``), one keep-alive
connection per thread.

``post`` retries what a retry can fix (refused or dropped connections, timeouts, HTTP 408, 429 and
5xx) ``max_retries`` times with exponential back-off, then raises an ``EndpointError`` that says
what happened on one line; any other HTTP error (a 400: a request the server rejects) is raised at
once with the server's message. ``stream`` reads server-sent events (``data: {...}`` lines up to
``data: [DONE]``) and yields each event with the time it arrived; it retries only before the
first byte of the answer, since a half-read stream cannot be replayed unseen. The API key is read
from the environment variable named by ``api_key_env`` at each request and is never stored.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlsplit

from harness.errors import HarnessError

ROUTES = ("/chat/completions", "/completions")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
NETWORK_ERRORS = (ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException, OSError)


class EndpointError(HarnessError):
    """A request the endpoint did not answer (after the retries), or answered with an error
    (``status``: the HTTP status of a request the server rejected)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Retryable(Exception):
    """One failed attempt that another attempt may fix; ``str`` says what went wrong."""


def check_base_url(url: str) -> str:
    """``http(s)://host[:port][/path]`` without a trailing slash (the ``/v1`` the API lives under); a
    URL of the route itself (lm-eval's ``base_url=.../v1/completions``) is cut to the API root."""
    url = url.strip().rstrip("/")
    for route in ROUTES:
        url = url[:-len(route)] if url.endswith(route) else url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HarnessError(f"endpoint URL must look like http://HOST:PORT/v1, not '{url}'")
    try:
        parts.port
    except ValueError:
        raise HarnessError(f"endpoint URL '{url}' has a bad port") from None
    return url.rstrip("/")


@dataclass
class Endpoint:
    """The API under ``base_url`` (``http://host:port/v1``)."""

    base_url: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 120.0  # seconds without a byte from the server
    max_retries: int = 3
    backoff: float = 0.5  # seconds before the first retry, doubled after each
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.base_url = check_base_url(self.base_url)
        parts = urlsplit(self.base_url)
        self.scheme, self.host, self.port, self.prefix = parts.scheme, parts.hostname, parts.port, parts.path

    # ---- requests ------------------------------------------------------------------------------
    def post(self, path: str, payload: dict[str, Any], *, root: bool = False) -> dict[str, Any]:
        """POST ``payload`` to ``base_url/path`` (``root``: the server's ``/path``, as vLLM's
        ``/tokenize``) and return the JSON answer (retried as above)."""
        target = path if root else self._path(path)
        return self._retrying(lambda: self._json(self._send("POST", target, payload)), path)

    def get(self, path: str, *, root: bool = False, required: bool = False) -> dict[str, Any] | None:
        """GET ``path`` under the API (``root``: under the server's root, as vLLM's ``/version``).
        ``required``: retried, and an ``EndpointError`` on failure; otherwise one attempt and None
        where the server has no such route or answers badly (probes of what a server reports)."""
        target = path if root else self._path(path)
        if required:
            return self._retrying(lambda: self._json(self._send("GET", target, None)), path)
        try:
            return self._json(self._send("GET", target, None))
        except (Retryable, EndpointError):
            return None

    def stream(self, path: str, payload: dict[str, Any]) -> Iterator[tuple[float, dict[str, Any]]]:
        """POST with ``stream: true``; yields (``time.perf_counter()`` on arrival, event) per event."""
        response = self._retrying(lambda: self._send("POST", self._path(path), {**payload, "stream": True}), path)
        try:
            yield from self._events(response, path)
        finally:
            response.close()

    # ---- plumbing ------------------------------------------------------------------------------
    def _path(self, path: str) -> str:
        return f"{self.prefix}/{path.lstrip('/')}"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = kind(self.host, self.port, timeout=self.timeout)
        return conn

    def _send(self, method: str, path: str, payload: dict[str, Any] | None) -> http.client.HTTPResponse:
        """One attempt: the response with its status read (a reused connection that the server
        closed meanwhile is reopened once); failures a retry may fix raise ``Retryable``."""
        body = None if payload is None else json.dumps(payload).encode()
        for fresh in (False, True):
            conn = self._connection(fresh)
            try:
                conn.request(method, path, body=body, headers=self._headers())
                response = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                if fresh:
                    self._connection(True)
                    raise Retryable(describe(exc, self.timeout)) from None
            except NETWORK_ERRORS as exc:
                self._connection(True)
                raise Retryable(describe(exc, self.timeout)) from None
        if response.status >= 400:
            message = error_message(read_safely(response), response.status)
            if response.status in RETRY_STATUSES:
                raise Retryable(message)
            raise EndpointError(f"endpoint {self.base_url}: {message}", response.status)
        return response

    def _json(self, response: http.client.HTTPResponse) -> dict[str, Any]:
        try:
            data = json.loads(response.read())
        except NETWORK_ERRORS as exc:
            self._connection(True)
            raise Retryable(describe(exc, self.timeout)) from None
        except ValueError:
            raise EndpointError(f"endpoint {self.base_url}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise EndpointError(f"endpoint {self.base_url}: expected a JSON object, got {type(data).__name__}")
        return data

    def _retrying(self, attempt, path: str):
        delay = self.backoff
        for number in range(self.max_retries + 1):
            try:
                return attempt()
            except Retryable as exc:
                if number == self.max_retries:
                    tries = f"{number + 1} attempt{'s' * (number > 0)}"
                    raise EndpointError(f"endpoint {self.base_url}/{path.lstrip('/')}: {exc} ({tries})") from None
                time.sleep(delay)
                delay *= 2

    def _events(self, response: http.client.HTTPResponse, path: str) -> Iterator[tuple[float, dict[str, Any]]]:
        where = f"endpoint {self.base_url}/{path.lstrip('/')}"
        while True:
            try:
                line = response.readline()
            except NETWORK_ERRORS as exc:
                self._connection(True)
                raise EndpointError(f"{where}: the stream broke off: {describe(exc, self.timeout)}") from None
            if not line:
                self._connection(True)
                raise EndpointError(f"{where}: the stream ended before [DONE]")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                read_safely(response)  # the end of the chunked body, so the connection can be reused
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise EndpointError(f"{where}: a streamed event is not JSON") from None
            if not isinstance(event, dict) or "error" in event:
                raise EndpointError(f"{where}: {error_message(data, None)}")
            yield time.perf_counter(), event


def read_safely(response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read()
    except NETWORK_ERRORS:
        return b""


def error_message(body: bytes, status: int | None) -> str:
    """``HTTP <status>: <the server's message>`` from an OpenAI-style error body, on one line."""
    message = ""
    try:
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = str(error.get("message") or error.get("detail") or "") if isinstance(error, dict) else str(error)
    except ValueError:
        message = body.decode("utf-8", "replace")
    message = " ".join(message.split())[:300]
    head = f"HTTP {status}" if status else "error"
    return f"{head}: {message}" if message else head


def describe(exc: BaseException, timeout: float) -> str:
    """A failed attempt in words."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within the {timeout:g} s timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionResetError,
                        BrokenPipeError)):
        return "the server closed the connection before answering"
    return f"{type(exc).__name__}: {exc}"
