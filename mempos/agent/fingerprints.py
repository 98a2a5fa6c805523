"""Memory fingerprints as rotary positions: what the agent hands the model for every token.

Every run uses the same four-axis rotary encoding (`rope_multiaxis` over
``AXES = ("local", "slot", "module", "pc")``), so ablations differ only in
what the axes carry:

- ``local``: the token's index in its packed context (always on);
- ``slot``: the memory-slot address of the example the token belongs to (a
  new example: the id it will get when written, ``bank.n_slots + i``; a
  replayed or retrieved one: its stored id);
- ``module``: the module the example was routed to;
- ``pc``: the program-counter step of the token (its segment of the prompt;
  the answer belongs to the last step, as `Example.pc_of_char` says).

Switching an axis off sets its values to 0: its frequency pairs then never
rotate. Rotary scores depend only on differences of axis values between a
query and a key, so a fingerprint axis acts only where tokens with different
values share a context (examples from different slots or modules packed
together, or different steps of one program).

Fingerprint values are multiplied by a per-axis stride before they become
positions. Neighbouring slot, module or step ids differ by 1, and an axis's
pairs turn by omega_k per unit: in the `sections` layout (Qwen2-VL M-RoPE,
the default) the local axis owns the highest frequencies and the later axes
ever lower ones (head width 32: slot from omega = 0.1, module from 0.01, pc
from 0.001), so a unit step of pc would turn nothing visibly. The default
stride of an axis ("auto") is 1 / (the largest omega it owns): a unit step
turns that axis's fastest pair by one radian and its slower pairs by less,
while "same value = no rotation" still holds. A number gives every axis
that stride instead. The local axis keeps the highest frequencies because
exact relative positions inside an example are what copying and lookups
need (a small GPT-2 learnt copying clearly faster with `sections` than with
`interleaved`, where local owns every fourth pair).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mempos.encodings import apply_encoding
from mempos.errors import UsageError

ENCODING = "rope_multiaxis"
AXES = ("local", "slot", "module", "pc")
FINGERPRINT_AXES = ("slot", "module", "pc")
ALL_WORDS = ("fp", "all")  # "+fp" in a variant, or --fingerprints all, means every fingerprint axis
DEFAULT_STRIDE = None  # None: "auto", 1 / the fastest frequency each axis owns
DEFAULT_LAYOUT = "sections"


def parse_fingerprints(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """Axes to switch on, in canonical order: "none"/"" -> (); "fp"/"all" -> all three;
    "slot,pc" -> ("slot", "pc"). An unknown axis is a UsageError."""
    if text is None:
        return ()
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    parts = [p for p in parts if p]
    if not parts or parts == ["none"]:
        return ()
    chosen: set[str] = set()
    for part in parts:
        if part in ALL_WORDS:
            chosen.update(FINGERPRINT_AXES)
        elif part in FINGERPRINT_AXES:
            chosen.add(part)
        else:
            raise UsageError(
                f"unknown fingerprint axis {part!r}: choose from {', '.join(FINGERPRINT_AXES)}, "
                "'fp' for all of them, or 'none'"
            )
    return tuple(axis for axis in FINGERPRINT_AXES if axis in chosen)


def fingerprint_label(axes: Iterable[str]) -> str:
    """"" for none, "+fp" for all three, else "+slot+pc" style."""
    axes = tuple(axes)
    if not axes:
        return ""
    if set(axes) == set(FINGERPRINT_AXES):
        return "+fp"
    return "".join(f"+{axis}" for axis in axes)


def encoding_options(layout: str = DEFAULT_LAYOUT) -> dict:
    """Options of the one encoding every agent model carries (JSON-able, so checkpoints reload it)."""
    return {"axes": list(AXES), "layout": layout}


def apply_fingerprint_encoding(model, layout: str = DEFAULT_LAYOUT):
    """Patch `model` in place with the four-axis rotary encoding and return it."""
    return apply_encoding(model, ENCODING, **encoding_options(layout))


def auto_strides(model) -> dict[str, float]:
    """{axis: 1 / its largest frequency} for the four-axis encoding of `model`."""
    encoding = model.transformer.h[0].attn.position_encoding
    owner, inv_freq = encoding.axis_of_pair, encoding.inv_freq
    strides = {}
    for axis in FINGERPRINT_AXES:
        owned = inv_freq[owner == encoding.axes.index(axis)]
        owned = owned[owned > 0]
        strides[axis] = 1.0 / float(owned.max()) if len(owned) else 0.0
    return strides


class Fingerprints:
    """Turns (token pcs, slot id, module id) into (n, 4) positions, with axes on or off.

    `stride`: one number for every fingerprint axis, or {axis: stride}."""

    def __init__(self, axes: Iterable[str] = (), stride: float | dict = 1.0):
        self.axes = parse_fingerprints(tuple(axes))
        strides = stride if isinstance(stride, dict) else {axis: stride for axis in FINGERPRINT_AXES}
        for axis, value in strides.items():
            if value is None or not np.isfinite(value) or value < 0:
                raise UsageError(f"fingerprint stride of {axis} must be a non-negative number, got {value!r}")
        self.strides = {axis: float(strides.get(axis, 1.0)) for axis in FINGERPRINT_AXES}
        self._scale = np.array([1.0] + [self.strides[a] if a in self.axes else 0.0 for a in FINGERPRINT_AXES])

    def __repr__(self) -> str:
        strides = ", ".join(f"{a}={self.strides[a]:g}" for a in self.axes)
        return f"Fingerprints(axes={list(self.axes)}, strides=({strides}))"

    def positions(self, pcs: np.ndarray, slot: int, module: int, start: int = 0) -> np.ndarray:
        """(n, 4) float64: local = start .. start + n - 1, then slot, module and pc (scaled or zero)."""
        n = len(pcs)
        raw = np.empty((n, 4), np.float64)
        raw[:, 0] = np.arange(start, start + n)
        raw[:, 1] = slot
        raw[:, 2] = module
        raw[:, 3] = pcs
        return raw * self._scale

    def next_position(self, positions):
        """The decoding step for `greedy_decode`: local + 1, every fingerprint axis unchanged
        (generated answer tokens stay in their example's slot, module and final program step)."""
        step = positions[:, -1:].clone()
        step[..., 0] += 1
        return step
