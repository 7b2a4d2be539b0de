"""The reference server on a loopback port for tests: ``running_server`` and a tiny chat model."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class ServedURL(str):
    """The base URL; ``.app`` is the served Starlette app (``app.state.requests_seen``)."""

    app = None


def tiny_chat_model():
    """(model, tokenizer): the tiny Llama of ``conftest`` and its tokenizer with a simple chat template."""
    from conftest import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return build_tiny_model("llama", len(tokenizer)), tokenizer


@contextlib.contextmanager
def running_server(model, tokenizer, *, served_name: str = "tiny", options=None) -> Iterator[str]:
    """Serve ``build_app(model, tokenizer)`` on loopback (``running_app``)."""
    from harness.serving.reference_server import build_app

    with running_app(build_app(model, tokenizer, served_name=served_name, options=options)) as url:
        yield url


@contextlib.contextmanager
def running_app(app) -> Iterator[str]:
    """Serve an ASGI ``app`` from a daemon thread on 127.0.0.1 (a free port); yields the base URL
    ``http://127.0.0.1:PORT/v1`` (a ``ServedURL``: ``.app`` is the app). On exit the server stops,
    forced if a request still hangs."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, name="loopback-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the loopback server did not start within 30 s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = ServedURL(f"http://127.0.0.1:{port}/v1")
    url.app = app
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=1.0)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5.0)
