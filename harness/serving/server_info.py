"""What a served endpoint says about itself: engine, version, model, context length, hardware.

Asked once, before any request: ``/v1/models`` (every engine: the model ids, ``owned_by`` names the
engine, vLLM and SGLang add ``max_model_len``), then what each engine adds where it has it: vLLM's
``/version``, SGLang's ``/get_server_info`` and the reference server's ``/server_info`` (which
also reports its hardware and dtype). Engines that do not report their hardware get what the user
declares (``server_hardware``, e.g. ``8xH20``), else ``{"source": "unknown"}``. Nothing here holds
a credential.
"""
from __future__ import annotations

import re
from typing import Any

from harness.errors import HarnessError
from harness.serving.client import Endpoint

ENGINES = {"vllm": "vllm", "sglang": "sglang", "dlm-harness": "harness-reference"}
INFO_ROUTES = ("/server_info", "/get_server_info")


def connect(settings) -> tuple[Endpoint, dict[str, Any]]:
    """The endpoint of ``EndpointSettings`` and what its server reports."""
    endpoint = Endpoint(settings.base_url, api_key_env=settings.api_key_env, timeout=settings.timeout,
                        max_retries=settings.max_retries)
    return endpoint, probe_server(endpoint, settings.model, settings.server_hardware)


def probe_server(endpoint: Endpoint, model: str | None = None, declared_hardware: str | None = None) -> dict[str, Any]:
    """{engine, version, model, models, max_model_len, dtype, hardware} of the server; ``model``:
    the served model to use (None: the server's only one)."""
    listing = endpoint.get("models", required=True) or {}
    entries = [m for m in listing.get("data") or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if not entries:
        raise HarnessError(f"endpoint {endpoint.base_url}: /models lists no model")
    ids = [m["id"] for m in entries]
    if model is None and len(ids) > 1:
        raise HarnessError(f"endpoint {endpoint.base_url} serves several models ({', '.join(ids)}): "
                           f"choose one with --model_args model=NAME")
    if model is not None and model not in ids:
        raise HarnessError(f"endpoint {endpoint.base_url} does not serve '{model}' (it serves {', '.join(ids)})")
    entry = entries[ids.index(model)] if model else entries[0]
    info = next((i for i in map(lambda route: endpoint.get(route, root=True), INFO_ROUTES) if i), {}) or {}
    version = endpoint.get("/version", root=True) or {}
    engine = str(info.get("engine") or version.get("engine") or ENGINES.get(str(entry.get("owned_by")), "")
                 or "openai-compatible")
    return {"engine": engine, "version": short_text(version.get("version") or info.get("version")),
            "model": entry["id"], "models": ids, "root": short_text(entry.get("root")),
            "max_model_len": number(entry.get("max_model_len") or info.get("max_model_len")),
            "dtype": short_text(info.get("dtype")), "hardware": server_hardware(info.get("hardware"), declared_hardware)}


def server_hardware(reported: Any, declared: str | None) -> dict[str, Any]:
    """The server's hardware as it reports it, else as declared, else unknown."""
    if isinstance(reported, dict) and reported:
        return {**{k: v for k, v in reported.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)},
                "source": "reported"}
    if declared:
        return {**declared_hardware(declared), "source": "declared"}
    return {"source": "unknown"}


def declared_hardware(declared: str) -> dict[str, Any]:
    """``8xH20`` or ``8 x H20`` -> 8 GPUs named H20; anything else is one accelerator of that name."""
    match = re.fullmatch(r"\s*(\d+)\s*[x×*]\s*(.+?)\s*", declared)
    return {"gpu": match.group(2), "gpu_count": int(match.group(1))} if match else {"gpu": declared.strip(), "gpu_count": 1}


def short_text(value: Any) -> str | None:
    return str(value)[:200] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def number(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None
