"""What every sampler shares: the request and output types, the registry, the canvas and the
proposal and scheduling helpers.

A sampler is registered as ``@SAMPLERS.register("name")`` and called as
``sample(denoise, requests, *, mask_id, seed, **settings) -> SampleOutput``; the backend passes it
the settings its signature names. The block samplers (``llada``, ``threshold``,
``entropy_bounded``) also take ``eos_id`` and ``eot_id`` (the tokenizer's EOS and end-of-turn ids),
the EOS options of ``EosOptions`` and ``aligned_blocks`` (the backend sets it for block-diffusion
models: blocks then start at the sequence's first token, as the model's own, see ``block_bounds``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

from harness.models.diffusion.estimators import Denoiser, guided_logprobs, right_pad, seeded_generator
from harness.models.diffusion.estimators.scoring import logits_at, span_positions
from harness.registry import Registry


class FillRequest(NamedTuple):
    """Fill ``n_tokens`` masked positions between ``prefix_ids`` and ``suffix_ids``."""

    prefix_ids: Sequence[int]
    n_tokens: int
    suffix_ids: Sequence[int] = ()
    key: str = ""


@dataclass(frozen=True)
class SampleOutput:
    tokens: list[list[int]]  # the fill region of each request
    nfe: int
    steps: int


SAMPLERS: Registry[Callable[..., SampleOutput]] = Registry("sampler", ordered=True)


# One scheduled step of a row: reveal ``count`` tokens among fill positions [start, stop).
class Step(NamedTuple):
    start: int
    stop: int
    count: int


class Canvas:
    """The right-padded canvases of a batch, which fill positions are still masked, and the calls."""

    def __init__(self, requests: Sequence[FillRequest], mask_id: int, seed: int,
                 block_length: int | None = None, aligned_blocks: bool = False) -> None:
        self.mask_id, self.block_length = mask_id, block_length
        self.starts = [len(r.prefix_ids) for r in requests]
        # aligned: blocks start at the sequence's first token (a block model's), not at the fill's
        self.offsets = [start % block_length if aligned_blocks and block_length else 0 for start in self.starts]
        self.sizes = [r.n_tokens for r in requests]
        self.keys = [r.key or str(row) for row, r in enumerate(requests)]
        self.seed = seed
        self.ids, self.attention = right_pad(
            [list(r.prefix_ids) + [mask_id] * r.n_tokens + list(r.suffix_ids) for r in requests], mask_id
        )
        self.masked = [torch.ones(n, dtype=torch.bool) for n in self.sizes]
        self.generators: list[torch.Generator] = []
        self.calls = 0

    def region(self, row: int) -> slice:
        return slice(self.starts[row], self.starts[row] + self.sizes[row])

    def logprobs(self, denoise: Denoiser, cfg_scale: float, rows: Sequence[int], propose_mask: bool = False,
                 by_block: bool = False) -> dict[int, torch.Tensor]:
        """One denoiser call on the whole batch; for each of ``rows``, guided float32 log-probs
        [n, V] over its fill region, or with ``by_block`` over its current block (``block``) alone,
        the mask token's probability moved to the others (unless ``propose_mask``). The head runs
        only at the positions read."""
        ids, attention = self.ids, self.attention
        if cfg_scale:
            uncond = torch.full_like(ids, self.mask_id)
            for row in range(len(self.sizes)):
                uncond[row, self.region(row)] = ids[row, self.region(row)]
            ids, attention = torch.cat([ids, uncond]), torch.cat([attention, attention])
        reads = [self.block(row) if by_block else (0, self.sizes[row]) for row in range(len(self.sizes))]
        spans = [(self.starts[row] + lo, self.starts[row] + hi) for row, (lo, hi) in enumerate(reads)]
        logits = logits_at(denoise, ids, attention, span_positions(spans * (2 if cfg_scale else 1)))
        self.calls += 1
        if not self.generators:
            self.generators = [seeded_generator(self.seed, key, logits.device) for key in self.keys]
        batch, logps = len(self.sizes), {}
        for row in rows:
            width = slice(0, reads[row][1] - reads[row][0])
            uncond = logits[row + batch, width] if cfg_scale else None
            logp = guided_logprobs(logits[row, width], uncond, cfg_scale)
            if not propose_mask and self.mask_id < logp.shape[-1]:  # never propose the mask token
                logp = logp.index_fill(-1, torch.tensor([self.mask_id], device=logp.device), -torch.inf)
                logp = logp.log_softmax(-1)
            logps[row] = logp
        return logps

    def block(self, row: int) -> tuple[int, int]:
        """The row's current fill block: the one holding its first masked position (its last block
        once nothing is masked). Without ``block_length`` the whole fill region."""
        bounds = block_bounds(self.sizes[row], self.block_length, self.offsets[row])
        if not self.masked[row].any():
            return bounds[-1] if self.sizes[row] else (0, 0)
        return current_block(self.masked[row], self.block_length, self.offsets[row])

    def reveal(self, row: int, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """Write ``tokens`` at fill ``positions`` (indices into the row's fill region)."""
        positions = positions.cpu()
        self.ids[row, self.starts[row] + positions] = tokens.cpu()
        self.masked[row][positions] = False

    def output(self, cfg_scale: float) -> SampleOutput:
        tokens = [self.ids[row, self.region(row)].tolist() for row in range(len(self.sizes))]
        return SampleOutput(tokens, nfe=self.calls * (2 if cfg_scale else 1), steps=self.calls)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal counts, the remainder going to the first parts (LLaDA)."""
    base, extra = divmod(total, max(parts, 1))
    return [base + 1 if part < extra else base for part in range(parts)]


def block_bounds(n_tokens: int, block_length: int | None, offset: int = 0) -> list[tuple[int, int]]:
    """The fill's blocks [start, stop): ``block_length`` each (default one block). ``offset``: the
    fill's position within its first block (a block model's blocks start at the sequence's first
    token, so after a prompt of p tokens the first block of the fill has block_length - p % block_length)."""
    length = block_length or max(n_tokens, 1)
    first = length - offset % length if block_length else length
    edges = [0] + list(range(first, n_tokens, length))
    return [(start, min(stop, n_tokens)) for start, stop in zip(edges, edges[1:] + [n_tokens]) if start < n_tokens]


def sample_tokens(
    logp: torch.Tensor, gen: torch.Generator, *, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from softmax(logp / temperature) cut to its top-p nucleus (argmax at temperature 0).
    Returns the tokens and the model's probability of each."""
    if temperature == 0:
        tokens = logp.argmax(-1)
    else:
        probs = (logp / temperature).softmax(-1)
        if top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1).exp()


