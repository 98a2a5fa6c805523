"""Named position encodings, one short builder each; a config picks one by name.

A builder takes the model config and keyword options and returns the
`PositionEncoding` each attention layer will use, or None for the control
that keeps GPT-2's own learned absolute positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .rotary import PositionEncoding, Rotary


@dataclass(frozen=True)
class EncodingSpec:
    name: str
    summary: str  # one line: formula and source, shown in --help and the README
    build: Callable[..., PositionEncoding | None]


ENCODINGS: dict[str, EncodingSpec] = {}


def register_encoding(name: str, summary: str):
    def add(build):
        ENCODINGS[name] = EncodingSpec(name, summary, build)
        return build

    return add


def head_dim(config) -> int:
    return config.n_embd // config.n_head


@register_encoding("learned", "GPT-2's own learned absolute positions, untouched (the control)")
def learned(config):
    return None


@register_encoding("rope", "RoPE, theta = omega_k * i (Su et al. 2021): scores depend only on j - i")
def rope(config, base: float = 10000.0):
    return Rotary(head_dim(config), base=base, warp="linear")


@register_encoding(
    "si_rope",
    "log-warped RoPE, theta = omega_k * log(1 + i): scores depend only on (1 + j)/(1 + i)",
)
def si_rope(config, base: float = 10000.0):
    return Rotary(head_dim(config), base=base, warp="log1p")


def get_encoding(name: str) -> EncodingSpec:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise KeyError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}") from None
