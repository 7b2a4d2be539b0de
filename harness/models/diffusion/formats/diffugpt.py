"""DiffuGPT (diffusionfamily/diffugpt-s, -m): a PyTorchModelHubMixin save of a wrapper with
``embed_tokens``, ``denoise_model`` (a GPT-2 body without wte) and ``lm_head``; shifted."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from harness.models.diffusion.attention import FullAttention
from harness.models.diffusion.formats.common import (FORMATS, check_keys, count_layers, directory,
                                                     load_tokenizer, read_json, read_weights, require, weight_files)

GPT2_FIELDS = ("n_head", "n_inner", "activation_function", "layer_norm_epsilon", "scale_attn_weights",
               "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "bos_token_id", "eos_token_id")


@FORMATS.register("diffugpt")
def load_diffugpt(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    from transformers import GPT2Config, GPT2LMHeadModel

    state = read_weights(weight_files(path))
    # Old transformers saved GPT-2's causal-mask buffers (h.N.attn.bias / masked_bias): not weights.
    state = {k: v for k, v in state.items() if not re.search(r"\.attn\.(masked_)?bias$", k)}
    require(state, "diffugpt", path, ["embed_tokens.weight", "denoise_model.wpe.weight"])
    vocab, n_embd = state["embed_tokens.weight"].shape
    fields = _gpt2_fields(read_json(directory(path) / "config.json"))
    fields.update(vocab_size=vocab, n_embd=n_embd, n_positions=state["denoise_model.wpe.weight"].shape[0],
                  n_layer=count_layers(state, r"denoise_model\.h\.(\d+)\."))
    fields.setdefault("n_head", n_embd // 64)  # every GPT-2 size has 64-dimensional heads
    tied = "lm_head.weight" not in state  # the mixin's safetensors save drops the tied copy
    lm = GPT2LMHeadModel(GPT2Config(**fields, tie_word_embeddings=tied))
    body = {"denoise_model." + k[len("transformer."):]: k for k in lm.state_dict()
            if k.startswith("transformer.") and not k.startswith("transformer.wte.")}
    expected = {"embed_tokens.weight", *body} | (set() if tied else {"lm_head.weight"})
    check_keys("diffugpt", path, expected, set(state))
    mapped = {hf: state[src] for src, hf in body.items()}
    mapped["transformer.wte.weight"] = state["embed_tokens.weight"]
    mapped["lm_head.weight"] = state.get("lm_head.weight", state["embed_tokens.weight"])
    lm.load_state_dict(mapped)
    tok = load_tokenizer(tokenizer, path, "gpt2")
    mask = tok.mask_token_id if tok.mask_token_id is not None else (50257 if vocab > 50257 else 10541)
    return FullAttention(lm.to(dtype)), tok, mask, True, fields["n_positions"]


def _gpt2_fields(raw: dict) -> dict[str, Any]:
    """GPT-2 fields from a mixin config.json: plain GPT-2 keys, or a GPT-2 dict nested one level down."""
    if "n_embd" not in raw and raw.get("model_type") != "gpt2":
        raw = next((v for v in raw.values() if isinstance(v, dict)
                    and ("n_embd" in v or v.get("model_type") == "gpt2")), {})
    return {k: raw[k] for k in GPT2_FIELDS if raw.get(k) is not None}
