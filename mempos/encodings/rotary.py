"""Rotary position embedding with a position warp and a frequency schedule.

Pair k of each head (dimensions k and k + d/2, the half-split layout that
transformers uses) is rotated by theta = omega_k * f(i), omega_k =
base^(-2k/d). Angles are computed in float32 and cast afterwards: in bf16 a
large position visibly moves the logits.

Three things compose independently:

- the warp f (`warps.py`): linear, log1p, power, a learnable spline; a warp
  that is an `nn.Module` is a submodule, so it trains and is saved with the
  model;
- the frequency schedule omega_k: by default base^(-2k/d); `scaling` takes a
  transformers `rope_parameters` dict ({"rope_type": "linear" | "dynamic" |
  "yarn" | "llama3" | "longrope", "factor": ..., ...}) and the frequencies
  and the cos/sin factor (`attention_scaling`, YaRN's 0.1 ln s + 1) come from
  transformers' own `ROPE_INIT_FUNCTIONS`, called with a minimal LlamaConfig,
  exactly as its rotary classes call them;
- p-RoPE (Barbero et al. 2024): only the fraction p of pairs with the highest
  frequencies rotate; the rest get omega = 0 and pass through unchanged.

Run-time schedules. transformers recomputes `dynamic` (NTK) frequencies from
seq_len = max(position) + 1 of the current call and `longrope` switches from
short to long factors when seq_len exceeds the original length. We do the
same from the largest *key* position of every call (queries use the keys'
frequencies), but statelessly: transformers' dynamic layer also remembers the
largest length seen so far and keeps its frequencies for later, shorter
calls (until one is shorter than the original length). The two agree on a
fresh transformers module and whenever call lengths do not shrink. Because
the patch rotates every cached key on every call, cached decoding then
equals recomputation, which transformers (caching rotated keys) does not
give for dynamic NTK. The length is read from raw positions, before the warp.

What a cache cannot give with a run-time schedule: beyond the original
length, every call's frequencies depend on that call's length, so the hidden
states of earlier tokens (and the keys and values the next layer caches from
them) change with the length. Cached decoding then differs slightly from a
full recomputation in a model of two or more layers (transformers has the
same property). `schedule_length=L` pins the schedule at one length (e.g.
the evaluation length): static frequencies, exact cache, the schedule of a
transformers call of length L.
"""

from __future__ import annotations

import torch

from .base import PositionEncoding
from .warps import resolve_warp

