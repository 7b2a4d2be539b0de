"""Load released masked-diffusion checkpoints as denoisers (full-attention or block-causal).

``load_denoiser(source)`` reads a local path or a hub id in one of these layouts, one module each:

* ``diffugpt`` (diffusionfamily/diffugpt-s, -m): a GPT-2 body in a PyTorchModelHubMixin wrapper; shifted.
* ``diffullama`` (diffusionfamily/diffullama): a plain Llama-2 directory run bidirectionally; shifted.
* ``smdm`` (nieshen/SMDM): a lit-gpt ``TransEncoder`` state dict; unshifted.
* ``llada`` (GSAI-ML/LLaDA-8B-*): LLaDA's own safetensors and config.json; unshifted.
* ``harness`` (``harness_format``): a Hugging Face causal-LM directory plus ``diffusion_config.json``
  (with ``block_size``: a block-diffusion model).
* ``bd3lm`` (kuleshov-group/bd3lm-owt-block_size4/8/16): BD3-LM's DiT (``dit``); block-causal, unshifted.
* ``sdar`` (JetLM/SDAR-*-Chat): Qwen3, block-causal (block 4), unshifted.
* ``fast_dllm_v2`` (Efficient-Large-Model/Fast_dLLM_v2_*): Qwen2.5, block-causal (``bd_size`` 32), shifted.
* ``dream`` (Dream-org/Dream-v0-*-7B): Qwen2.5, full attention, shifted.
* ``llada2`` (inclusionAI/LLaDA2.x): a MoE loaded into transformers' Glm4Moe; block-causal (32), unshifted.

smdm and llada load into :class:`BidirectionalLM` and bd3lm into the harness's DiT; the others into
transformers classes with weights mapped where needed (``released``). No remote code runs.

Each format module registers its loader with ``@FORMATS.register("name")`` (see ``common``) and
is imported below, which is what registers it: a new format is one new file plus its import line
here (and, to be found without ``format=``, a rule in :func:`detect_format` or a ``HUB_FORMATS``
entry). Formats are listed in import order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from harness.errors import HarnessError
from harness.models.diffusion.attention import FullAttention
from harness.models.diffusion.bidirectional import ROPE_CACHE_DTYPES
from harness.models.diffusion.formats import diffugpt, diffullama, smdm, llada, harness_format, bd3lm  # noqa: F401
from harness.models.diffusion.formats import sdar, fast_dllm_v2, dream, llada2  # noqa: F401
from harness.models.diffusion.formats.common import (FORMATS, local_path, read_json, read_weights,
                                                     repo_id, weight_files)
from harness.models.loading import torch_dtype

__all__ = ["FORMATS", "HUB_FORMATS", "Denoiser", "FullAttention", "detect_format", "load_denoiser"]

HUB_FORMATS = {
    "diffusionfamily/diffugpt-s": "diffugpt", "diffusionfamily/diffugpt-m": "diffugpt",
    "diffusionfamily/diffullama": "diffullama", "nieshen/smdm": "smdm",
    "gsai-ml/llada-8b-base": "llada", "gsai-ml/llada-8b-instruct": "llada",
    "kuleshov-group/bd3lm-owt-block_size4": "bd3lm", "kuleshov-group/bd3lm-owt-block_size8": "bd3lm",
    "kuleshov-group/bd3lm-owt-block_size16": "bd3lm",
    "jetlm/sdar-1.7b-chat": "sdar", "jetlm/sdar-4b-chat": "sdar", "jetlm/sdar-8b-chat": "sdar",
    "efficient-large-model/fast_dllm_v2_1.5b": "fast_dllm_v2", "efficient-large-model/fast_dllm_v2_7b": "fast_dllm_v2",
    "dream-org/dream-v0-base-7b": "dream", "dream-org/dream-v0-instruct-7b": "dream",
    "inclusionai/llada2.0-mini": "llada2", "inclusionai/llada2.0-flash": "llada2",
    "inclusionai/llada2.1-mini": "llada2", "inclusionai/llada2.1-flash": "llada2",
}


@dataclass
class Denoiser:
    model: nn.Module  # forward(input_ids [B,N], attention_mask [B,N]) -> logits [B,N,V]; full or block-causal attention
    tokenizer: Any
    mask_id: int
    shifted: bool  # True: logits at position i predict token i+1
    format: str
    source: str
    max_length: int
    settings: dict[str, Any] = field(default_factory=dict)  # load-time options that change the numbers

    @property
    def block_size(self) -> int | None:
        """A block-diffusion model's block size (block-causal attention); None for full attention."""
        return getattr(self.model, "block_size", None)


