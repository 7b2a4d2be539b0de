"""What the checkpoint formats share: the registry and the helpers that read weights, configs and
tokenizers, fetch from the hub and check weight names (the attention wrappers are ``attention``).

A loader is registered as ``@FORMATS.register("name")`` and called as
``load(path, dtype=, tokenizer=, config=, **settings)``; it returns
``(model, tokenizer, mask id, shifted, max length)``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from harness.errors import HarnessError
from harness.models.diffusion.bidirectional import BidirectionalConfig, BidirectionalLM
from harness.registry import Registry

FORMATS: Registry[Callable[..., tuple]] = Registry("checkpoint format", ordered=True)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


# --- models

def own_model(cfg: BidirectionalConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
              fmt: str, path: Path) -> BidirectionalLM:
    with torch.device("meta"):  # no random init: the weights come next
        model = BidirectionalLM(cfg)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    except RuntimeError as exc:
        raise HarnessError(f"{fmt} weights in '{path}' do not fit their config: {_first_line(exc, 2)}") from exc
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    return model


def causal_lm(path: Path, fmt: str, dtype: torch.dtype, model_type: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not path.is_dir():
        raise HarnessError(f"{fmt} checkpoint '{path}' must be a directory")
    weight_files(path)
    model_type_found = read_json(path / "config.json").get("model_type")
    if model_type and model_type_found != model_type:
        raise HarnessError(f"{fmt} checkpoint '{path}' has model_type {model_type_found!r}, not {model_type!r}")
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                        output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise HarnessError(f"cannot load {fmt} checkpoint '{path}': {_first_line(exc)}") from exc
    _mismatch(fmt, path, set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ())))
    return lm


def hf_max_length(config: Any) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048


def load_tokenizer(name: str | None, path: Path, fallback: str | None):
    from transformers import AutoTokenizer

    folder = directory(path)
    if name is None:
        name = str(folder) if any((folder / f).exists() for f in TOKENIZER_FILES) else fallback
    if name is None:
        raise HarnessError(f"'{path}' holds no tokenizer; pass tokenizer=")
    offline = Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=offline, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise HarnessError(f"cannot load the tokenizer '{name}': {_first_line(exc)}") from exc


# --- key and config checks

def check_keys(fmt: str, path: Path, expected: set[str], found: set[str]) -> None:
    _mismatch(fmt, path, expected - found, found - expected)


def _mismatch(fmt: str, path: Path, missing: set[str], unexpected: set[str]) -> None:
    def few(keys: set[str]) -> str:
        return ", ".join(sorted(keys)[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "") or "none"

    if missing or unexpected:
        raise HarnessError(f"'{path}' does not match the {fmt} layout: missing {few(missing)}; "
                           f"unexpected {few(unexpected)}")


def require(state: dict, fmt: str, path: Path, keys: list[str]) -> None:
    check_keys(fmt, path, set(keys), set(state) & set(keys))


def check_supported(what: str, fields: dict, wanted: dict[str, tuple]) -> None:
    for name, values in wanted.items():
        if name in fields and fields[name] not in values:
            raise HarnessError(f"unsupported {what} config {name}={fields[name]!r} (supported: {values[0]!r})")


def count_layers(state: dict, pattern: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


# --- files

def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise HarnessError(f"'{path}' is not a weight file ({', '.join(WEIGHT_SUFFIXES)})")
        return [path]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            return sorted({path / f for f in read_json(path / index).get("weight_map", {}).values()})
    for suffix in WEIGHT_SUFFIXES:
        files = sorted(path.glob("*" + suffix))
        if len(files) > 1:
            raise HarnessError(f"'{path}' holds several {suffix} files and no index; name one")
        if files:
            return files
    raise HarnessError(f"'{path}' holds no weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")


def read_weights(files: list[Path], keys_only: bool = False) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors" and keys_only:
                with safe_open(str(file), "pt") as f:
                    state.update(dict.fromkeys(f.keys()))
            elif file.suffix == ".safetensors":
                state.update(load_file(str(file)))
            else:
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for wrapper in ("model", "state_dict"):  # lit-gpt / Lightning checkpoints nest the weights
                    if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
                        loaded = loaded[wrapper]
                state.update(loaded)
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            raise HarnessError(f"cannot read weights '{file}': {_first_line(exc)}") from exc
    return state


def read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HarnessError(f"cannot read '{path}': {_first_line(exc)}") from exc
    if not isinstance(value, dict):
        raise HarnessError(f"'{path}' must hold a JSON object")
    return value


def directory(path: Path) -> Path:
    return path if path.is_dir() else path.parent


# --- the hub

def local_path(source: str) -> Path:
    """A local path for ``source``; a hub id (``owner/repo`` or ``owner/repo/file``) is downloaded."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    parts = source.strip("/").split("/")
    if source.startswith((".", "/", "~")) or len(parts) < 2:
        raise HarnessError(f"checkpoint '{source}' does not exist")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if repo.lower() == "nieshen/smdm" and not filename:
        raise HarnessError("nieshen/SMDM holds many checkpoints; name one, e.g. "
                           "nieshen/SMDM/mdm_safetensors/mdm-1028M-1600e18.safetensors")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename:
            return Path(hf_hub_download(repo, filename))
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as exc:  # network, auth and missing-repo errors all end here
        raise HarnessError(f"cannot fetch '{source}' from the Hugging Face hub: {_first_line(exc)}") from exc


def repo_id(source: str) -> str:
    return "/".join(source.strip("/").split("/")[:2]).lower()


def _first_line(exc: BaseException, lines: int = 1) -> str:
    text = " ".join(str(exc).strip().splitlines()[:lines]).strip()
    return text or type(exc).__name__
