"""Position warps f(i): the rotary angle of pair k at position i is omega_k * f(i).

A warp is a plain function of a float tensor of positions. `linear` gives the
usual RoPE, whose scores depend only on j - i. `log1p` makes them depend only
on the ratio (1 + j) / (1 + i): that is ratio invariance, not shift
invariance, and log is not homogeneous (f(a*i) != a*f(i); for large i,
f(a*i) ~ f(i) + log a).
"""

from __future__ import annotations

from typing import Callable

import torch

Warp = Callable[[torch.Tensor], torch.Tensor]

WARPS: dict[str, Warp] = {}


def register_warp(name: str) -> Callable[[Warp], Warp]:
    def add(fn: Warp) -> Warp:
        WARPS[name] = fn
        return fn

    return add


@register_warp("linear")
def linear(positions: torch.Tensor) -> torch.Tensor:
    return positions


@register_warp("log1p")
def log1p(positions: torch.Tensor) -> torch.Tensor:
    return torch.log1p(positions)


def get_warp(name: str) -> Warp:
    try:
        return WARPS[name]
    except KeyError:
        raise KeyError(f"unknown warp {name!r}; known: {', '.join(sorted(WARPS))}") from None
