"""DiffuLLaMA (diffusionfamily/diffullama): a plain Llama-2 directory run bidirectionally; shifted."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.models.diffusion.attention import FullAttention
from harness.models.diffusion.formats.common import FORMATS, causal_lm, hf_max_length, load_tokenizer


@FORMATS.register("diffullama")
def load_diffullama(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    lm = causal_lm(path, "diffullama", dtype, model_type="llama")
    tok = load_tokenizer(tokenizer, path, None)
    mask = tok.mask_token_id if tok.mask_token_id is not None else 811
    return FullAttention(lm), tok, mask, True, hf_max_length(lm.config)
