"""Rotary position embedding with a position warp.

Pair k of each head (dimensions k and k + d/2, the half-split layout that
transformers uses) is rotated by theta = omega_k * f(i), omega_k =
base^(-2k/d). Angles are computed in float32 and cast afterwards: in bf16 a
large position visibly moves the logits.
"""

from __future__ import annotations

import torch

from .base import PositionEncoding
from .warps import get_warp


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def inverse_frequencies(dim: int, base: float = 10000.0) -> torch.Tensor:
    """omega_k = base^(-2k/d) for k = 0 .. d/2 - 1."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)


class Rotary(PositionEncoding):
    """RoPE on each head's query and key, with angle omega_k * warp(i)."""

    def __init__(self, head_dim: int, base: float = 10000.0, warp: str = "linear"):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dimension, got {head_dim}")
        self.head_dim, self.base, self.warp_name = head_dim, base, warp
        self.warp = get_warp(warp)
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, base), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin of shape (B, 1, T, head_dim), computed in float32."""
        theta = self.warp(positions.float().clamp_min(0))[..., None] * self.inv_freq
        theta = torch.cat((theta, theta), dim=-1).unsqueeze(1)
        return theta.cos().to(dtype), theta.sin().to(dtype)

    def rotate(self, q, k, q_pos, k_pos):
        cos_k, sin_k = self.cos_sin(k_pos, k.dtype)
        if q_pos.shape[-1] == k_pos.shape[-1] and q_pos is k_pos:
            cos_q, sin_q = cos_k, sin_k
        else:
            cos_q, sin_q = self.cos_sin(q_pos, q.dtype)
        return apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}, warp={self.warp_name}"
