"""SDAR (JetLM/SDAR-1.7B-Chat, -4B-Chat, -8B-Chat; arXiv 2510.06303): a Qwen3 decoder trained for
block diffusion, loaded into transformers' ``Qwen3ForCausalLM`` (its weight names are Qwen3's) and
run block-causal (:class:`BlockCausal`); unshifted: the logits at a position predict that position.

* config.json: ``model_type: sdar``, ``architectures: [SDARForCausalLM]``, Qwen3 fields. The
  released 4B config has no ``block_size`` and no ``mask_token_id`` (the remote SDARConfig has
  both; its defaults were not read), so the block size is config.json's ``block_size`` if present,
  else ``config={"block_size": n}`` (a card's load option), else 4, the block length of every
  reported SDAR number. SDAR-4B-Chat-b64 (block 64) and the MoE SDAR-30B-A3B models are not
  registered: whether the b64 config states its block size was not checked, and the MoE layout
  was not read (a config with ``num_experts`` is refused).
* mask: ``<|MASK|>``, id 151669 (added_tokens.json; the README's ``mask_token_id``); taken from
  config.json's ``mask_token_id``, else the tokenizer's mask token, else 151669.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models.diffusion.attention import BlockCausal
from harness.models.diffusion.formats.common import FORMATS, hf_max_length, read_weights, weight_files
from harness.models.diffusion.formats.released import (block_option, block_size, model_from_state, qwen_config,
                                                       released_config, released_mask_id, released_tokenizer)

MODEL_TYPES, ARCHITECTURES = ("sdar", "sdar_moe"), ("SDARForCausalLM", "SDARMoeForCausalLM")
MASK_ID, BLOCK_SIZE = 151669, 4


@FORMATS.register("sdar")
def load_sdar(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    raw = released_config(path, "sdar", MODEL_TYPES, ARCHITECTURES)
    if raw.get("model_type") == "sdar_moe" or raw.get("num_experts"):
        raise HarnessError(f"'{path}' is a mixture-of-experts SDAR checkpoint (SDAR-30B-A3B); only the dense "
                           "SDAR models (1.7B, 4B, 8B) load")
    size = block_size(raw, "block_size", BLOCK_SIZE, block_option(config, "sdar"), "sdar", path)
    lm = model_from_state(Qwen3ForCausalLM, qwen_config(Qwen3Config, raw, "sdar", path),
                          read_weights(weight_files(path)), dtype, "sdar", path)
    tok = released_tokenizer(tokenizer, path, "Qwen2Tokenizer")
    return BlockCausal(lm, size), tok, released_mask_id(raw, tok, MASK_ID), False, hf_max_length(lm.config)
