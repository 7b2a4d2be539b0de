"""Load released masked-diffusion checkpoints as denoisers (full-attention or block-causal).

``load_denoiser(source)`` reads a local path or a hub id in one of these layouts, one module each:

* ``diffugpt`` (diffusionfamily/diffugpt-s, -m): a GPT-2 body in a PyTorchModelHubMixin wrapper; shifted.
* ``diffullama`` (diffusionfamily/diffullama): a plain Llama-2 directory run bidirectionally; shifted.
* ``smdm`` (nieshen/SMDM): a lit-gpt ``TransEncoder`` state dict; unshifted.
* ``llada`` (GSAI-ML/LLaDA-8B-*): LLaDA's own safetensors and config.json; unshifted.
* ``harness`` (``harness_format``): a Hugging Face causal-LM directory plus ``diffusion_config.json``.

smdm and llada load into :class:`BidirectionalLM`, so no remote code runs.

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
from harness.models.diffusion.formats import diffugpt, diffullama, smdm, llada, harness_format  # noqa: F401
from harness.models.diffusion.formats.common import (FORMATS, local_path, read_json, read_weights,
                                                     repo_id, weight_files)
from harness.models.loading import torch_dtype

__all__ = ["FORMATS", "HUB_FORMATS", "Denoiser", "FullAttention", "detect_format", "load_denoiser"]

HUB_FORMATS = {
    "diffusionfamily/diffugpt-s": "diffugpt", "diffusionfamily/diffugpt-m": "diffugpt",
    "diffusionfamily/diffullama": "diffullama", "nieshen/smdm": "smdm",
    "gsai-ml/llada-8b-base": "llada", "gsai-ml/llada-8b-instruct": "llada",
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
    raise HarnessError(f"cannot tell the checkpoint format of '{path}'; pass format= one of "
                       f"{', '.join(FORMATS)}")


def _embedding(model: nn.Module) -> nn.Embedding:
    return model.lm.get_input_embeddings() if isinstance(model, FullAttention) else model.embed
