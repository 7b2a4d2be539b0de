"""Display names of models: the card's name, or for a harness checkpoint its base model, recipe and
step (``smollm2-135m-dlm-quick@60``), never a bare directory name such as ``final``.

A checkpoint is recognised by the ``diffusion_config.json`` the trainer writes (``format:
dlm-harness``, ``base_model``, ``step``, ``recipe``); the recipe is named after the preset whose
every setting it holds, else ``custom``. Its training log (``train_log.jsonl``, one directory up)
gives the loss curve shown beside its evaluation.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

LOG_FILE = "train_log.jsonl"


@functools.lru_cache(maxsize=256)
def checkpoint_config(weights: str) -> dict[str, Any] | None:
    """The trainer's diffusion config of a harness checkpoint directory, None for anything else."""
    path = Path(weights) / "diffusion_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("format") == "dlm-harness" else None


def preset_name(recipe: dict[str, Any]) -> str:
    """The preset whose every setting the recipe holds (``quick``), else ``custom``."""
    from harness.train.config import PRESETS

    def same(a: Any, b: Any) -> bool:
        return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

    return next((name for name, preset in PRESETS.items()
                 if all(key in recipe and same(recipe[key], value) for key, value in preset.items())), "custom")


def checkpoint_name(config: dict[str, Any]) -> str:
    base = Path(str(config.get("base_model") or "model")).name
    step = config.get("step")
    return f"{base}-dlm-{preset_name(config.get('recipe') or {})}" + (f"@{step}" if step is not None else "")


def display_name(name: str, fingerprint: dict[str, Any]) -> str:
    """The name a model is shown by (see the module docstring)."""
    weights = fingerprint.get("weights")
    config = checkpoint_config(str(weights)) if isinstance(weights, str) and weights else None
    if config is not None:
        return checkpoint_name(config)
    base = fingerprint.get("base_model")
    if base and isinstance(weights, str) and Path(weights).name == name:  # a checkpoint no longer on disk
        return f"{Path(str(base)).name}-dlm ({name})"
    return name


def training_log(fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    """The logged steps of the adaptation that produced a harness checkpoint ([] when there is none)."""
    weights = fingerprint.get("weights")
    if not (isinstance(weights, str) and checkpoint_config(weights)):
        return []
    try:
        lines = (Path(weights).parent / LOG_FILE).read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("loss"), (int, float)):
            rows.append(row)
    return rows
