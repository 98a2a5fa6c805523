"""ALiBi: attention with linear biases (Press, Smith and Lewis, ICLR 2022,
"Train Short, Test Long").

No rotation and no position embedding: the score of query i for key j gets
the bias -m_h * (i - j), a penalty linear in the distance with a fixed slope
m_h per head. For n heads, n a power of two, m_h = 2^(-8h/n), h = 1 .. n
(8 heads: 1/2, 1/4, ..., 1/256). Otherwise the reference recipe
(`get_slopes` in ofirpress/attention_with_linear_biases, the same as BLOOM's
`_get_alibi_slopes` in transformers): take the slopes of the closest power of
two below n, then every other slope of twice that power for the remaining
heads. (MPT's variant rounds up and reorders instead; it is not used here.)

i and j are the query's and key's *positions* (`q_pos`, `k_pos`), not their
indices, so a KV cache, chunked prefill and explicit positions all give the
same scores; the bias depends only on i - j, so shifting every position by a
constant changes nothing.

Both attention paths use transformers' own functions: the sdpa path passes
the bias as `position_bias`, which `sdpa_attention_forward` folds with the
causal or boolean mask into one float `attn_mask`; the eager twin adds the
same folded mask to the scores in GPT-2's eager attention and returns the
probabilities.
"""

from __future__ import annotations

import math

import torch
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

from .base import PositionEncoding
from .registry import register_encoding


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start**h for h in range(1, n + 1)]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The published head slopes m_1 .. m_n (float32), reference recipe for any n >= 1."""
    if n_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {n_heads}")
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = _power_of_two_slopes(closest)
    if closest != n_heads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def token_axis(positions: torch.Tensor, what: str) -> torch.Tensor:
    """(B or 1, T) positions from the patch's (B or 1, T) or single-axis (B or 1, T, 1)."""
    if positions.dim() == 3:
        if positions.shape[-1] != 1:
            raise ValueError(
                f"{what} takes one position axis, got positions of shape {tuple(positions.shape)}"
            )
        return positions[..., 0]
    return positions


def fold_mask(bias: torch.Tensor, attention_mask, module, query: torch.Tensor,
              key: torch.Tensor) -> torch.Tensor:
    """One float additive mask: `bias` where attention is allowed, the dtype's minimum elsewhere.

    `attention_mask` is what transformers' mask builders hand the attention
    function: None (causal implied when there is more than one query, with
    torch's upper-left alignment, which the builder only leaves to sdpa when
    that alignment is right), boolean (B, 1, T_q, T_k) with True = attend, or
    float additive. The folding is transformers' own `create_position_bias_mask`,
    so both paths read the mask exactly as `sdpa_attention_forward` does.
    """
    is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    return create_position_bias_mask(bias, attention_mask, is_causal, query, key)


class ALiBi(PositionEncoding):
    """Linear distance biases, one slope per head; queries and keys are not rotated."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """-m_h * (i - j) in float32, shape (B or 1, H, T_q, T_k); positive above the diagonal,
        where the causal mask removes it."""
        q_pos, k_pos = token_axis(q_pos, "ALiBi"), token_axis(k_pos, "ALiBi")
        distance = q_pos.float()[:, None, :, None] - k_pos.float()[:, None, None, :]
        return -self.slopes[None, :, None, None] * distance

    def attend(self, module, query, key, value, attention_mask, q_pos, k_pos, eager: bool, **kwargs):
        if query.shape[1] != self.n_heads:
            raise ValueError(f"ALiBi was built for {self.n_heads} heads, attention has {query.shape[1]}")
        bias = self.bias(q_pos, k_pos).to(query.dtype)
        if eager:
            mask = fold_mask(bias, attention_mask, module, query, key)
            return eager_attention_forward(module, query, key, value, mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=bias, **kwargs)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"


@register_encoding(
    "alibi",
    "ALiBi, no rotation: score(i, j) - m_h * (i - j), head slopes m_h = 2^(-8h/n) (Press et al. 2022)",
)
def alibi(config):
    return ALiBi(config.n_head)