SCALED_ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def inverse_frequencies(dim: int, base: float = 10000.0) -> torch.Tensor:
    """omega_k = base^(-2k/d) for k = 0 .. d/2 - 1."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rotating_pairs(head_dim: int, p: float) -> int:
    """How many pairs rotate under p-RoPE: int(p * d // 2), transformers' `proportional` rounding."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p-RoPE fraction p must be in [0, 1], got {p}")
    return int(p * head_dim // 2)


def rope_config(head_dim: int, base: float, scaling: dict):
    """The minimal transformers config that `ROPE_INIT_FUNCTIONS[rope_type]` reads.

    `scaling` is a `rope_parameters` dict. Its `original_max_position_embeddings`
    is the training length: dynamic NTK reads it as `max_position_embeddings`
    (transformers' dynamic type has no separate original length); the others
    get `max_position_embeddings = factor * original`, the extended length
    (only YaRN without a factor reads it, to infer one).
    """
    from transformers import LlamaConfig

    params = dict(scaling)
    rope_type = params.get("rope_type")
    if rope_type not in SCALED_ROPE_TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r}; known: {', '.join(SCALED_ROPE_TYPES)}")
    params["rope_theta"] = float(base)
    original = params.get("original_max_position_embeddings")
    if rope_type == "dynamic":
        params.pop("original_max_position_embeddings", None)
        if original is None:
            raise ValueError("dynamic NTK needs original_max_position_embeddings (the training length)")
        max_len = int(original)
    elif rope_type == "linear":
        params.pop("original_max_position_embeddings", None)
        max_len = 2048  # not read by linear scaling
    else:
        if original is None:
            raise ValueError(f"{rope_type} needs original_max_position_embeddings (the training length)")
        max_len = int(round(float(params.get("factor") or 1.0) * int(original)))
        max_len = max(max_len, int(original) + 1)
    return LlamaConfig(
        hidden_size=head_dim, num_attention_heads=1, num_key_value_heads=1, head_dim=head_dim,
        max_position_embeddings=max_len, rope_parameters=params,
        num_hidden_layers=1, intermediate_size=1, vocab_size=1, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )


class Rotary(PositionEncoding):
    """RoPE on each head's query and key, with angle omega_k * warp(i).

    head_dim: even. base: the RoPE base. warp: a name from `warps` (options in
    `warp_options`), a callable or an nn.Module. scaling: None (plain RoPE
    frequencies) or a transformers `rope_parameters` dict, see `rope_config`.
    p: fraction of pairs that rotate (p-RoPE); the lowest frequencies stop.
    schedule_length: pin a run-time schedule (dynamic, longrope) at this length.

    Positions are (B or 1, T); a (B, T, 1) tensor is read as (B, T). Several
    axes need `MultiAxisRotary`.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, warp="linear", *,
                 warp_options: dict | None = None, scaling: dict | None = None, p: float = 1.0,
                 schedule_length: int | None = None):
        super().__init__()
        self._init_frequencies(head_dim, base, scaling, p, schedule_length)
        self.warp_name, self.warp = resolve_warp(warp, warp_options)

    # ---- frequencies -------------------------------------------------------------

    def _init_frequencies(self, head_dim: int, base: float, scaling: dict | None, p: float,
                          schedule_length: int | None = None) -> None:
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dimension, got {head_dim}")
        self.head_dim, self.base, self.p = head_dim, float(base), float(p)
        self.rotating = rotating_pairs(head_dim, self.p)
        self.scaling = dict(scaling) if scaling else None
        self.rope_type = self.scaling["rope_type"] if self.scaling else "default"
        self.attention_scaling = 1.0
        self._rope_config = None
        # dynamic and longrope follow each call's length unless pinned to schedule_length
        self.schedule_length = None if schedule_length is None else int(schedule_length)
        self.runtime_schedule = self.rope_type in ("dynamic", "longrope") and self.schedule_length is None
        if self.scaling is None:
            inv_freq = inverse_frequencies(head_dim, base)
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            self._rope_config = rope_config(head_dim, base, self.scaling)
            self._init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
            if self.schedule_length is None:
                inv_freq, attention_scaling = self._init_fn(self._rope_config)
            else:  # as a run-time call of that length would compute it (seq_len as a tensor)
                seq_len = torch.tensor(float(self.schedule_length))
                inv_freq, attention_scaling = self._init_fn(self._rope_config, seq_len=seq_len)
            self.attention_scaling = float(attention_scaling)
            if self.runtime_schedule and self.rope_type == "longrope":
                original = self._rope_config.rope_parameters["original_max_position_embeddings"]
                long_freq, _ = self._init_fn(self._rope_config, seq_len=original + 1)
                self.register_buffer("long_inv_freq", self._truncate(long_freq.float()), persistent=False)
        self.register_buffer("inv_freq", self._truncate(inv_freq.float()), persistent=False)

    def _truncate(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """p-RoPE: pairs k >= rotating (the lowest frequencies) get omega = 0."""
        if self.rotating < inv_freq.shape[-1]:
            inv_freq = inv_freq.clone()
            inv_freq[..., self.rotating:] = 0.0
        return inv_freq

    def frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """omega_k for a call whose largest (key) position is max(positions): (d/2,)."""
        if not self.runtime_schedule:
            return self.inv_freq
        if self.rope_type == "dynamic":
            seq_len = positions.detach().float().max() + 1
            inv_freq, _ = self._init_fn(self._rope_config, positions.device, seq_len=seq_len)
            return self._truncate(inv_freq.float())
        if self.rope_type == "longrope":
            original = self._rope_config.rope_parameters["original_max_position_embeddings"]
            seq_len = positions.detach().float().max() + 1
            return torch.where(seq_len > original, self.long_inv_freq, self.inv_freq)
        return self.inv_freq

    # ---- angles ------------------------------------------------------------------

    def angles(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """theta = warp(i) * omega_k, float32, shape (B, T, d/2)."""
        if positions.dim() == 3:
            if positions.shape[-1] != 1:
                raise ValueError(
                    f"{type(self).__name__} takes one position axis, got positions of shape "
                    f"{tuple(positions.shape)}; use a multi-axis encoding (rope_multiaxis)"
                )
            positions = positions[..., 0]
        return self.warp(positions.float().clamp_min(0))[..., None] * inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, inv_freq: torch.Tensor | None = None):
        """cos, sin of shape (B, 1, T, head_dim), computed in float32 (times the
        schedule's attention scaling, as transformers does) and cast to `dtype`."""
        if inv_freq is None:
            inv_freq = self.frequencies(positions)
        theta = self.angles(positions, inv_freq)
        theta = torch.cat((theta, theta), dim=-1).unsqueeze(1)
        cos, sin = theta.cos(), theta.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def rotate(self, q, k, q_pos, k_pos):
        inv_freq = self.frequencies(k_pos)
        cos_k, sin_k = self.cos_sin(k_pos, k.dtype, inv_freq)
        if q_pos is k_pos and q.dtype == k.dtype:
            cos_q, sin_q = cos_k, sin_k
        else:
            cos_q, sin_q = self.cos_sin(q_pos, q.dtype, inv_freq)
        return apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)

    def extra_repr(self) -> str:
        text = f"head_dim={self.head_dim}, base={self.base:g}, warp={self.warp_name}"
        if self.scaling:
            text += f", rope_type={self.rope_type}"
        if self.schedule_length is not None:
            text += f", schedule_length={self.schedule_length}"
        if self.rotating < self.head_dim // 2:
            text += f", p={self.p:g} ({self.rotating} of {self.head_dim // 2} pairs rotate)"
        return text