def current_block(masked: torch.Tensor, block_length: int | None, offset: int = 0) -> tuple[int, int]:
    """The fill block [start, stop) of a row's first still-masked position (a row with something masked)."""
    first = int(masked.nonzero()[0])
    return next((lo, hi) for lo, hi in block_bounds(len(masked), block_length, offset) if hi > first)


DEMOTED = -2.0  # added to a demoted proposal's confidence in [0, 1]: below every other one


@dataclass(frozen=True)
class EosOptions:
    """What the block samplers do with EOS (all off by default: the plain samplers).

    * ``stop`` (``eos_stop``): once a row's completed blocks hold ``eos_id``, its remaining
      positions become EOS and it takes no further steps; a call runs while any row has work.
      With a single block (no ``block_length``) nothing is left to skip.
    * ``ban`` (``logits_eos_inf``, LLaDA's instruct option): EOS is never proposed (its
      probability is spread over the others, as for the mask token).
    * ``last`` (``confidence_eos_eot_inf``, LLaDA's instruct option): a proposed EOS or EOT ranks
      below every other proposal of its block (its confidence counts as -inf: it never passes a
      threshold or a factor test, and an entropy bound counts its entropy as +inf); among
      themselves such proposals keep their order.
    """

    eos_id: int | None = None
    eot_id: int | None = None
    stop: bool = False
    ban: bool = False
    last: bool = False
    ids: tuple[int, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if (self.stop or self.ban) and self.eos_id is None:
            raise ValueError("eos_stop and logits_eos_inf need the tokenizer's eos_id")
        ids = tuple(i for i in (self.eos_id, self.eot_id) if i is not None) if self.last else ()
        if self.last and not ids:
            raise ValueError("confidence_eos_eot_inf needs eos_id or eot_id")
        object.__setattr__(self, "ids", ids)

    def proposable(self, logp: torch.Tensor) -> torch.Tensor:
        """Log-probs [n, V] with EOS removed and renormalised when ``ban`` (else as they are)."""
        if not self.ban or self.eos_id >= logp.shape[-1]:
            return logp
        return logp.index_fill(-1, torch.tensor([self.eos_id], device=logp.device), -torch.inf).log_softmax(-1)

    def demoted(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which proposals rank last (``last``: the EOS and EOT ones)."""
        if not self.ids:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, torch.tensor(self.ids, device=tokens.device))

    def rank(self, tokens: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """Confidences in [0, 1] with the demoted proposals moved below all others (``DEMOTED``)."""
        return confidence + DEMOTED * self.demoted(tokens).to(confidence.dtype) if self.ids else confidence


def stop_at_eos(canvas: Canvas, eos: EosOptions) -> None:
    """``eos.stop``: fill every still-masked position of a row whose completed blocks hold EOS with EOS."""
    if not eos.stop:
        return
    for row, masked in enumerate(canvas.masked):
        if not masked.any():
            continue
        done = canvas.block(row)[0]
        if (canvas.ids[row, canvas.starts[row]:canvas.starts[row] + done] == eos.eos_id).any():
            rest = masked.nonzero().squeeze(-1)
            canvas.reveal(row, rest, torch.full_like(rest, eos.eos_id))


# Picks, for one row, what its current block reveals: from its log-probs [n, V] (EOS options
# applied), which of the block's positions are still masked [n] and its generator, the positions
# (indices into the block) and their tokens.
BlockChoice = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def decode_adaptively(denoise: Denoiser, canvas: Canvas, eos: EosOptions, cfg_scale: float,
                      choose: BlockChoice) -> SampleOutput:
    """The loop of the adaptive block samplers (``threshold``, ``entropy_bounded``): one denoiser
    call while any row has masked positions, read at each row's current block; each row reveals what
    ``choose`` picks; then ``stop_at_eos``. At most n_tokens steps per row."""
    while active := [row for row, masked in enumerate(canvas.masked) if masked.any()]:
        logps = canvas.logprobs(denoise, cfg_scale, active, by_block=True)
        for row in active:
            start, stop = canvas.block(row)
            positions, tokens = choose(eos.proposable(logps[row]), canvas.masked[row][start:stop],
                                       canvas.generators[row])
            canvas.reveal(row, start + positions, tokens)
        stop_at_eos(canvas, eos)
    return canvas.output(cfg_scale)
