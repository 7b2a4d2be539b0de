"""The attention wrappers that run a transformers causal LM as a denoiser.

* :class:`FullAttention`: every real token sees every other (the masked DLMs of 2024: DiffuGPT,
  DiffuLLaMA, and the harness's own full-attention checkpoints).
* :class:`BlockCausal`: block diffusion (BD3-LM, SDAR, Fast-dLLM v2, LLaDA 2.x): the sequence is cut
  into blocks of ``block_size`` positions from its first token; a query sees every real key of its
  own block and of the blocks before it, never a later one. So a finished block's keys and values
  never change once it is clean: a cache of them is exact (``harness.models.diffusion.cache``), and
  the likelihood of a block given the clean blocks before it needs no pass over anything after it
  (``estimators.blockwise``).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from harness.errors import HarnessError


class FullAttention(nn.Module):
    """Run a transformers causal LM with full attention and return plain logits.

    A 4-D additive mask [B,1,N,N] (0 for real keys, the dtype's minimum for padding keys) replaces
    the causal mask; real tokens take positions 0, 1, ... whichever side the padding is on.
    """

    takes_positions = True  # forward(..., positions=[B, P]) applies the head at those positions only

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def allowed(self, keep: torch.Tensor) -> torch.Tensor:
        """Which keys each query sees, bool [B, 1, N, N], from the real-token mask ``keep`` [B, N]: every real one."""
        n = keep.shape[1]
        return keep[:, None, None, :].expand(-1, 1, n, n)

    def bias(self, keep: torch.Tensor) -> torch.Tensor:
        """The additive 4-D attention mask of :meth:`allowed` (0 where seen, the dtype's minimum elsewhere)."""
        allowed, dtype = self.allowed(keep), self.lm.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=keep.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, *, return_kv: bool = False, cache: tuple | None = None):
        """Logits [B, N, V] (or [B, P, V] at ``positions``). ``return_kv``: also every layer's keys and
        values (``forward_kv``); ``cache``: a cached pass of query ids (``forward_cached``). One
        entry point, so that hooks on this module see every pass."""
        if cache is not None:
            return self.forward_cached(*cache[:2], input_ids, *cache[2:4], positions, return_kv=return_kv)
        if return_kv:
            return self.forward_kv(input_ids, attention_mask, positions)
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        bias, position_ids = self.bias(keep), (keep.long().cumsum(-1) - 1).clamp(min=0)
        if positions is None:
            return self.lm(input_ids=input_ids, attention_mask=bias, position_ids=position_ids, use_cache=False).logits
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=bias, position_ids=position_ids,
                                    use_cache=False).last_hidden_state
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.lm.get_output_embeddings()(picked)

    def forward_kv(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """A full pass: logits at ``positions`` and every layer's keys and values [B, H, N, D]."""
        keep = attention_mask.bool()
        bias, position_ids = self.bias(keep), (keep.long().cumsum(-1) - 1).clamp(min=0)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=bias, position_ids=position_ids, use_cache=True)
        hidden = out.last_hidden_state.gather(1, positions[..., None].expand(-1, -1, out.last_hidden_state.shape[-1]))
        cache = getattr(out, "cache", None) or out.past_key_values  # its name before transformers 5.2x
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return self.lm.get_output_embeddings()(hidden), kv

    def forward_cached(self, kv: list[tuple[torch.Tensor, torch.Tensor]], key_keep: torch.Tensor,
                       query_ids: torch.Tensor, query_positions: torch.Tensor, query_keep: torch.Tensor,
                       read: torch.Tensor, return_kv: bool = False):
        """Queries [B, Q] at their position ids attend to the cached keys [B, H, C, D] that
        ``key_keep`` [B, C] marks and to each other: to every query ``query_keep`` [B, Q] marks, or as
        ``query_keep`` [B, Q, Q] allows; logits at query indices ``read``. ``return_kv``: also the
        queries' own keys and values per layer [B, H, Q, D]."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for index, (keys, values) in enumerate(kv):
            cache.update(keys, values, index)
        dtype, q = self.lm.dtype, query_ids.shape[1]
        among = query_keep if query_keep.dim() == 3 else query_keep[:, None, :].expand(-1, q, -1)
        allowed = torch.cat([key_keep[:, None, :].expand(-1, q, -1), among], dim=2)[:, None].clone()
        allowed[..., 0] |= ~allowed.any(-1)  # a row with no key at all still looks at one
        bias = torch.zeros(allowed.shape, dtype=dtype, device=query_ids.device).masked_fill(~allowed,
                                                                                            torch.finfo(dtype).min)
        hidden = self.lm.base_model(input_ids=query_ids, attention_mask=bias, position_ids=query_positions,
                                    use_cache=True, **{cache_argument(self.lm.base_model): cache}).last_hidden_state
        picked = hidden.gather(1, read[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.lm.get_output_embeddings()(picked)
        if not return_kv:
            return logits
        width = kv[0][0].shape[2]
        return logits, [(layer.keys[:, :, width:], layer.values[:, :, width:]) for layer in cache.layers]


def cache_argument(model: nn.Module) -> str:
    """The name of a transformers model's cache argument: ``cache`` from 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def block_causal(keep: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool [B, 1, N, N]: query i sees real key j when j // block_size <= i // block_size."""
    n = keep.shape[1]
    blocks = torch.arange(n, device=keep.device) // block_size
    return keep[:, None, None, :] & (blocks[None, :] <= blocks[:, None])[None, None]


class BlockCausal(FullAttention):
    """A transformers causal LM run with block-causal attention (see the module docstring)."""

    def __init__(self, lm: nn.Module, block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise HarnessError(f"block_size must be a positive integer, got {block_size!r}")
        super().__init__(lm)
        self.block_size = block_size

    def allowed(self, keep: torch.Tensor) -> torch.Tensor:
        return block_causal(keep, self.block_size)
