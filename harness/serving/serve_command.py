"""``harness serve``: the reference OpenAI-compatible server over an AR model (the ``serve`` extra).

    harness serve --model smollm2-135m --port 8000
    harness serve --model ./my-checkpoint --port 0 --served-model-name mine --token-delay-ms 20

It prints ``serving NAME at http://HOST:PORT/v1`` once it listens (``--port 0``: a free port, the
real one printed) and runs until interrupted.
"""
from __future__ import annotations

import socket
from typing import Any, Optional

import typer

from harness.errors import HarnessError


def serve(
    model: str = typer.Option(..., "--model", help="An AR model: card name, checkpoint directory or hub id."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", help="0: a free port."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The name requests give (default: the card's)."),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: the card's)."),
    token_delay_ms: float = typer.Option(0.0, "--token-delay-ms", help="A pause before each generated token."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
) -> None:
    """Serve a Hugging Face causal LM over an OpenAI-compatible HTTP API (completions and chat)."""
    from harness.models.factory import resolve_card
    from harness.models.loading import load_causal_lm, resolve_weights
    from harness.plan import check_device, check_dtype

    card = resolve_card(model)
    if card.backend != "hf_ar":
        raise HarnessError(f"harness serve serves AR (hf_ar) models; '{model}' is a {card.backend} model")
    if not 0 <= port <= 65535:
        raise HarnessError(f"--port must be from 0 to 65535, not {port}")
    if token_delay_ms < 0 or (threads is not None and threads < 1):
        raise HarnessError("--token-delay-ms must be at least 0 and --threads at least 1")
    device, dtype = check_device(device), check_dtype(dtype or card.dtype)
    from harness.serving.reference_server import ServerOptions, build_app

    sock = listening_socket(host, port)  # a port in use fails before the weights load

    if threads:
        import torch

        torch.set_num_threads(threads)
    lm, tokenizer = load_causal_lm(resolve_weights(card.weights), dtype=dtype, device=device)
    app = build_app(lm, tokenizer, served_name=served_model_name or card.name,
                    options=ServerOptions(token_delay_s=token_delay_ms / 1000, dtype=dtype))
    run_server(app, sock, host, served_model_name or card.name)


def run_server(app: Any, sock: socket.socket, host: str, name: str) -> None:
    """uvicorn on the bound ``sock`` until interrupted; one line once it listens."""
    try:
        import uvicorn
    except ImportError:
        raise HarnessError("harness serve needs uvicorn: pip install 'dlm-harness[serve]'") from None

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and self.servers:
                bound = self.servers[0].sockets[0].getsockname()[1]
                shown = f"[{host}]" if ":" in host else host
                print(f"serving {name} at http://{shown}:{bound}/v1", flush=True)

    server = AnnouncingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``; a one-line error when it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise HarnessError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
