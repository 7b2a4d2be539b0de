"""Scoring masked rows: batch them through the denoiser, with optional classifier-free guidance,
and read off each true token's log-prob and whether it is the argmax."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from harness.models.diffusion.estimators.common import Denoiser


class Row(NamedTuple):
    context_ids: Sequence[int]
    continuation_ids: Sequence[int]
    masked: torch.Tensor  # bool [L]


def guided_logprobs(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None, cfg_scale: float
) -> torch.Tensor:
    """Float32 log-probs; with an unconditional pass, SMDM's guidance
    log_softmax((1 + w) * logp_cond - w * logp_uncond)."""
    cond = cond_logits.float().log_softmax(-1)
    if uncond_logits is None:
        return cond
    uncond = uncond_logits.float().log_softmax(-1)
    return ((1 + cfg_scale) * cond - cfg_scale * uncond).log_softmax(-1)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack id lists into (input_ids, attention_mask), right-padded with ``pad_id``."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    return ids, attention


def span_positions(spans: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """LongTensor [B, P]: row b's positions start_b .. stop_b - 1, padded by repeating its last one."""
    width = max(max(stop - start for start, stop in spans), 1)
    rows = [list(range(start, stop)) or [start] for start, stop in spans]
    return torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def logits_at(denoise: Denoiser, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """Logits [B, P, V] at ``positions`` [B, P] only. A denoiser that takes ``positions`` applies
    its head there alone (the head never runs where nothing is read); any other callable is run
    whole and its logits gathered, with the same values."""
    if getattr(denoise, "takes_positions", False):
        return denoise(input_ids, attention_mask, positions=positions)
    logits = denoise(input_ids, attention_mask)
    index = positions.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index)


def score_rows(
    denoise: Denoiser, rows: Sequence[Row], *, mask_id: int, batch_size: int, cfg_scale: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: float64 log-prob of each true continuation token, and whether it is the argmax.

    Rows go through the model longest first, ``batch_size`` model rows per call; with guidance a
    row's unconditional copy (context replaced by ``mask_id``) shares its call.
    """
    copies = 2 if cfg_scale else 1
    per_call = max(1, batch_size // copies)
    lengths = [len(row.context_ids) + len(row.continuation_ids) for row in rows]
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for r, row in enumerate(rows):  # a row that masks nothing needs no model call: its value is 0
        if not row.masked.any():
            n = len(row.continuation_ids)
            results[r] = (torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.bool))
    order = sorted((r for r in range(len(rows)) if r not in results), key=lambda r: -lengths[r])
    for start in range(0, len(order), per_call):
        chunk = [rows[r] for r in order[start : start + per_call]]
        continuations = [
            [mask_id if hidden else token for token, hidden in zip(row.continuation_ids, row.masked.tolist())]
            for row in chunk
        ]
        inputs = [list(row.context_ids) + cont for row, cont in zip(chunk, continuations)]
        if cfg_scale:
            inputs += [[mask_id] * len(row.context_ids) + cont for row, cont in zip(chunk, continuations)]
        spans = [(len(row.context_ids), len(row.context_ids) + len(row.continuation_ids)) for row in chunk]
        logits = logits_at(denoise, *right_pad(inputs, mask_id), span_positions(spans * copies))
        for j, (r, row) in enumerate(zip(order[start : start + per_call], chunk)):
            span = slice(0, len(row.continuation_ids))
            uncond = logits[j + len(chunk), span] if cfg_scale else None
            logp = guided_logprobs(logits[j, span], uncond, cfg_scale)
            target = torch.as_tensor(row.continuation_ids, dtype=torch.long, device=logp.device)
            token_logp = logp.gather(1, target[:, None]).squeeze(1)
            results[r] = (token_logp.double().cpu(), (logp.argmax(-1) == target).cpu())
    return [results[r] for r in range(len(rows))]
