"""Position warps f(i): the rotary angle of pair k at position i is omega_k * f(i).

A warp is a callable on a float tensor of positions (>= 0; the rotary layer
clamps pads at 0). `linear` gives the usual RoPE, whose scores depend only on
j - i. `log1p` makes them depend only on the ratio (1 + j) / (1 + i): that is
ratio invariance, not shift invariance, and log is not homogeneous (f(a*i) !=
a*f(i); for large i, f(a*i) ~ f(i) + log a).

Warps that take options come from factories: `get_warp("power", beta=0.5)`
returns `PowerWarp(0.5)`, `get_warp("spline", init="log1p")` a fresh
learnable `SplineWarp`. A warp that is an `nn.Module` is held by the rotary
layer as a submodule, so its parameters train with the model and live in its
state_dict. Plain warps (`linear`, `log1p`) stay in `WARPS` and
`get_warp(name)` still returns the function itself.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

Warp = Callable[[torch.Tensor], torch.Tensor]

WARPS: dict[str, Warp] = {}
WARP_FACTORIES: dict[str, Callable[..., Warp]] = {}


def register_warp(name: str) -> Callable[[Warp], Warp]:
    def add(fn: Warp) -> Warp:
        WARPS[name] = fn
        return fn

    return add


def register_warp_factory(name: str) -> Callable:
    """Register a warp that takes options: `factory(**options)` returns a fresh warp."""

    def add(factory):
        WARP_FACTORIES[name] = factory
        return factory

    return add


@register_warp("linear")
def linear(positions: torch.Tensor) -> torch.Tensor:
    return positions


@register_warp("log1p")
def log1p(positions: torch.Tensor) -> torch.Tensor:
    return torch.log1p(positions)


@register_warp_factory("power")
class PowerWarp(nn.Module):
    """f(i) = i^beta, beta in (0, 1]: angles grow sub-linearly with position.

    Neither shift- nor ratio-invariant for beta < 1; beta = 1 is plain RoPE.
    No parameters (a module only so that it prints its beta).
    """

    def __init__(self, beta: float = 0.5):
        super().__init__()
        beta = float(beta)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"power warp needs beta in (0, 1], got {beta}")
        self.beta = beta

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.clamp_min(0).pow(self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


@register_warp_factory("spline")
class SplineWarp(nn.Module):
    """Learnable monotone warp, piecewise linear in a coordinate u = c(i).

    f(i) = v_k + s_k * (c(i) - u_k) for u_k <= c(i) < u_{k+1}, with knots
    u_0 = 0 < u_1 < ... < u_K, slopes s_k = exp(raw_k) > 0 (K + 1 of them: one
    per segment and one for the tail beyond u_K, where f continues linearly,
    never clipped) and v_0 = 0, v_{k+1} = v_k + s_k (u_{k+1} - u_k). Every slope
    is positive, so f is strictly increasing for any parameters; v is a running
    sum of the same float products the segment formula uses, so it is also
    non-decreasing as evaluated in floating point.

    `init` picks the coordinate, and with raw = 0 (all slopes 1) f = c exactly:

    - "log1p": c(i) = log(1 + i), knots u_k = k * step (step = 0.5 by default,
      so the last of 16 knots sits at u = 7.5, i ~ 1807). f = log1p(i) at init.
    - "linear": c(i) = i, knots 0, 1, 2, 4, ..., 2^(K-1) (the last of 16 knots
      at i = 16384). f = i at init.

    Knots are dyadic numbers (multiples of a power of two), so the init is
    exact to the bit, not only to float precision: u_k + (u - u_k) == u holds
    in floating point for every u >= 0 up to ~2^24 in the linear coordinate.
    An additive constant in f cancels in rotary scores, so f(0) = 0 loses
    nothing.
    """

    COORDINATES = ("log1p", "linear")

    def __init__(self, init: str = "log1p", n_knots: int = 16, step: float = 0.5):
        super().__init__()
        if init not in self.COORDINATES:
            raise ValueError(f"spline warp init must be one of {self.COORDINATES}, got {init!r}")
        n_knots = int(n_knots)
        if n_knots < 2:
            raise ValueError(f"spline warp needs at least 2 knots, got {n_knots}")
        self.init, self.n_knots = init, n_knots
        if init == "log1p":
            step = float(step)
            mantissa, _ = math.frexp(step)
            if step <= 0 or not float(mantissa * 2 ** 10).is_integer():
                raise ValueError(f"spline step must be a positive dyadic number like 0.5 or 0.25, got {step}")
            self.step = step
            knots = torch.arange(n_knots, dtype=torch.float64) * step
        else:
            self.step = None
            powers = 2.0 ** torch.arange(n_knots - 1, dtype=torch.float64)
            knots = torch.cat([torch.zeros(1, dtype=torch.float64), powers])
        self.register_buffer("knots", knots.float(), persistent=False)
        # one log-slope per segment, the last one for the tail beyond the last knot
        self.raw_slopes = nn.Parameter(torch.zeros(n_knots))

    def coordinate(self, positions: torch.Tensor) -> torch.Tensor:
        positions = positions.clamp_min(0)
        return torch.log1p(positions) if self.init == "log1p" else positions

    def slopes(self) -> torch.Tensor:
        return self.raw_slopes.exp()

    def knot_values(self) -> torch.Tensor:
        """v_k = f at knot k: (K + 1,), v_0 = 0."""
        slopes = self.slopes()
        knots = self.knots.to(slopes.dtype)
        rises = slopes[:-1] * (knots[1:] - knots[:-1])
        return torch.cat([rises.new_zeros(1), torch.cumsum(rises, 0)])

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        u = self.coordinate(positions)
        knots = self.knots.to(u.dtype)
        segment = (torch.searchsorted(knots, u.detach().contiguous(), right=True) - 1).clamp_(0, self.n_knots - 1)
        slopes = self.slopes().to(u.dtype)
        values = self.knot_values().to(u.dtype)
        return values[segment] + slopes[segment] * (u - knots[segment])

    def extra_repr(self) -> str:
        step = f", step={self.step:g}" if self.step is not None else ""
        return f"init={self.init}, n_knots={self.n_knots}{step}"


def get_warp(name: str, **options) -> Warp:
    """The named warp: the function itself for plain warps, a fresh instance for factories."""
    if name in WARP_FACTORIES:
        return WARP_FACTORIES[name](**options)
    if name in WARPS:
        if options:
            raise TypeError(f"warp {name!r} takes no options, got {', '.join(sorted(options))}")
        return WARPS[name]
    known = sorted(set(WARPS) | set(WARP_FACTORIES))
    raise KeyError(f"unknown warp {name!r}; known: {', '.join(known)}")


def resolve_warp(warp, options: dict | None = None) -> tuple[str, Warp]:
    """(name, callable) from a warp name, a callable or an nn.Module."""
    if isinstance(warp, str):
        return warp, get_warp(warp, **(options or {}))
    if options:
        raise TypeError("warp options are only accepted with a warp name")
    if not callable(warp):
        raise TypeError(f"a warp must be a name or a callable, got {type(warp).__name__}")
    return getattr(warp, "__name__", type(warp).__name__), warp
