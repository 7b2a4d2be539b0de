"""Resolve model weights from a card, a local directory, a GGUF inside a Python package, or the hub.

A GGUF source is dequantised once and cached as a plain safetensors directory under the user
cache (``$HARNESS_CACHE`` or ``~/.cache/dlm-harness``), so later loads take seconds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from harness.errors import HarnessError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def cache_dir() -> Path:
    root = os.environ.get("HARNESS_CACHE") or os.path.join(Path.home(), ".cache", "dlm-harness")
    return Path(root)


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise HarnessError(f"unknown dtype '{name}' (known: {', '.join(sorted(DTYPES))})")
    return getattr(torch, DTYPES[name])


def package_file(package: str, filename: str) -> Path:
    """Path of a data file shipped inside an installed Python package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            f"package '{package}' is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.exists():
            return path
    raise HarnessError(f"package '{package}' has no file '{filename}'")


def gguf_to_safetensors(gguf_path: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a cached HF directory (float32 safetensors)."""
    stat = gguf_path.stat()
    key = f"{gguf_path.stem}-{stat.st_size}"
    target = cache_dir() / "gguf" / key
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise HarnessError("reading GGUF weights needs the 'gguf' package: pip install gguf") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # transformers refuses save_pretrained on a GGUF-loaded model: write the plain parts.
        from safetensors.torch import save_model

        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / "harness_source.json").write_text(json.dumps({"gguf": str(gguf_path), "size": stat.st_size}))
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_weights(source: dict[str, Any] | str) -> str:
    """Return a local directory (or hub id) that ``from_pretrained`` can read."""
    if isinstance(source, str):
        source = {"path": source}
    if "gguf_package" in source:
        return str(gguf_to_safetensors(package_file(source["gguf_package"], source["gguf_file"])))
    if "path" in source:
        path = Path(os.path.expanduser(source["path"]))
        if not path.exists():
            raise HarnessError(f"model path '{path}' does not exist")
        check_weights_present(path)
        return str(path)
    if "hub" in source:
        return source["hub"]
    raise HarnessError(f"model weights need one of path, hub or gguf_package; got {sorted(source)}")


def check_weights_present(path: Path) -> None:
    if path.is_file():
        raise HarnessError(f"model path '{path}' is a file; give the checkpoint directory")
    patterns = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")
    if not any(any(path.glob(p)) for p in patterns):
        raise HarnessError(f"model directory '{path}' holds no weights (*.safetensors, *.bin, *.gguf)")


def load_causal_lm(weights: str, dtype: str = "float32", device: str = "cpu"):
    """Load a Hugging Face causal LM and its tokenizer from a directory or hub id."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(weights, AutoModelForCausalLM, "a causal LM", dtype=dtype, device=device)


def load_pretrained(weights: str, model_class: Any, what: str, *, dtype: str = "float32", device: str = "cpu"):
    """``model_class.from_pretrained`` and its tokenizer, local files only for a directory or offline;
    a failure is one line naming ``what`` was loaded."""
    tokenizer = load_tokenizer(weights, what)
    with loading(weights, what):
        model = model_class.from_pretrained(weights, dtype=torch_dtype(dtype), **local_only(weights))
    model.to(device).eval()
    return model, tokenizer


def load_tokenizer(weights: str, what: str = "a tokenizer"):
    """The tokenizer of a directory or hub id, local files only as ``load_pretrained`` reads them."""
    from transformers import AutoTokenizer

    with loading(weights, what):
        return AutoTokenizer.from_pretrained(weights, **local_only(weights))


def local_only(weights: str) -> dict[str, Any]:
    """``local_files_only`` for a directory, or when the hub is off."""
    return {"local_files_only": True} if os.environ.get("HF_HUB_OFFLINE") == "1" or Path(weights).exists() else {}


@contextmanager
def loading(weights: str, what: str) -> Iterator[None]:
    """A failure to load as one line naming ``what`` was loaded from where."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"cannot load {what} from '{weights}': {first}") from exc
