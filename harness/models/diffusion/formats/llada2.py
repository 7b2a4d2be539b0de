"""LLaDA 2.x (inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1-mini, -flash): a Ling-family
mixture-of-experts decoder trained for block diffusion, loaded into transformers'
``Glm4MoeForCausalLM`` after renaming its weights, and run block-causal (:class:`BlockCausal`,
blocks of 32 from the sequence's first token, the prompt included); unshifted (their loss uses
"same label position logits").

Glm4Moe computes what ``modeling_llada2_moe.py`` (their remote code, read in a verbatim copy)
computes, checked term by term: GQA attention with a per-head RMSNorm on q and k before RoPE;
RoPE on the first ``partial_rotary_factor`` of each head (``rotate_half``, half split, dims past it
unrotated); scale head_dim^-0.5; a router in float32 with sigmoid scores, the expert bias added
for the choice only, groups scored by the sum of their top-2 biased scores, ``topk_group`` groups
kept, top-k experts; weights = the unbiased scores of those experts over their sum (+1e-20) times
``routed_scaling_factor``; a shared SwiGLU expert of width moe_intermediate_size *
num_shared_experts added; the first ``first_k_dense_replace`` layers dense; pre-norm residual
blocks, final RMSNorm, untied head. The renaming: ``word_embeddings`` -> ``embed_tokens``,
``attention`` -> ``self_attn``, ``query_key_value`` split by rows into q | k | v (heads contiguous),
``dense`` -> ``o_proj``, ``query_layernorm`` / ``key_layernorm`` -> ``q_norm`` / ``k_norm``,
``gate.expert_bias`` -> ``gate.e_score_correction_bias``, and each layer's experts stacked into
``experts.gate_up_proj`` [E, 2I, H] (gate rows first, as Glm4MoeExperts chunks them) and
``experts.down_proj`` [E, H, I].

What differs, and what is refused rather than approximated (one-line HarnessError): LLaDA2
normalises the chosen weights whenever top-k > 1 and never reads ``norm_topk_prob``; Glm4Moe
normalises only with ``norm_topk_prob``, so it is set to top-k > 1. Glm4Moe's o_proj has no bias,
so ``use_bias: true`` (a ``dense`` bias; the config class default, the released configs say false)
is refused. Their code never reads ``score_function``, ``norm_head``, ``router_dtype`` or
``rotary_dim`` (it always routes by sigmoid in float32, has no head norm and rotates
``partial_rotary_factor`` of each head): a config that says otherwise (softmax, ``norm_head:
true``, a disagreeing ``rotary_dim``) is refused, since which the weights were trained with is
unknown. Also refused: ``rope_scaling``, ``num_shared_experts`` < 1, groups of fewer than two
experts and a ``topk_group`` that cannot hold top-k experts. config.json's ``sliding_window``
(4096) is passed to their attention but unused by its sdpa and eager paths; unused here too.
Not checked: model.safetensors.index.json of a release (the names come from the module tree and a
third-party loader), the LLaDA2.0-flash config, and vocab_size (157184 inferred): all are read from
each checkpoint here.

* mask: id 156895 (their generate() default): config.json's ``mask_token_id`` or the tokenizer's
  mask token first, when present. Block size 32 (generate's block_length; config.json states none):
  a ``block_size`` in config.json, else ``config={"block_size": n}``, else 32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models.diffusion.attention import BlockCausal
from harness.models.diffusion.formats.common import (FORMATS, check_keys, hf_max_length, read_weights,
                                                     weight_files)
from harness.models.diffusion.formats.released import (block_option, block_size, model_from_state, released_config,
                                                       released_mask_id, released_tokenizer, require_fields,
                                                       rope_parameters)

MODEL_TYPES, ARCHITECTURES = ("llada2_moe",), ("LLaDA2MoeModelLM",)
MASK_ID, BLOCK_SIZE = 156895, 32
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group",
            "routed_scaling_factor")
ATTENTION = {"dense": "o_proj", "query_layernorm": "q_norm", "key_layernorm": "k_norm"}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@FORMATS.register("llada2")
def load_llada2(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    from transformers import Glm4MoeForCausalLM

    raw = released_config(path, "llada2", MODEL_TYPES, ARCHITECTURES)
    glm = glm4_config(raw, path)
    size = block_size(raw, "block_size", BLOCK_SIZE, block_option(config, "llada2"), "llada2", path)
    state = read_weights(weight_files(path))
    if not raw.get("moe_router_enable_expert_bias", True):  # the buffer exists (zeros) whether trained or not
        for i in range(glm.first_k_dense_replace, glm.num_hidden_layers):
            state.setdefault(f"model.layers.{i}.mlp.gate.expert_bias", torch.zeros(glm.n_routed_experts))
    check_keys("llada2", path, released_keys(glm), set(state))
    lm = model_from_state(Glm4MoeForCausalLM, glm, renamed(state, glm, path), dtype, "llada2", path,
                          float32=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))
    tok = released_tokenizer(tokenizer, path, "PreTrainedTokenizerFast")
    return BlockCausal(lm, size), tok, released_mask_id(raw, tok, MASK_ID), False, hf_max_length(lm.config)


def glm4_config(raw: dict, path: Path) -> Any:
    """The Glm4MoeConfig that computes the LLaDA2 config's model (see the module docstring)."""
    from transformers import Glm4MoeConfig

    require_fields(raw, "llada2", path, REQUIRED)
    heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
    head_dim = raw.get("head_dim") or hidden // heads
    factor = float(raw.get("partial_rotary_factor", 0.5))
    experts, groups, top_k = raw["num_experts"], raw["n_group"], raw["num_experts_per_tok"]
    per_group = experts // groups if isinstance(groups, int) and groups >= 1 else 0
    rotary = int(head_dim * factor)
    checks = [("score_function", "sigmoid", lambda v: v == "sigmoid", "sigmoid"),
              ("use_bias", True, lambda v: v is False, False),  # absent: the config class default, True
              ("norm_head", False, lambda v: not v, False),
              ("rotary_dim", None, lambda v: v in (None, rotary), rotary),
              ("num_shared_experts", None, lambda v: isinstance(v, int) and v >= 1, 1),
              ("n_group", None, lambda v: per_group >= 2 and experts % groups == 0,
               "a divisor of num_experts leaving >= 2 experts per group"),
              ("topk_group", None, lambda v: isinstance(v, int) and 1 <= v <= groups
               and top_k <= v * per_group, "1..n_group, keeping >= num_experts_per_tok experts")]
    for name, default, ok, supported in checks:
        if not ok(raw.get(name, default)):
            raise HarnessError(f"unsupported llada2 config {name}={raw.get(name, default)!r} "
                               f"(supported: {supported})")
    try:
        return Glm4MoeConfig(
            vocab_size=raw["vocab_size"], hidden_size=hidden, intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads, head_dim=head_dim,
            hidden_act=raw.get("hidden_act", "silu"), max_position_embeddings=raw.get("max_position_embeddings", 32768),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(raw.get("tie_word_embeddings")),
            rope_parameters=rope_parameters(raw, "llada2", 600000.0, partial_rotary_factor=factor),
            attention_bias=bool(raw.get("use_qkv_bias", False)), use_qk_norm=bool(raw.get("use_qk_norm", True)),
            moe_intermediate_size=raw["moe_intermediate_size"], num_experts_per_tok=top_k,
            n_shared_experts=raw["num_shared_experts"], n_routed_experts=experts,
            routed_scaling_factor=float(raw["routed_scaling_factor"]), n_group=groups, topk_group=raw["topk_group"],
            first_k_dense_replace=raw.get("first_k_dense_replace", 0), norm_topk_prob=top_k > 1,
            num_mtp_layers=0, pad_token_id=raw.get("pad_token_id"))
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"llada2 config.json in '{path}' does not map onto Glm4MoeConfig: "
                           f"{' '.join(str(exc).split())[:200]}") from exc


