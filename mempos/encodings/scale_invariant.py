"""Scale-invariant attention (Anson, Wang and Aitchison 2025, arXiv 2505.17083),
"scale-invariant p-RoPE" in the paper.

NOT the log-warped RoPE of this project (`si_rope`, theta = omega_k *
log(1 + i)): the published method leaves the rotation linear and instead
transforms every attention logit by the query-key distance t = i - j,

    L_t = a_t * S_t + m_t,   a_t^2 = 1 + 2 log(t/tau + 1),   m_t = -2 log(t/tau + 1),

with tau = 10 (the paper's best of 10^-2 .. 10^2). As in the paper (Eq. 1,
Appendix A), S_t is the *scaled* dot product q.k / sqrt(d) (here q.k times
the layer's `scaling`, which is 1/sqrt(d) for GPT-2 unless
`scale_attn_by_inverse_layer_idx` divides it further) and t counts back from
the query: t = 0 on the diagonal, t = 1 the previous token. Their general
solution a_t^2 = 2[log(t/tau + 1) - log alpha + beta/alpha], m_t = -a_t^2 +
beta/alpha reduces to the form above with the boundary condition a_0 = 1,
m_0 = 0 (alpha = beta = e^0.5): the diagonal and tokens much closer than tau
are left nearly unscaled. `i` and `j` are the tokens' positions (q_pos,
k_pos), so the transform works through a KV cache and depends only on i - j.
Distances below 0 (future keys, which the causal mask removes anyway, or
out-of-order explicit positions) are clamped to 0 so the log stays finite.

The scores it transforms come from p-RoPE (Barbero et al. 2024): only a
fraction of the frequency pairs rotate and the lowest frequencies are left
position-free. The paper does not print its p-RoPE's fraction; it says the
code base is modded-nanogpt and that p-RoPE used "an effective base of 1024"
(their Appendix G). modded-nanogpt's "half-truncated RoPE" is: half the
pairs rotate, with frequencies spaced geometrically from 1 down to 1/1024,
the other half get frequency 0. That is the default here (`fraction=0.5`,
`base=1024`, `spacing="nanogpt"`). `spacing="rope"` instead keeps the
project's `p_rope` frequencies, base^(-2k/d) for the rotating pairs (default
base 10000 then), so the two p-RoPEs can be compared under the same
transform. Either way the rotation is the project's `Rotary` with `p =
fraction` (same rounding, same half-split layout, angles in float32).

Because a_t multiplies each score separately, the transform cannot be folded
into an additive mask: both paths compute the scores explicitly (q k^T *
scaling), transform them, add the (causal or given) mask, softmax, dropout,
and multiply by v. The sdpa path returns no probabilities (like transformers'
sdpa), the eager twin returns them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv

from .alibi import fold_mask, token_axis
from .base import PositionEncoding
from .registry import head_dim, register_encoding
from .rotary import Rotary, inverse_frequencies, rotating_pairs


SPACINGS = ("nanogpt", "rope")


def p_rope_frequencies(dim: int, fraction: float = 0.5, base: float | None = None,
                       spacing: str = "nanogpt") -> torch.Tensor:
    """Angular frequencies omega_k of the d/2 pairs (half-split layout, pair k = dims k, k + d/2).

    The first n = `rotating_pairs(dim, fraction)` pairs rotate, the rest get 0. "nanogpt":
    omega_k = base^(-k/(n-1)), k = 0 .. n-1, from 1 down to 1/base (base 1024 by default);
    with fraction 0.5 this is modded-nanogpt's half-truncated RoPE, the p-RoPE the paper trained
    with. "rope": omega_k = base^(-2k/d) (base 10000 by default), the project's `p_rope`.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if dim % 2:
        raise ValueError(f"rotary needs an even head dimension, got {dim}")
    rotating = rotating_pairs(dim, fraction)
    if spacing == "rope":
        freq = inverse_frequencies(dim, 10000.0 if base is None else base)
    else:
        base = 1024.0 if base is None else float(base)
        freq = torch.zeros(dim // 2, dtype=torch.float32)
        if rotating:  # one rotating pair gets omega = 1
            freq[:rotating] = (base ** -torch.linspace(0, 1, rotating, dtype=torch.float64)).float()
    freq[rotating:] = 0.0
    return freq


def scale_invariant_coefficients(distance: torch.Tensor, tau: float = 10.0):
    """a_t and m_t (float32) for distances t (clamped at 0): a_t^2 = 1 + 2 log(t/tau + 1),
    m_t = -2 log(t/tau + 1)."""
    log_term = torch.log1p(distance.float().clamp_min(0) / tau)
    return torch.sqrt(1 + 2 * log_term), -2 * log_term


class ScaleInvariantAttention(PositionEncoding):
    """p-RoPE, then the distance-dependent logit transform L_t = a_t * S_t + m_t."""

    def __init__(self, head_dim: int, tau: float = 10.0, fraction: float = 0.5, base: float | None = None,
                 spacing: str = "nanogpt"):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        freq = p_rope_frequencies(head_dim, fraction, base, spacing)
        if base is None:
            base = 1024.0 if spacing == "nanogpt" else 10000.0
        self.tau, self.fraction, self.base, self.spacing = float(tau), float(fraction), float(base), spacing
        self.rotary = Rotary(head_dim, base=base, warp="linear", p=fraction)
        if spacing == "nanogpt":
            self.rotary.inv_freq = freq  # replaces the buffer (a static schedule reads it as is)

    def rotate(self, q, k, q_pos, k_pos):
        return self.rotary.rotate(q, k, q_pos, k_pos)

    def coefficients(self, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """a_t, m_t of shape (B or 1, 1, T_q, T_k) with t = q_pos - k_pos."""
        what = "scale-invariant attention"
        q_pos, k_pos = token_axis(q_pos, what), token_axis(k_pos, what)
        distance = q_pos.float()[:, None, :, None] - k_pos.float()[:, None, None, :]
        return scale_invariant_coefficients(distance, self.tau)

    def transform(self, scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """L = a_t * S + m_t for scaled scores S (B, H, T_q, T_k), unmasked, in float32 or wider."""
        dtype = torch.promote_types(scores.dtype, torch.float32)
        a, m = self.coefficients(q_pos, k_pos)
        return a.to(dtype) * scores.to(dtype) + m.to(dtype)

    def attend(self, module, query, key, value, attention_mask, q_pos, k_pos, eager: bool,
               dropout: float = 0.0, scaling: float | None = None, **kwargs):
        groups = getattr(module, "num_key_value_groups", 1)
        if groups > 1:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        query, key = self.rotate(query, key, q_pos, k_pos)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        # the mask as transformers' sdpa reads it, as a float32 additive term
        zero = scores.new_zeros((), dtype=torch.promote_types(scores.dtype, torch.float32))
        mask = fold_mask(zero, attention_mask, module, query, key)
        logits = self.transform(scores, q_pos, k_pos) + mask
        probs = nn.functional.softmax(logits, dim=-1).to(value.dtype)
        probs = nn.functional.dropout(probs, p=dropout, training=module.training)
        output = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return output, (probs if eager else None)

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}, fraction={self.fraction:g}, base={self.base:g}, spacing={self.spacing}"


@register_encoding(
    "scale_invariant_attn",
    "scale-invariant attention (Anson et al. 2025), not si_rope: p-RoPE scores S_t, logits "
    "a_t*S_t + m_t, a_t^2 = 1 + 2 log(t/tau + 1), m_t = -2 log(t/tau + 1), t = i - j, tau = 10",
)
def scale_invariant_attn(config, tau: float = 10.0, fraction: float = 0.5, base: float | None = None,
                         spacing: str = "nanogpt"):
    return ScaleInvariantAttention(head_dim(config), tau=tau, fraction=fraction, base=base, spacing=spacing)
