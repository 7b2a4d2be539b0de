"""SMDM (nieshen/SMDM): a lit-gpt ``TransEncoder`` state dict, loaded into
:class:`BidirectionalLM`; unshifted. The architecture comes from ``config=``, a json beside the
weights or the model size in the release file name."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models.diffusion.bidirectional import BidirectionalConfig
from harness.models.diffusion.formats.common import (FORMATS, check_keys, check_supported, count_layers,
                                                     load_tokenizer, own_model, read_json, read_weights, require,
                                                     weight_files)

SMDM_TOKENIZER = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
# n_head of SMDM's Diff_LLaMA_<size>M configs (lit_gpt/config.py); every other size is in the weights.
SMDM_HEADS = {6: 4, 19: 6, 34: 8, 48: 9, 66: 10, 75: 8, 85: 10, 113: 12, 142: 12, 170: 12, 180: 14,
              206: 14, 231: 14, 268: 16, 302: 16, 336: 16, 472: 10, 551: 10, 571: 11, 629: 10,
              666: 11, 717: 12, 761: 11, 831: 12, 944: 12, 1028: 14, 1233: 14, 1476: 16,
              1678: 16, 2121: 17}
UNSUPPORTED = {"_norm_class": ("RMSNorm", "FusedRMSNorm"), "_mlp_class": ("LLaMAMLP",), "bias": (False,),
               "parallel_residual": (False,), "shared_attention_norm": (False,), "condense_ratio": (1,)}
NAMES = {"norm_1.weight": "attn_norm.weight", "attn.proj.weight": "attn.o.weight",
         "norm_2.weight": "mlp_norm.weight", "mlp.swiglu.w1.weight": "mlp.gate.weight",  # xformers
         "mlp.swiglu.w2.weight": "mlp.up.weight", "mlp.swiglu.w3.weight": "mlp.down.weight"}  # SwiGLU


@FORMATS.register("smdm")
def load_smdm(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any,
              rope_cache_dtype: str | None = None) -> tuple:
    files = weight_files(path)
    state = read_weights(files)
    fields = _smdm_fields(files[0], config)
    require(state, "smdm", path, ["transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.attn.weight",
                                  "transformer.h.0.mlp.swiglu.w1.weight"])
    check_supported("SMDM", fields, UNSUPPORTED)
    rows, n_embd = state["transformer.wte.weight"].shape
    n_head = int(fields["n_head"])
    head = n_embd // n_head
    qkv_rows = state["transformer.h.0.attn.attn.weight"].shape[0]
    groups = int(fields.get("n_query_groups") or (qkv_rows // head - n_head) // 2)
    if n_embd % n_head or groups < 1 or n_head % groups or (n_head + 2 * groups) * head != qkv_rows:
        raise HarnessError(f"smdm weights in '{path}' do not fit n_head={n_head}, n_query_groups={groups}")
    n_layer = int(fields.get("n_layer") or count_layers(state, r"transformer\.h\.(\d+)\."))
    cfg = BidirectionalConfig(
        vocab_size=rows, hidden_size=n_embd, n_layers=n_layer, n_heads=n_head, n_kv_heads=groups,
        intermediate_size=state["transformer.h.0.mlp.swiglu.w1.weight"].shape[0],
        output_size=state["lm_head.weight"].shape[0], rope_theta=10000.0,
        rope_fraction=float(fields.get("rotary_percentage", 1.0)), norm_eps=float(fields.get("norm_eps", 1e-5)),
        max_length=int(fields.get("block_size", 2048)), rope_cache_dtype=rope_cache_dtype)
    src = {"transformer.wte.weight": "embed.weight", "transformer.ln_f.weight": "norm.weight",
           "lm_head.weight": "head.weight"}
    src.update({f"transformer.h.{i}.{a}": f"layers.{i}.{b}" for i in range(n_layer) for a, b in NAMES.items()})
    qkv = {f"transformer.h.{i}.attn.attn.weight": i for i in range(n_layer)}
    check_keys("smdm", path, set(src) | set(qkv), set(state))
    ours = {dst: state[s] for s, dst in src.items()}
    q_per_kv = n_head // groups
    for key, i in qkv.items():
        # lit-gpt packs each query group as [q_per_kv queries, 1 key, 1 value], head by head.
        w = state[key].view(groups, q_per_kv + 2, head, n_embd)
        ours[f"layers.{i}.attn.q.weight"] = w[:, :q_per_kv].reshape(-1, n_embd)
        ours[f"layers.{i}.attn.k.weight"] = w[:, q_per_kv].reshape(-1, n_embd)
        ours[f"layers.{i}.attn.v.weight"] = w[:, q_per_kv + 1].reshape(-1, n_embd)
    model = own_model(cfg, ours, dtype, "smdm", path)
    tok = load_tokenizer(tokenizer, path, SMDM_TOKENIZER)
    return model, tok, rows - 1, False, cfg.max_length  # mask: the extra embedding row (32000)


def _smdm_fields(weights: Path, config: str | dict | None) -> dict[str, Any]:
    """lit-gpt fields: ``config`` > a json beside the weights > the size in the file name (mdm-1028M-...)."""
    if config is None:
        for candidate in (weights.with_suffix(".json"), weights.parent / "config.json"):
            if candidate.exists():
                config = str(candidate)
                break
    fields: dict[str, Any] = {}
    if isinstance(config, dict):
        fields = dict(config)
    elif isinstance(config, str) and config.endswith(".json"):
        if not Path(config).exists():
            raise HarnessError(f"smdm config '{config}' does not exist")
        fields = read_json(Path(config))
    elif isinstance(config, str):
        fields = {"name": config}
    size = re.search(r"(\d+)M", str(fields.get("name", weights.name)))
    if "n_head" not in fields and size and int(size.group(1)) in SMDM_HEADS:
        fields["n_head"] = SMDM_HEADS[int(size.group(1))]
    if "n_head" not in fields:
        raise HarnessError(f"smdm checkpoint '{weights}' needs its model size: keep the release file name "
                           "(mdm-1028M-...), put a json with n_head beside it, or pass config='Diff_LLaMA_1028M'")
    return fields
