"""What the loaders of released block-diffusion and Dream checkpoints share (``sdar``,
``fast_dllm_v2``, ``dream``, ``llada2``): their config.json read and checked, a transformers model
built from a config and an already renamed state dict without random initialisation, the
``config=`` load option that states a block size, the mask id, and the tokenizer (read without
remote code).

None of these checkpoints' own (``trust_remote_code``) modules runs: each is loaded into a
transformers class that computes the same function (Qwen2, Qwen3, Glm4Moe).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError
from harness.models.diffusion.formats.common import TOKENIZER_FILES, _first_line, check_keys, directory, read_json

# the Qwen-family config.json fields copied as they are into a transformers Qwen2/Qwen3 config
QWEN_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
               "tie_word_embeddings", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id",
               "pad_token_id")
QWEN_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def released_config(path: Path, fmt: str, model_types: tuple[str, ...], architectures: tuple[str, ...]) -> dict:
    """The checkpoint's config.json, which must name one of the released model types or architectures."""
    if not path.is_dir():
        raise HarnessError(f"{fmt} checkpoint '{path}' must be a directory (config.json and safetensors)")
    raw = read_json(path / "config.json")
    if not raw:
        raise HarnessError(f"{fmt} checkpoint '{path}' has no config.json")
    if raw.get("model_type") not in model_types and not set(raw.get("architectures") or ()) & set(architectures):
        raise HarnessError(f"'{path}' is not a {fmt} checkpoint: config.json has model_type "
                           f"{raw.get('model_type')!r} (expected {' or '.join(map(repr, model_types))})")
    return raw


def require_fields(raw: dict, fmt: str, path: Path, names: tuple[str, ...]) -> None:
    missing = [name for name in names if raw.get(name) is None]
    if missing:
        raise HarnessError(f"{fmt} config.json in '{path}' lacks {', '.join(missing)}")


def rope_parameters(raw: dict, fmt: str, default_theta: float, **extra: Any) -> dict:
    """Plain RoPE only: a config with rope_scaling (YaRN, dynamic NTK, ...) is refused, not approximated."""
    scaling = raw.get("rope_scaling")
    if scaling not in (None, {}) and (not isinstance(scaling, dict)
                                      or (scaling.get("rope_type") or scaling.get("type")) != "default"):
        raise HarnessError(f"unsupported {fmt} config rope_scaling={scaling!r} (supported: None)")
    theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", default_theta))
    return {"rope_type": "default", "rope_theta": float(theta), **extra}


def qwen_config(config_class: type, raw: dict, fmt: str, path: Path, default_theta: float = 1e6) -> Any:
    """A transformers Qwen2/Qwen3 config from a Qwen-family config.json (sliding windows refused)."""
    require_fields(raw, fmt, path, QWEN_REQUIRED)
    if raw.get("use_sliding_window"):
        raise HarnessError(f"unsupported {fmt} config use_sliding_window=True (supported: False)")
    fields = {k: raw[k] for k in QWEN_FIELDS if raw.get(k) is not None}
    try:
        return config_class(**fields, rope_parameters=rope_parameters(raw, fmt, default_theta),
                            use_sliding_window=False)
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"{fmt} config.json in '{path}' is not a valid {config_class.__name__}: "
                           f"{_first_line(exc)}") from exc


def model_from_state(model_class: type, config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype,
                     fmt: str, path: Path, float32: tuple[str, ...] = ()) -> nn.Module:
    """``model_class(config)`` holding ``state`` (names already the class's own): built on the meta
    device, so nothing is randomly initialised; every weight must be there and nothing else.
    Names ending in one of ``float32`` stay float32 (a router, as transformers keeps it)."""
    with torch.device("meta"):
        lm = model_class(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # a tied head may be saved or not
    expected = {k for k in lm.state_dict() if not (tied and k == "lm_head.weight")}
    check_keys(fmt, path, expected, set(state))
    state = {k: v.to(torch.float32 if float32 and k.endswith(float32) else dtype) for k, v in state.items()}
    try:
        lm.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise HarnessError(f"{fmt} weights in '{path}' do not fit their config: {_first_line(exc, 2)}") from exc
    if tied:
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
    base = lm.base_model
    base.rotary_emb = type(base.rotary_emb)(config=lm.config)  # its non-persistent tables, now real
    left = [name for name, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise HarnessError(f"{fmt} checkpoint '{path}' left {', '.join(left[:3])} unloaded")
    return lm.eval()


def block_option(config: Any, fmt: str) -> int | None:
    """The block size a card or ``--model-args`` states through ``config`` ({"block_size": n} or a
    JSON file holding it); None when it states none."""
    if config is None:
        return None
    if isinstance(config, (str, Path)):
        config = read_json(Path(config).expanduser()) if Path(config).expanduser().is_file() else None
    if not isinstance(config, dict) or set(config) - {"block_size"}:
        raise HarnessError(f"a {fmt} checkpoint takes config={{'block_size': n}} (or a JSON file holding it), "
                           f"got {config!r}")
    size = config.get("block_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise HarnessError(f"{fmt} block_size must be a positive integer, not {size!r}")
    return size


def block_size(raw: dict, field: str, default: int, option: int | None, fmt: str, path: Path) -> int:
    """The checkpoint config's ``field``, else ``option``, else ``default``; an option that
    contradicts the checkpoint's own value is refused."""
    stated = raw.get(field)
    if stated is not None and (not isinstance(stated, int) or isinstance(stated, bool) or stated < 1):
        raise HarnessError(f"{fmt} config.json in '{path}' has {field}={stated!r}; expected a positive integer")
    if stated is not None and option is not None and option != stated:
        raise HarnessError(f"block_size {option} contradicts the {fmt} checkpoint '{path}', whose config.json "
                           f"says {field}={stated}")
    return stated if stated is not None else option if option is not None else default


def released_mask_id(raw: dict, tokenizer: Any, default: int) -> int:
    """config.json's ``mask_token_id``, else the tokenizer's mask token, else the released id."""
    if isinstance(raw.get("mask_token_id"), int):
        return raw["mask_token_id"]
    mask = getattr(tokenizer, "mask_token_id", None)
    return mask if isinstance(mask, int) else default


def released_tokenizer(name: str | None, path: Path, same_as: str) -> Any:
    """The checkpoint's tokenizer (or ``name``), never its remote code: a tokenizer_config.json that
    names a custom class (Dream's ``DreamTokenizer``, a copy of Qwen2's) is read by the transformers
    class ``same_as`` from the same files. (``common.load_tokenizer`` would let transformers ask
    whether to run that code, since these config.json files carry an ``auto_map``.)"""
    import transformers

    folder = directory(path)
    if name is None and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise HarnessError(f"'{path}' holds no tokenizer; pass tokenizer=")
    name = name or str(folder)
    offline = Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return transformers.AutoTokenizer.from_pretrained(name, local_files_only=offline, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        if "custom code" not in str(exc):
            raise HarnessError(f"cannot load the tokenizer '{name}': {_first_line(exc)}") from exc
    try:
        return getattr(transformers, same_as).from_pretrained(name, local_files_only=offline)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HarnessError(f"cannot load the tokenizer '{name}' as {same_as}: {_first_line(exc)}") from exc
