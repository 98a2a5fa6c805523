"""Named position encodings, one short builder each; a config picks one by name.

A builder takes the model config and keyword options and returns the
`PositionEncoding` each attention layer will use, or None for the control
that keeps GPT-2's own learned absolute positions.
"""

from __future__ import annotations

import inspect
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


def length_options(name: str, train_len: int, eval_len: int) -> dict:
    """The options that tie a named encoding to a run's lengths: `train_len` (the original length
    of a schedule) and `factor` = eval_len / train_len, for the builders that take them."""
    parameters = inspect.signature(get_encoding(name).build).parameters
    options = {"train_len": train_len, "factor": eval_len / train_len}
    return {key: value for key, value in options.items() if key in parameters}


def get_encoding(name: str) -> EncodingSpec:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise KeyError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}") from None


# ---- warps, frequency schedules, p-RoPE, multi-axis ------------------------------------
# Schedules come from transformers' ROPE_INIT_FUNCTIONS (see rotary.py). Where a method needs
# a factor and a training length, experiments pass their own (`length_options`); the defaults
# are the needle experiment's: train at TRAIN_LEN = 128 tokens, evaluate at 4x, factor 4. Every schedule
# takes `warp` (and `warp_options`) too: it changes the frequencies, the warp the positions.

from .multiaxis import MultiAxisRotary  # noqa: E402

TRAIN_LEN, FACTOR = 128, 4.0


def _scaled(config, base, warp, warp_options, **scaling):
    return Rotary(head_dim(config), base=base, warp=warp, warp_options=warp_options, scaling=scaling)


@register_encoding(
    "rope_power",
    "power-warped RoPE, theta = omega_k * i^beta, beta = 0.5 (this project): neither shift- nor ratio-invariant",
)
def rope_power(config, beta: float = 0.5, base: float = 10000.0):
    return Rotary(head_dim(config), base=base, warp="power", warp_options={"beta": beta})


@register_encoding(
    "rope_spline",
    "learned-warp RoPE, theta = omega_k * g(log(1 + i)), g monotone piecewise linear, linear past the last "
    "knot, init g(u) = u (si_rope; init=linear: rope) (this project)",
)
def rope_spline(config, init: str = "log1p", n_knots: int = 16, base: float = 10000.0):
    return Rotary(head_dim(config), base=base, warp="spline", warp_options={"init": init, "n_knots": n_knots})


@register_encoding(
    "rope_linear_pi",
    "position interpolation (Chen et al. 2023), theta = omega_k * i / s, s = eval/train length (transformers 'linear')",
)
def rope_linear_pi(config, factor: float = FACTOR, base: float = 10000.0, warp="linear", warp_options=None):
    return _scaled(config, base, warp, warp_options, rope_type="linear", factor=float(factor))


@register_encoding(
    "rope_ntk",
    "dynamic NTK (bloc97, emozilla 2023), base*(s*L/L0 - s + 1)^(d/(d-2)) for call length L > L0, "
    "L0 = train length, s = eval/train length (transformers 'dynamic')",
)
def rope_ntk(config, factor: float = FACTOR, train_len: int = TRAIN_LEN, length: int | None = None,
             base: float = 10000.0, warp="linear", warp_options=None):
    """Dynamic by default, as transformers: each call's largest position sets the frequencies (so past
    train_len a KV cache only approximates recomputation); `length` pins them at that length instead."""
    scaling = {"rope_type": "dynamic", "factor": float(factor), "original_max_position_embeddings": int(train_len)}
    return Rotary(head_dim(config), base=base, warp=warp, warp_options=warp_options, scaling=scaling,
                  schedule_length=length)


@register_encoding(
    "rope_yarn",
    "YaRN (Peng et al. 2023), omega_k/s -> omega_k ramped by rotations in L0 (1..32), cos/sin x (0.1 ln s + 1), "
    "L0 = train length, s = eval/train length",
)
def rope_yarn(config, factor: float = FACTOR, train_len: int = TRAIN_LEN, beta_fast: float = 32.0,
              beta_slow: float = 1.0, base: float = 10000.0, warp="linear", warp_options=None):
    return _scaled(config, base, warp, warp_options, rope_type="yarn", factor=float(factor),
                   original_max_position_embeddings=int(train_len), beta_fast=float(beta_fast),
                   beta_slow=float(beta_slow))


@register_encoding(
    "rope_llama3",
    "Llama 3.1 scaling (Meta 2024), omega_k/s for wavelengths > L0/1, omega_k below L0/4, smooth between, "
    "L0 = train length, s = eval/train length",
)
def rope_llama3(config, factor: float = FACTOR, train_len: int = TRAIN_LEN, low_freq_factor: float = 1.0,
                high_freq_factor: float = 4.0, base: float = 10000.0, warp="linear", warp_options=None):
    return _scaled(config, base, warp, warp_options, rope_type="llama3", factor=float(factor),
                   original_max_position_embeddings=int(train_len), low_freq_factor=float(low_freq_factor),
                   high_freq_factor=float(high_freq_factor))


@register_encoding(
    "p_rope",
    "p-RoPE (Barbero et al. 2024), theta = omega_k * i for the highest-frequency fraction p = 0.75 of pairs, "
    "0 for the rest",
)
def p_rope(config, p: float = 0.75, base: float = 10000.0, warp="linear", warp_options=None):
    return Rotary(head_dim(config), base=base, warp=warp, warp_options=warp_options, p=float(p))


@register_encoding(
    "rope_multiaxis",
    "multi-axis RoPE, theta_k = omega_k * f_a(i_a), pair k on axis a (local, slot, module, pc), "
    "sections (Qwen2-VL M-RoPE, Wang et al. 2024) or interleaved (Qwen3-VL 2025)",
)
def rope_multiaxis(config, axes=("local",), warps="linear", sections=None, layout: str = "sections",
                   base: float = 10000.0, warp_options=None):
    return MultiAxisRotary(head_dim(config), axes=axes, warps=warps, sections=sections, layout=layout,
                           base=base, warp_options=warp_options)
