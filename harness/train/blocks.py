"""The block-diffusion recipe (BD3-LM, SDAR, Fast-dLLM v2): ``--block-size B``.

A sequence of N positions is cut into blocks of B positions from position 0. Each block b of each
sequence draws its own masking rate t_b ~ U(min_t, 1) (BD3-LM's per-block noise; ``stratified_t``
spreads the rates of all blocks of the global batch over strata) and masks each unprotected token of
the block with probability t_b; the loss is the sum over masked tokens of CE / t_b, normalised as in
the full-attention recipe.

Block b's noisy tokens must see the clean blocks before b and their own noisy block. All blocks are
trained in one pass with the vectorised 2L layout of BD3-LM / Fast-dLLM v2: the input is
``[x_t ; x_0]`` (2N tokens) with position ids ``[0..N-1, 0..N-1]`` and a 4-D mask in which

* a noisy query of block b sees the noisy keys of block b and the clean keys of blocks < b;
* a clean query of block b sees the clean keys of blocks <= b (block-causal, exactly
  ``harness.models.diffusion.attention.block_causal``, the attention of inference's ``BlockCausal``).

Read rule (which output predicts token i): unshifted, the noisy stream at i. Shifted (AR-adapted),
the output at i - 1: in the noisy stream, except for the first token of a block b > 0, whose i - 1
is the last token of block b - 1, clean at inference: that one is read from the clean stream (as
Fast-dLLM v2 does). So training sees exactly what the block sampler and the block ELBO see.
There is no attention annealing in this recipe: attention is block-causal from step 0.
"""
from __future__ import annotations

import inspect

import torch

from harness.models.diffusion.attention import block_causal
from harness.train.objective import sample_noise


def sample_block_noise(gen: torch.Generator, n: int, seq_len: int, block_size: int, min_t: float,
                       stratified: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token masking rates [n, N] (one t per block, repeated over its B positions) and u [n, N].

    The draw is :func:`sample_noise` over the n * N/B blocks as if each were a sequence of B tokens,
    so with B = N it is the full-attention recipe's draw exactly.
    """
    blocks = seq_len // block_size
    t, u = sample_noise(gen, n * blocks, block_size, min_t, stratified)
    return t.view(n, blocks).repeat_interleave(block_size, dim=1), u.reshape(n, seq_len)


def two_stream_allowed(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [2N, 2N]: which key each query of ``[x_t ; x_0]`` sees (rows and columns: noisy, then clean)."""
    clean = block_causal(torch.ones(1, seq_len, dtype=torch.bool, device=device), block_size)[0, 0]
    same_block = clean & clean.T
    earlier = clean & ~same_block
    noisy_rows = torch.cat([same_block, earlier], dim=1)
    clean_rows = torch.cat([torch.zeros_like(clean), clean], dim=1)
    return torch.cat([noisy_rows, clean_rows], dim=0)


def two_stream_mask(seq_len: int, block_size: int, batch: int, dtype: torch.dtype,
                    device: torch.device | str) -> torch.Tensor:
    """Additive [batch, 1, 2N, 2N] mask of :func:`two_stream_allowed`: 0 attends, ``finfo(dtype).min`` blocks."""
    allowed = two_stream_allowed(seq_len, block_size, device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None].expand(batch, 1, -1, -1)


def two_stream_positions(seq_len: int, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position ids [batch, 2N]: ``0..N-1`` for the noisy stream and again for the clean one."""
    return torch.arange(seq_len, device=device).repeat(2)[None].expand(batch, -1)


def read_index(seq_len: int, block_size: int, shift: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N]: index into the 2N outputs of ``[x_t ; x_0]`` of the logits that predict token i.

    Unshifted: i (noisy stream). Shifted: i - 1 in the noisy stream, or N + i - 1 (the clean stream)
    when i opens a block b > 0. Token 0 has no prediction when shifted (it is never masked); its
    entry points at 0 and is never read into the loss.
    """
    i = torch.arange(seq_len, device=device)
    if not shift:
        return i
    before = (i - 1).clamp(min=0)
    opens_block = (i % block_size == 0) & (i > 0)
    return torch.where(opens_block, seq_len + before, before)


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether a transformers causal LM's forward applies the head at given positions only."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def two_stream_logits(model: torch.nn.Module, noisy: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor,
                      read: torch.Tensor, keep_logits: bool = True) -> torch.Tensor:
    """Aligned logits [b, N, V] (row i predicts token i, see :func:`read_index`) of one 2L pass.

    ``keep_logits``: pass ``read`` as ``logits_to_keep`` so the LM head runs only on the N rows that
    are read, not on all 2N (same numbers, less compute and memory); else gather after the head.
    """
    batch, seq_len = noisy.shape
    inputs = dict(input_ids=torch.cat([noisy, clean], dim=1), attention_mask=mask,
                  position_ids=two_stream_positions(seq_len, batch, noisy.device), use_cache=False)
    if keep_logits:
        return model(**inputs, logits_to_keep=read).logits
    return model(**inputs).logits[:, read]
