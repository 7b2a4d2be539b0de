"""LLaDA (GSAI-ML/LLaDA-8B-*): LLaDA's own safetensors and config.json, loaded into
:class:`BidirectionalLM` (no remote code runs); unshifted."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models.diffusion.bidirectional import BidirectionalConfig
from harness.models.diffusion.formats.common import (FORMATS, check_keys, check_supported, directory, load_tokenizer,
                                                     own_model, read_json, read_weights, weight_files)

WANTED = {"block_type": ("llama",), "activation_type": ("silu",), "layer_norm_type": ("rms",),
          "rope": (True,), "alibi": (False,), "include_bias": (False,), "include_qkv_bias": (False,),
          "input_emb_norm": (False,), "scale_logits": (False,), "attention_layer_norm": (False,),
          "block_group_size": (1,)}
NAMES = {"attn_norm": "attn_norm", "q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v",
         "attn_out": "attn.o", "ff_norm": "mlp_norm", "ff_proj": "mlp.gate",  # silu(ff_proj x) * up_proj x
         "up_proj": "mlp.up", "ff_out": "mlp.down"}


@FORMATS.register("llada")
def load_llada(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    c = read_json(directory(path) / "config.json")
    if not c:
        raise HarnessError(f"llada checkpoint '{path}' has no config.json beside its weights")
    check_supported("LLaDA", c, WANTED)
    try:
        d, n_layers, n_heads = c["d_model"], c["n_layers"], c["n_heads"]
        cfg = BidirectionalConfig(
            vocab_size=c.get("embedding_size") or c["vocab_size"], hidden_size=d, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=c.get("n_kv_heads") or n_heads,
            intermediate_size=c.get("mlp_hidden_size") or c["mlp_ratio"] * d,
            rope_theta=float(c.get("rope_theta", 10000.0)), norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(c.get("weight_tying", False)), max_length=c.get("max_sequence_length", 4096))
    except KeyError as exc:
        raise HarnessError(f"llada config.json in '{path}' lacks {exc.args[0]}") from exc
    src = {"model.transformer.wte.weight": "embed.weight", "model.transformer.ln_f.weight": "norm.weight"}
    src.update({f"model.transformer.blocks.{i}.{a}.weight": f"layers.{i}.{b}.weight"
                for i in range(n_layers) for a, b in NAMES.items()})
    if not cfg.tie_embeddings:
        src["model.transformer.ff_out.weight"] = "head.weight"
    state = read_weights(weight_files(path))
    check_keys("llada", path, set(src), set(state))
    ours = {dst: state[s] for s, dst in src.items()}
    if cfg.tie_embeddings:
        ours["head.weight"] = ours["embed.weight"]
    model = own_model(cfg, ours, dtype, "llada", path)
    tok = load_tokenizer(tokenizer, path, "GSAI-ML/LLaDA-8B-Base")
    return model, tok, c.get("mask_token_id", 126336), False, cfg.max_length
