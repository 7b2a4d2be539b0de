"""A small Llama-style transformer with full bidirectional attention.

Pre-norm blocks with RMSNorm, GPT-NeoX style (half-split) rotary embeddings, grouped-query
attention through ``scaled_dot_product_attention`` with a key-padding mask, and a SwiGLU MLP.
The smdm and llada loaders map released weights into it, so neither needs remote code.

Rotary tables are float32 by default. ``rope_cache_dtype="bfloat16"`` reproduces SMDM's
``TransEncoder``, which builds cos/sin as position times ``1 / base ** (i / n)`` in float32 and
rounds them to bfloat16 whatever the weights' dtype; its fused rotary kernel then computes
``x1 * cos - x2 * sin`` in float32 on the upcast values and casts to q's dtype, as ``rotate``
does here. (SMDM's scripts also run under bfloat16 autocast; that is not reproduced.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROPE_CACHE_DTYPES = ("bfloat16",)  # besides None (float32)


@dataclass
class BidirectionalConfig:
    vocab_size: int  # embedding rows (may include a mask token the head never predicts)
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    output_size: int | None = None  # head rows; None: vocab_size
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's dimensions that rotate
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_length: int = 2048
    rope_cache_dtype: str | None = None  # None: float32 tables; "bfloat16": SMDM's rounded tables

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg: BidirectionalConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin [B,1,N,rot] at integer ``positions`` [B,N] (see the module docstring)."""
    rot = int(cfg.rope_fraction * cfg.head_dim) // 2 * 2
    steps = torch.arange(0, rot, 2, device=positions.device)
    if cfg.rope_cache_dtype is None:
        inv_freq = cfg.rope_theta ** -(steps.float() / rot)
    else:  # SMDM's build_rope_cache: theta = 1 / (base ** (arange / n)), all float32
        inv_freq = 1.0 / (cfg.rope_theta ** (steps / rot))
    angles = positions[:, None, :, None].float() * inv_freq  # [B,1,N,rot/2]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if cfg.rope_cache_dtype is not None:
        low = getattr(torch, cfg.rope_cache_dtype)
        cos, sin = cos.to(low).float(), sin.to(low).float()  # rounded values, float32 arithmetic
    return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dimensions of x [B,H,N,D], GPT-NeoX half-split style."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half1, half2 = rot.chunk(2, dim=-1)
    rotated = torch.cat((-half2, half1), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: BidirectionalConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=False)
        self.k = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q.float(), cos, sin).type_as(q), rotate(k.float(), cos, sin).type_as(k)  # fp32 rotary
        # Query head h reads key/value head h // (n_heads / n_kv_heads).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: BidirectionalConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: BidirectionalConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, bias)
        return x + self.mlp(self.mlp_norm(x))


class BidirectionalLM(nn.Module):
    """``forward(input_ids [B,N], attention_mask [B,N] 1 real / 0 pad) -> logits [B,N,V]``."""

    def __init__(self, cfg: BidirectionalConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.output_size or cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    takes_positions = True  # forward(..., positions=[B, P]) applies the head at those positions only

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()
        # Real tokens take positions 0, 1, ... whichever side the padding is on.
        position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)
        x = self.embed(input_ids)
        cos, sin = rope_tables(self.config, position_ids)
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        if positions is not None:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(self.norm(x))
