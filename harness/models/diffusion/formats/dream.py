"""Dream (Dream-org/Dream-v0-Base-7B, -Instruct-7B): Qwen2.5-7B adapted to masked diffusion, loaded
into transformers' ``Qwen2ForCausalLM`` (``DreamModel`` keeps the Qwen2 weight names) and run with
full attention (:class:`FullAttention`: their forward passes the attention mask "full"); shifted:
their logits are moved one place right, so position i - 1 predicts token i.

* config.json: ``model_type: Dream``, ``architectures: [DreamModel]``, Qwen2 fields and
  ``mask_token_id`` (151666). Read from the DreamConfig defaults and Dream-derived config.json
  files; the Dream-v0 config.json itself was not opened.
* No blocks: a ``config={"block_size": n}`` load option is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models.diffusion.attention import FullAttention
from harness.models.diffusion.formats.common import FORMATS, hf_max_length, read_weights, weight_files
from harness.models.diffusion.formats.released import (block_option, model_from_state, qwen_config, released_config,
                                                       released_mask_id, released_tokenizer)

MODEL_TYPES, ARCHITECTURES = ("Dream", "dream"), ("DreamModel",)
MASK_ID = 151666


@FORMATS.register("dream")
def load_dream(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    raw = released_config(path, "dream", MODEL_TYPES, ARCHITECTURES)
    if block_option(config, "dream") is not None:
        raise HarnessError(f"Dream checkpoint '{path}' runs full attention over the whole canvas; a block_size "
                           "does not apply (set the sampler's block_length instead)")
    lm = model_from_state(Qwen2ForCausalLM, qwen_config(Qwen2Config, raw, "dream", path),
                          read_weights(weight_files(path)), dtype, "dream", path)
    tok = released_tokenizer(tokenizer, path, "Qwen2Tokenizer")
    return FullAttention(lm), tok, released_mask_id(raw, tok, MASK_ID), True, hf_max_length(lm.config)