def load_denoiser(source: str, format: str | None = None, *, dtype: str = "float32", device: str = "cpu",
                  mask_id: int | None = None, tokenizer: str | None = None,
                  config: str | dict | None = None, rope_cache_dtype: str | None = None) -> Denoiser:
    """Load ``source`` (path or hub id) as a :class:`Denoiser`; ``format`` None: :func:`detect_format`.

    ``config`` gives the architecture where the weights do not (smdm): a name such as
    ``Diff_LLaMA_1028M``, a dict of lit-gpt fields, or a json file; ``tokenizer`` overrides the
    checkpoint's tokenizer and ``mask_id`` its mask token. ``rope_cache_dtype="bfloat16"`` (smdm
    only) rounds the rotary tables to bfloat16 as SMDM's own code does.
    """
    fmt = format or (None if Path(source).expanduser().exists() else HUB_FORMATS.get(repo_id(source)))
    if fmt is not None:
        FORMATS.get(fmt)  # an unknown name fails here, before any download
    path = local_path(source)
    fmt = fmt or detect_format(path)
    settings = {"rope_cache_dtype": rope_cache_dtype} if rope_cache_dtype is not None else {}
    if settings and (fmt != "smdm" or rope_cache_dtype not in ROPE_CACHE_DTYPES):
        raise HarnessError(f"rope_cache_dtype must be one of {', '.join(ROPE_CACHE_DTYPES)} and applies to smdm "
                           f"checkpoints only (got {rope_cache_dtype!r} for a {fmt} checkpoint)")
    model, tok, default_mask, shifted, max_length = FORMATS.get(fmt)(
        path, dtype=torch_dtype(dtype), tokenizer=tokenizer, config=config, **settings)
    mask = mask_id if mask_id is not None else default_mask
    if mask is None:
        raise HarnessError(f"{fmt} checkpoint '{source}' names no mask token; pass mask_id")
    rows = _embedding(model).num_embeddings
    if not 0 <= mask < rows:
        raise HarnessError(f"mask id {mask} is outside the {rows}-token embedding of '{source}'")
    model.to(device).eval()
    return Denoiser(model, tok, int(mask), shifted, fmt, source, int(max_length), settings)


def detect_format(path: str | Path) -> str:
    """The format of a local checkpoint from its files and weight names (or of a known hub id)."""
    path = Path(path).expanduser()
    if not path.exists():
        if repo_id(str(path)) in HUB_FORMATS:
            return HUB_FORMATS[repo_id(str(path))]
        raise HarnessError(f"checkpoint '{path}' does not exist")
    if path.is_dir() and (path / "diffusion_config.json").exists():
        return "harness"
    config = read_json(path / "config.json") if path.is_dir() else {}
    if config.get("model_type") == "llada" or "LLaDAModelLM" in config.get("architectures", []):
        return "llada"
    for fmt, module in (("sdar", sdar), ("fast_dllm_v2", fast_dllm_v2), ("dream", dream), ("llada2", llada2)):
        named = set(config.get("architectures") or ()) & set(module.ARCHITECTURES)
        if config.get("model_type") in module.MODEL_TYPES or named:  # SDAR, Fast-dLLM v2, Dream, LLaDA 2.x
            return fmt
    if config.get("model_type") == "bd3lm" or "BD3LM" in config.get("architectures", []):
        return "bd3lm"
    if config.get("model_type") == "llama":
        if "diffullama" in str(path.resolve()).lower():
            return "diffullama"
        raise HarnessError(f"'{path}' is a plain Llama checkpoint: pass format='diffullama' if it is "
                           "DiffuLLaMA, or add diffusion_config.json for a harness checkpoint")
    keys = set(read_weights(weight_files(path), keys_only=True))
    if any(k.startswith("denoise_model.") for k in keys):
        return "diffugpt"
    if any(k.startswith("model.transformer.blocks.") for k in keys):
        return "llada"
    if any(re.fullmatch(r"transformer\.h\.\d+\.attn\.attn\.weight", k) for k in keys):
        return "smdm"
    if "backbone.blocks.0.attn_qkv.weight" in keys and config.get("model_type") in (None, "bd3lm"):
        return "bd3lm"  # BD3-LM's DiT weight names (MDLM shares them: its config says model_type mdlm)
    raise HarnessError(f"cannot tell the checkpoint format of '{path}'; pass format= one of "
                       f"{', '.join(FORMATS)}")


def _embedding(model: nn.Module) -> nn.Embedding:
    return model.lm.get_input_embeddings() if isinstance(model, FullAttention) else model.embed