def released_keys(glm: Any) -> set[str]:
    """Every weight name of a LLaDA2 checkpoint with this config."""
    keys = {"model.word_embeddings.weight", "model.norm.weight"} | (set() if glm.tie_word_embeddings
                                                                    else {"lm_head.weight"})
    for i in range(glm.num_hidden_layers):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                 p + "attention.query_key_value.weight", p + "attention.dense.weight"}
        keys |= {p + "attention.query_key_value.bias"} if glm.attention_bias else set()
        keys |= {p + "attention.query_layernorm.weight", p + "attention.key_layernorm.weight"} if glm.use_qk_norm \
            else set()
        if i < glm.first_k_dense_replace:
            keys |= {f"{p}mlp.{name}.weight" for name in PROJECTIONS}
            continue
        keys |= {p + "mlp.gate.weight", p + "mlp.gate.expert_bias"}
        keys |= {f"{p}mlp.shared_experts.{name}.weight" for name in PROJECTIONS}
        keys |= {f"{p}mlp.experts.{e}.{name}.weight" for e in range(glm.n_routed_experts) for name in PROJECTIONS}
    return keys


def renamed(state: dict[str, torch.Tensor], glm: Any, path: Path) -> dict[str, torch.Tensor]:
    """The LLaDA2 weights under Glm4Moe's names (the source tensors are dropped as they are used)."""
    out = {"model.embed_tokens.weight": state.pop("model.word_embeddings.weight")}
    rows = [n * glm.head_dim for n in (glm.num_attention_heads, glm.num_key_value_heads, glm.num_key_value_heads)]
    for i in range(glm.num_hidden_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias") if glm.attention_bias else ("weight",):
            fused = state.pop(f"{p}attention.query_key_value.{kind}")
            if fused.shape[0] != sum(rows):
                raise HarnessError(f"llada2 weights in '{path}' do not fit their config: {p}attention.query_key_value."
                                   f"{kind} has {fused.shape[0]} rows, the config makes {sum(rows)}")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.split(rows)):
                out[f"{p}self_attn.{name}.{kind}"] = part.contiguous()
        for old, new in ATTENTION.items():
            if f"{p}attention.{old}.weight" in state:
                out[f"{p}self_attn.{new}.weight"] = state.pop(f"{p}attention.{old}.weight")
        if i >= glm.first_k_dense_replace:
            out[p + "mlp.gate.e_score_correction_bias"] = state.pop(p + "mlp.gate.expert_bias")
            experts = [[state.pop(f"{p}mlp.experts.{e}.{name}.weight") for name in PROJECTIONS]
                       for e in range(glm.n_routed_experts)]
            out[p + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u, _ in experts])
            out[p + "mlp.experts.down_proj"] = torch.stack([d for _, _, d in experts])
            del experts
    out.update(state)  # the names Glm4Moe shares: norms, dense MLPs, router weight, shared experts, head
    return out
