"""The DiT denoiser of BD3-LM (block discrete denoising diffusion, Arriola et al. 2025), with
block-causal attention over one sequence.

The released network (kuleshov-group/bd3lm-owt-block_size*, MDLM's DiT with 12 blocks of width 768):

* a token embedding table and, per block, pre-LayerNorm (weight only, no bias) attention with one
  packed q/k/v projection (no bias), GPT-NeoX style (half-split) rotary embeddings on q and k
  (base 10,000, positions 0, 1, ...), an output projection (no bias) and a GELU (tanh) MLP;
* adaLN: a conditioning vector c = SiLU(MLP(sinusoidal embedding of sigma)) gives each block six
  vectors (shift, scale and gate for attention and for the MLP: x + gate * f(norm(x) * (1 + scale) + shift))
  and the output layer two (shift and scale before the final linear layer, which has a bias);
* ``time_conditioning: false`` in the released configs: sigma is 0 at every call, so c is one
  constant vector and the denoiser sees no noise level, as in BD3-LM's own code.

BD3-LM trains on [x_t, x_0] (twice the length) with a mask that lets the noisy block b see itself
and the clean blocks before it. At inference its sampler runs one sequence of clean earlier blocks
and the noisy current block under the block-causal mask: query i sees key j when
j // block_size <= i // block_size, which is what this module does (``attention.block_causal``), and
what the harness's block ELBO and block-aligned samplers feed it.

The logits follow BD3-LM's SUBS parameterization in its first part: the mask token is never
predicted (its logit is the dtype's minimum). Carry-over of unmasked tokens needs no code: the
harness reads logits at masked positions only.

``forward(..., return_kv=True)`` and ``forward(..., cache=...)`` are the exact prefix cache of
``harness.models.diffusion.cache`` (finished blocks' keys and values, as BD3-LM's KV cache).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.models.diffusion.attention import block_causal
from harness.models.diffusion.bidirectional import rotate

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DiTConfig:
    vocab_size: int  # embedding rows and output rows (the mask token included)
    hidden_size: int
    n_layers: int
    n_heads: int
    cond_dim: int
    block_size: int
    max_length: int = 1024
    mlp_ratio: int = 4
    frequency_dim: int = 256  # sinusoidal embedding of sigma
    rope_theta: float = 10000.0
    mask_id: int | None = None  # never predicted (SUBS); None: no token is suppressed

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] [N, dim] with f_k = max_period ** (-k / (dim / 2)), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([args.cos(), args.sin()], dim=-1)
    return torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1) if dim % 2 else embedding


def inverse_frequencies(head_dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The rotary frequencies [head_dim / 2], float32, computed as the release computes them."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin [B, 1, N, head_dim] at integer ``positions`` [B, N]."""
    angles = positions[:, None, :, None].float() * inverse_frequencies(head_dim, base, positions.device)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, normalised in float32."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],)).to(x.dtype) * self.weight


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.n_heads
        self.norm1 = LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * d, d))
        self.modulation = nn.Linear(cfg.cond_dim, 6 * d)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B, N, d] -> (x, (keys, values) [B, H, N, D] of these N positions). ``past``: cached
        keys and values placed before them; ``allowed`` [B, 1, N, keys] says which each query sees."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        b, n, _ = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.n_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, D]; packed as (three, head, dim)
        q, k = rotate(q.float(), cos, sin).type_as(v), rotate(k.float(), cos, sin).type_as(v)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        x = x + gate1 * self.out(y.transpose(1, 2).reshape(b, n, -1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2)), (k, v)


class DiT(nn.Module):
    """``forward(input_ids [B,N], attention_mask [B,N], positions=None) -> logits`` under
    block-causal attention of ``block_size`` (see the module docstring)."""

    takes_positions = True  # forward(..., positions=[B, P]) applies the output layer at those positions only

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.block_size = cfg.block_size
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.sigma_map = nn.Sequential(nn.Linear(cfg.frequency_dim, cfg.cond_dim), nn.SiLU(),
                                       nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.hidden_size)
        self.final_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def condition(self) -> torch.Tensor:
        """c [1, cond_dim] at sigma = 0 (time_conditioning false): the same for every call."""
        weight = self.sigma_map[0].weight
        sigma = torch.zeros(1, device=weight.device)
        return F.silu(self.sigma_map(timestep_embedding(sigma, self.config.frequency_dim).to(weight.dtype)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, *, return_kv: bool = False, cache: tuple | None = None):
        """Logits [B, N, V] (or [B, P, V] at ``positions``). ``return_kv``: also every block's keys and
        values (``forward_kv``); ``cache``: a cached pass of query ids (``forward_cached``)."""
        if cache is not None:
            return self.forward_cached(*cache[:2], input_ids, *cache[2:4], positions, return_kv=return_kv)
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        logits, kv = self.run(input_ids, keep, positions, return_kv)
        return (logits, kv) if return_kv else logits

    def forward_kv(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, KV]:
        """A full pass: logits at ``positions`` and every block's keys and values [B, H, N, D]."""
        return self.run(input_ids, attention_mask.bool(), positions, True)

    def run(self, input_ids: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor | None,
            keep_kv: bool = False) -> tuple[torch.Tensor, KV]:
        position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)  # real tokens at 0, 1, ...
        cos, sin = rotary_tables(position_ids, self.config.head_dim, self.config.rope_theta)
        allowed = block_causal(keep, self.block_size)
        x, c, kv = self.embed(input_ids), self.condition(), []
        for block in self.blocks:
            x, layer_kv = block(x, c, cos, sin, allowed)
            if keep_kv:
                kv.append(layer_kv)
        if positions is not None:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.output(x, c), kv

    def forward_cached(self, kv: KV, key_keep: torch.Tensor, query_ids: torch.Tensor, query_positions: torch.Tensor,
                       query_keep: torch.Tensor, read: torch.Tensor, return_kv: bool = False):
        """Queries [B, Q] at position ids ``query_positions`` attend to the cached keys [B, H, C, D]
        that ``key_keep`` [B, C] marks and to each other: to every query ``query_keep`` [B, Q] marks,
        or as ``query_keep`` [B, Q, Q] allows; logits at query indices ``read``. ``return_kv``: also
        the queries' own keys and values per block [B, H, Q, D]."""
        q = query_ids.shape[1]
        among = query_keep if query_keep.dim() == 3 else query_keep[:, None, :].expand(-1, q, -1)
        allowed = torch.cat([key_keep[:, None, :].expand(-1, q, -1), among], dim=2)[:, None].clone()
        allowed[..., 0] |= ~allowed.any(-1)  # a row with no key at all still looks at one
        cos, sin = rotary_tables(query_positions, self.config.head_dim, self.config.rope_theta)
        x, c, added = self.embed(query_ids), self.condition(), []
        for block, past in zip(self.blocks, kv):
            x, layer_kv = block(x, c, cos, sin, allowed, past)
            added.append(layer_kv)
        logits = self.output(x.gather(1, read[..., None].expand(-1, -1, x.shape[-1])), c)
        return (logits, added) if return_kv else logits

    def output(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The final adaLN and linear layer; the mask token's logit set to the dtype's minimum."""
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=-1)
        logits = self.head(modulate(self.norm(x), shift, scale))
        mask_id = self.config.mask_id
        if mask_id is not None and 0 <= mask_id < logits.shape[-1]:
            logits[..., mask_id] = torch.finfo(logits.dtype).min
        return logits
