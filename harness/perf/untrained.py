"""``untrained-dlm:BASE``: an AR model with a mask token added, run as a shifted DLM with no training;
``untrained-dlm:BASE:blockB``: the same run as a block-diffusion model with blocks of B.

For timing only (its records say ``untrained: true``); built once and cached under
``harness.models.loading.cache_dir()``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from harness.errors import HarnessError

UNTRAINED = "untrained-dlm:"


def untrained_dlm(base: str, block_size: int | None = None) -> Path:
    """A harness-format DLM directory: ``base``'s weights plus a mask token, untrained (block-causal
    with ``block_size``); built once."""
    from harness.hashing import stable_hash
    from harness.models.factory import resolve_card
    from harness.models.loading import cache_dir, load_causal_lm, resolve_weights
    from harness.runner import slug
    from harness.train.recipe import add_mask_token

    card = resolve_card(base)
    if card.backend != "hf_ar":
        raise HarnessError(f"untrained-dlm needs an AR base model; '{base}' is a {card.backend} model")
    weights = resolve_weights(card.weights)
    block = f"-block{block_size}" if block_size else ""
    target = cache_dir() / "untrained-dlm" / f"{slug(card.name)}{block}-{stable_hash(weights)[:8]}"
    if (target / "diffusion_config.json").exists():
        return target
    model, tokenizer = load_causal_lm(weights)
    mask_id = add_mask_token(model, tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "diffusion_config.json").write_text(json.dumps(
            {"format": "dlm-harness", "version": 1, "kind": "shifted", "mask_token_id": mask_id, "base_model": base,
             "untrained": True, **({"block_size": block_size} if block_size else {})}, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "diffusion_config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_target(name: str) -> str:
    """The model a bench name stands for: ``untrained-dlm:BASE[:blockB]`` is built (once), others are as given."""
    if not name.startswith(UNTRAINED):
        return name
    base, _, block = name[len(UNTRAINED):].partition(":")
    if block and not (block.startswith("block") and block[5:].isdigit() and int(block[5:]) > 0):
        raise HarnessError(f"'{name}': the part after the base model must be blockB with B > 0, e.g. block32")
    return str(untrained_dlm(base, int(block[5:]) if block else None))


def is_untrained(target: str) -> bool:
    """True for a harness DLM directory whose diffusion_config.json says ``untrained``."""
    config = Path(target) / "diffusion_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("untrained"))
