"""Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_1.5B, _7B; arXiv 2509.26328): Qwen2.5 fine-tuned
for block diffusion, loaded into transformers' ``Qwen2ForCausalLM`` (its weight names are Qwen2's)
and run block-causal (:class:`BlockCausal`) with blocks of config.json's ``bd_size`` (32);
shifted: the logits at position i - 1 predict token i (their generate() rolls the logits one place).

* config.json: ``model_type: Fast_dLLM_Qwen``, ``architectures: [Fast_dLLM_QwenForCausalLM]``,
  Qwen2 fields plus ``bd_size`` (the training block; read from the 7B config, the 1.5B config was
  not read). A ``config={"block_size": n}`` load option that differs from ``bd_size`` is refused;
  without ``bd_size`` it sets the block size (default 32). Their sub-block (``small_block_size``
  8) is a decoding setting: the card's ``block_length``.
* mask: id 151665 (the constant ``FAST_DLLM_MASK_ID`` of their modeling code; the token's string in
  the tokenizer was not checked); config.json's ``mask_token_id`` or the tokenizer's mask token
  take precedence when present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.models.diffusion.attention import BlockCausal
from harness.models.diffusion.formats.common import FORMATS, hf_max_length, read_weights, weight_files
from harness.models.diffusion.formats.released import (block_option, block_size, model_from_state, qwen_config,
                                                       released_config, released_mask_id, released_tokenizer)

MODEL_TYPES, ARCHITECTURES = ("Fast_dLLM_Qwen",), ("Fast_dLLM_QwenForCausalLM",)
MASK_ID, BLOCK_SIZE = 151665, 32


@FORMATS.register("fast_dllm_v2")
def load_fast_dllm_v2(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    raw = released_config(path, "fast_dllm_v2", MODEL_TYPES, ARCHITECTURES)
    size = block_size(raw, "bd_size", BLOCK_SIZE, block_option(config, "fast_dllm_v2"), "fast_dllm_v2", path)
    lm = model_from_state(Qwen2ForCausalLM, qwen_config(Qwen2Config, raw, "fast_dllm_v2", path),
                          read_weights(weight_files(path)), dtype, "fast_dllm_v2", path)
    tok = released_tokenizer(tokenizer, path, "Qwen2Tokenizer")
    return BlockCausal(lm, size), tok, released_mask_id(raw, tok, MASK_ID), True, hf_max_length(lm.config)
