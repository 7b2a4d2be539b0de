"""Key/value caches for semi-autoregressive block decoding of full-attention masked DLMs (Fast-dLLM).

``BlockCache`` is a denoiser callable (the samplers' ``denoise(input_ids, attention_mask,
positions)``) that a sampler uses unchanged. Each call finds every row's current block: the block
(of ``block_length`` fill tokens; default the whole fill) that holds its first still-masked position.

* A **full pass** runs over the whole sequence and keeps every layer's keys and values. It happens
  on the first call, whenever a row has moved to a new block, and every ``refresh`` calls.
* A **cached pass** runs only the query positions and lets them attend to the kept keys and
  values of every other real position: with ``prefix`` the queries are the current block and
  everything after it; with ``dual`` the current block alone. For a shifted model the query range
  starts one position earlier, since position i's logits come from the output at i - 1.

For a block-diffusion model (block-causal, ``block_causal``) the block is the model's own block of
``block_size`` positions, the queries are that block alone and the kept keys are the finished blocks
before it. One full pass, over the sequence up to the end of the current blocks, starts the cache;
when a row moves on, one pass over its finished block and its new block (block-causal among them)
adds the finished block's keys and values to the kept ones (``extend``): no position is computed
twice at the same step of its block. Since a finished block never changes and nothing later is
attended to, this ``prefix`` cache is exact (``dual`` is refused); the logits a shifted model reads
just before the block (the first token's) are those of the pass that finished that block.

For full-attention models a cache is an approximation: the kept keys and values were computed
when the block was more masked than it is now. ``refresh=1`` makes every pass a full one, which is
``cache=none`` exactly. Logits asked for outside the queries (positions a sampler does not read in
block decoding) are those of the last full pass.
"""
from __future__ import annotations

from typing import Sequence

import torch

from harness.models.diffusion.samplers.common import FillRequest, block_bounds
from harness.models.settings import CacheSettings


