"""The harness's own format: a Hugging Face causal-LM directory plus ``diffusion_config.json``
(``format: dlm-harness``, ``version: 1``, ``kind``: shifted or unshifted, ``mask_token_id``,
``base_model`` for the tokenizer, and for a block-diffusion checkpoint ``block_size``: the model then
runs block-causal, ``harness.models.diffusion.block_causal``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models.diffusion.attention import BlockCausal, FullAttention
from harness.models.diffusion.formats.common import (FORMATS, causal_lm, hf_max_length,
                                                     load_tokenizer, read_json)


@FORMATS.register("harness")
def load_harness(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    spec = read_json(path / "diffusion_config.json")
    if spec.get("format") != "dlm-harness" or spec.get("version") != 1:
        raise HarnessError(f"'{path}/diffusion_config.json' is not a version-1 dlm-harness file "
                           f"(format={spec.get('format')!r}, version={spec.get('version')!r})")
    if spec.get("kind") not in ("shifted", "unshifted"):
        raise HarnessError(f"'{path}/diffusion_config.json' kind must be shifted or unshifted, "
                           f"not {spec.get('kind')!r}")
    block_size = spec.get("block_size")
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1):
        raise HarnessError(f"'{path}/diffusion_config.json' block_size must be a positive integer, "
                           f"not {block_size!r}")
    lm = causal_lm(path, "harness", dtype)
    tok = load_tokenizer(tokenizer, path, spec.get("base_model"))
    model = FullAttention(lm) if block_size is None else BlockCausal(lm, block_size)
    return model, tok, spec.get("mask_token_id"), spec["kind"] == "shifted", hf_max_length(lm.config)