class BlockCache:
    takes_positions = True

    def __init__(self, model, *, shifted: bool, mask_id: int, fills: Sequence[FillRequest],
                 block_length: int | None, settings: CacheSettings) -> None:
        if not hasattr(model, "forward_cached"):
            from harness.errors import HarnessError
            raise HarnessError(f"cache={settings.mode} needs a transformers-backed denoiser; "
                               f"{type(model).__name__} has no cached forward")
        self.model, self.shifted, self.mask_id, self.settings = model, shifted, mask_id, settings
        self.block_size = getattr(model, "block_size", None)  # block-causal: the exact cache below
        if self.block_size and settings.mode == "dual":
            from harness.errors import HarnessError
            raise HarnessError("cache=dual keeps the positions after the block, which a block-diffusion model never "
                               "attends to; its exact cache is cache=prefix")
        self.starts = [len(f.prefix_ids) for f in fills]
        self.bounds = [block_bounds(f.n_tokens, block_length) for f in fills]
        self.kv: list | None = None
        self.blocks: list[tuple[int, int]] | None = None
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last pass's reads and their logits
        self.kept: tuple | None = None  # keys_outside() of the last full pass
        self.since_full = 0
        self.full_passes = self.cached_passes = self.extensions = 0

    def current_blocks(self, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int]]:
        """Per row: absolute [start, stop) of the block holding its first masked fill position (a
        block model's own block of ``block_size`` positions, cut at the row's end)."""
        out = []
        for row in range(ids.shape[0]):
            b = row % len(self.starts)
            start, bounds = self.starts[b], self.bounds[b]
            size = bounds[-1][1] if bounds else 0
            masked = (ids[row, start:start + size] == self.mask_id).nonzero()
            first = int(masked[0]) if len(masked) else max(size - 1, 0)
            if self.block_size:
                lo = (start + first) // self.block_size * self.block_size
                out.append((lo, min(lo + self.block_size, int(mask[row].sum()))))
                continue
            lo, hi = next(((lo, hi) for lo, hi in bounds if hi > first), (0, 0))
            out.append((start + lo, start + hi))
        return out

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids, mask, positions = input_ids.to(device), attention_mask.to(device), positions.to(device)
        read = (positions - 1).clamp(min=0) if self.shifted else positions
        blocks = self.current_blocks(ids, mask)
        refresh = self.settings.refresh
        moved = blocks != self.blocks
        full = (self.settings.mode == "none" or self.kv is None or (moved and not self.block_size)
                or (refresh is not None and self.since_full >= refresh))
        if not full:
            ranges = self.extension_ranges(blocks) if moved else self.query_ranges(mask, blocks)
            full = not bool(self.served(read, ranges).all())  # a read neither computed now nor kept
        if full:
            if self.block_size:  # nothing after the current blocks is ever attended to
                width = max(max(hi for _, hi in blocks), int(read.max()) + 1)
                ids, mask = ids[:, :width], mask[:, :width]
            logits, self.kv = self.model(ids, mask, read, return_kv=True)
            self.blocks, self.last, self.since_full, self.kept = blocks, (read, logits), 1, None
            self.full_passes += 1
            return logits
        self.since_full += 1
        if moved:
            self.extensions += 1
            return self.extend(ids, mask, read, blocks)
        self.cached_passes += 1
        return self.cached(ids, mask, read, blocks)

    def served(self, read: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Which reads [B, P] a pass over the query ``ranges`` can answer: inside them, or kept."""
        lows = torch.tensor([lo for lo, _ in ranges], device=read.device)[:, None]
        highs = torch.tensor([hi for _, hi in ranges], device=read.device)[:, None]
        kept = (read[:, :, None] == self.last[0][:, None, :]).any(-1)
        return ((read >= lows) & (read < highs)) | kept

    def recall(self, read: torch.Tensor) -> torch.Tensor:
        """The kept logits [B, P, V] of an earlier pass at each read's position (where it has one)."""
        kept_read, kept_logits = self.last
        index = (read[:, :, None] == kept_read[:, None, :]).int().argmax(-1)
        return kept_logits.gather(1, index[..., None].expand(-1, -1, kept_logits.shape[-1]))

    def query_ranges(self, mask: torch.Tensor, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if self.block_size:  # the block alone; a shifted model's read before it is the full pass's
            return [(start, max(stop, start + 1)) for start, stop in blocks]
        lengths = mask.sum(1).tolist()
        shift = 1 if self.shifted else 0
        ranges = []
        for (start, stop), length in zip(blocks, lengths):
            lo = max(start - shift, 0)
            hi = length if self.settings.mode == "prefix" else max(min(stop - shift, length), lo + 1)
            ranges.append((lo, max(hi, lo + 1)))
        return ranges

    def cached(self, ids: torch.Tensor, mask: torch.Tensor, read: torch.Tensor,
               blocks: list[tuple[int, int]]) -> torch.Tensor:
        """A cached pass (see the module docstring); reads outside the queries keep the last full pass's logits."""
        if self.kept is None:
            self.kept = self.keys_outside(mask, blocks)
        kv, key_keep, lows, highs, query_idx, query_keep = self.kept
        inside = (read >= lows[:, None]) & (read < highs[:, None])
        local = (read - lows[:, None]).clamp(min=0).minimum(highs[:, None] - lows[:, None] - 1)
        fresh = self.model(ids.gather(1, query_idx), None, local, cache=(kv, key_keep, query_idx, query_keep))
        return self.merge(read, inside, fresh)

    def merge(self, read: torch.Tensor, inside: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """Fresh logits inside the queries, kept ones elsewhere; what is returned is kept for later."""
        if bool(inside.all()):
            logits = fresh
        else:
            logits = torch.where(inside[..., None], fresh, self.recall(read))
        self.last = (read, logits)
        return logits

    def keys_outside(self, mask: torch.Tensor, blocks: list[tuple[int, int]]) -> tuple:
        """For the blocks of the last full pass: the kept keys and values of every real position
        outside the queries (packed to the left, ``key_keep`` marking them), and the query ranges.
        Computed once per full pass, since neither changes until the next one."""
        device = mask.device
        lows, highs, query_idx, query_keep = query_layout(self.query_ranges(mask, blocks), device)
        positions = torch.arange(self.kv[0][0].shape[2], device=device)[None, :]
        mask = mask[:, :positions.shape[1]]
        keyed = mask.bool() & ~((positions >= lows[:, None]) & (positions < highs[:, None]))
        if self.block_size:  # a block model's keys: the finished blocks before the queries, exact
            keyed &= positions < lows[:, None]
        count = int(keyed.sum(1).max())
        order = torch.sort((~keyed).to(torch.int8), dim=1, stable=True).indices[:, :max(count, 1)]
        index = order[:, None, :, None]
        kv = [(k.gather(2, index.expand(-1, k.shape[1], -1, k.shape[3])),
               v.gather(2, index.expand(-1, v.shape[1], -1, v.shape[3]))) for k, v in self.kv]
        return kv, keyed.gather(1, order), lows, highs, query_idx, query_keep

    def extension_ranges(self, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Per row: from the first position not kept (its block at the last pass) to its new block's end."""
        return [(old, max(hi, old + 1)) for (old, _), (_, hi) in zip(self.blocks, blocks)]

    def extend(self, ids: torch.Tensor, mask: torch.Tensor, read: torch.Tensor,
               blocks: list[tuple[int, int]]) -> torch.Tensor:
        """A block model's row moved on: one pass over each row's finished block(s) and its new
        block (block-causal among them) with the kept keys before; the finished blocks' keys and
        values join the kept ones, which stay exact. Reads outside the queries keep earlier logits."""
        if self.kept is None:
            self.kept = self.keys_outside(mask, self.blocks)
        kv, key_keep = self.kept[:2]
        lows, highs, query_idx, query_keep = query_layout(self.extension_ranges(blocks), ids.device)
        block_of = query_idx // self.block_size
        among = query_keep[:, None, :] & (block_of[:, None, :] <= block_of[:, :, None])
        inside = (read >= lows[:, None]) & (read < highs[:, None])
        local = (read - lows[:, None]).clamp(min=0).minimum(highs[:, None] - lows[:, None] - 1)
        fresh, added = self.model(ids.gather(1, query_idx), None, local, cache=(kv, key_keep, query_idx, among),
                                  return_kv=True)
        starts = torch.tensor([start for start, _ in blocks], device=ids.device)
        kv = [(torch.cat([k, new_k], 2), torch.cat([v, new_v], 2)) for (k, v), (new_k, new_v) in zip(kv, added)]
        key_keep = torch.cat([key_keep, query_keep & (query_idx < starts[:, None])], dim=1)
        self.blocks = blocks
        self.kept = (kv, key_keep, *query_layout(self.query_ranges(mask, blocks), ids.device))
        return self.merge(read, inside, fresh)


def query_layout(ranges: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Each row's query range [lo, hi) as (lows, highs, query indices [B, W] padded by repeating the
    last one, which of them are real [B, W])."""
    width = max(hi - lo for lo, hi in ranges)
    offsets = torch.arange(width, device=device)
    lows = torch.tensor([lo for lo, _ in ranges], device=device)
    highs = torch.tensor([hi for _, hi in ranges], device=device)
    query_keep = offsets[None, :] < (highs - lows)[:, None]
    query_idx = torch.minimum(lows[:, None] + offsets[None, :], highs[:, None] - 1)
    return lows, highs, query_idx, query_keep
