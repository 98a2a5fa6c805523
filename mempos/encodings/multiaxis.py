"""Multi-axis rotary: each token carries several named positions.

A token's position is a tuple of axes, e.g. (local index, memory slot,
module id, program-counter step), passed as a float tensor of shape
(B or 1, T, A) in the order of `axes`. The head's d/2 frequency pairs are
split among the axes and pair k rotates by theta_k = omega_k * f_a(i_a),
where a is the axis that owns pair k and f_a that axis's warp. The
frequencies omega_k are the head's usual ones (and any schedule or p-RoPE
applies to them as in `Rotary`); an axis only selects which of them it
drives. With linear warps the score of a query/key pair depends only on the
per-axis differences j_a - i_a; with a log1p warp on an axis, only on that
axis's ratio (1 + j_a)/(1 + i_a).

Two layouts, matching transformers' multimodal RoPE where they overlap:

- `sections` (Qwen2-VL's M-RoPE, `mrope_section`): contiguous blocks, axis 0
  owns pairs [0, s_0), axis 1 the next s_1 pairs, and so on. Axis 0 gets the
  highest frequencies. Default sizes: d/2 split evenly, the remainder going
  to the first axes.
- `interleaved` (Qwen3-VL): axis a >= 1 owns pairs a, a + A, ..., a + A(s_a - 1)
  and axis 0 owns every other pair; Qwen3-VL's [24, 20, 20] on 64 pairs is
  exactly this rule with A = 3. The default sizes make it a plain round robin
  (pair k on axis k mod A), so every axis spans the whole frequency range.

Two-dimensional positions (B, T) (or none, which the patch turns into
0 .. T-1) are read as axis 0 with every other axis at 0: a multi-axis model
runs on plain text as local RoPE on axis 0's pairs, while the other axes'
pairs stay unrotated (warp(0) = 0 for every built-in warp). Positions with a
different number of axes raise a ValueError. A single-axis configuration
computes exactly what `Rotary` computes (bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import PositionEncoding
from .rotary import Rotary
from .warps import resolve_warp

LAYOUTS = ("sections", "interleaved")


def default_sections(pairs: int, n_axes: int, layout: str = "sections") -> list[int]:
    """Pairs per axis when none are given: an even split, remainder to the first axes
    (for `interleaved` this is the round robin k mod A)."""
    return [pairs // n_axes + (a < pairs % n_axes) for a in range(n_axes)]


def axis_of_pairs(pairs: int, sections: Sequence[int], layout: str) -> torch.Tensor:
    """(pairs,) long tensor: which axis owns each frequency pair."""
    n_axes = len(sections)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if any(int(s) != s or s < 0 for s in sections) or sum(sections) != pairs:
        raise ValueError(f"sections {list(sections)} must be non-negative integers summing to {pairs} pairs")
    if layout == "sections":
        return torch.repeat_interleave(torch.arange(n_axes), torch.tensor([int(s) for s in sections]))
    owner = torch.zeros(pairs, dtype=torch.long)
    for axis in range(1, n_axes):
        count = int(sections[axis])
        if count and axis + n_axes * (count - 1) >= pairs:
            raise ValueError(
                f"interleaved layout: axis {axis} cannot own {count} pairs of {pairs} "
                f"(pairs {axis}, {axis} + {n_axes}, ... run past the head)"
            )
        owner[axis: axis + n_axes * count: n_axes] = axis
    return owner


def per_axis(value, axes: Sequence[str], what: str) -> list:
    """A value given once, as a list in axis order, or as a {axis: value} mapping."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(axes)
        if unknown:
            raise ValueError(f"{what} names unknown axes {sorted(unknown)}; axes are {list(axes)}")
        return [value.get(axis) for axis in axes]
    if isinstance(value, (list, tuple)):
        if len(value) != len(axes):
            raise ValueError(f"{what} has {len(value)} entries for {len(axes)} axes {list(axes)}")
        return list(value)
    return [value] * len(axes)


class MultiAxisRotary(Rotary):
    """Rotary over named position axes; see the module docstring.

    axes: axis names, e.g. ("local", "slot", "module", "pc"). warps: one warp
    for all axes, a list in axis order or a {axis: warp} mapping (names,
    callables or modules; missing axes are linear); warp_options: {axis:
    options}. sections: pairs per axis (sum d/2). layout: "sections" or
    "interleaved". base, scaling, p, schedule_length: as in `Rotary`; a run-time schedule
    (dynamic NTK) reads the largest position over all axes, as Qwen2-VL does.
    """

    def __init__(self, head_dim: int, axes: Sequence[str] = ("local",), warps="linear",
                 sections: Sequence[int] | None = None, layout: str = "sections", base: float = 10000.0, *,
                 warp_options: Mapping[str, dict] | None = None, scaling: dict | None = None, p: float = 1.0,
                 schedule_length: int | None = None):
        PositionEncoding.__init__(self)
        self._init_frequencies(head_dim, base, scaling, p, schedule_length)
        axes = [str(a) for a in ([axes] if isinstance(axes, str) else axes)]
        if not axes or len(set(axes)) != len(axes):
            raise ValueError(f"axes must be distinct names, at least one, got {axes}")
        self.axes, self.layout = tuple(axes), layout
        pairs = head_dim // 2
        self.sections = [int(s) for s in sections] if sections is not None else default_sections(pairs, len(axes))
        if len(self.sections) != len(axes):
            raise ValueError(f"sections {self.sections} has {len(self.sections)} entries for {len(axes)} axes")
        self.register_buffer("axis_of_pair", axis_of_pairs(pairs, self.sections, layout), persistent=False)
        names = per_axis(warps, axes, "warps")
        options = per_axis(dict(warp_options or {}), axes, "warp_options")
        resolved = [resolve_warp(w if w is not None else "linear", o) for w, o in zip(names, options)]
        self.warp_names = [name for name, _ in resolved]
        # modules go into a ModuleDict (trained, saved); the list keeps the call order
        self.warps = nn.ModuleDict({a: w for a, (_, w) in zip(axes, resolved) if isinstance(w, nn.Module)})
        self._axis_warps = [w for _, w in resolved]

    def axis_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, T, A) from (B, T, A) or (B, T) (= axis 0, others 0)."""
        if positions.dim() == 2:
            if len(self.axes) == 1:
                return positions[..., None]
            full = positions.new_zeros(positions.shape + (len(self.axes),))
            full[..., 0] = positions
            return full
        if positions.dim() != 3 or positions.shape[-1] != len(self.axes):
            raise ValueError(
                f"multi-axis rotary over axes {list(self.axes)} needs positions (B, T, {len(self.axes)}) "
                f"or (B, T) for axis {self.axes[0]!r} alone; got shape {tuple(positions.shape)}"
            )
        return positions

    def angles(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        positions = self.axis_positions(positions)
        thetas = [warp(positions[..., a].float().clamp_min(0))[..., None] * inv_freq
                  for a, warp in enumerate(self._axis_warps)]
        if len(thetas) == 1:
            return thetas[0]
        theta = torch.stack(thetas, dim=-2)  # (B, T, A, d/2)
        index = self.axis_of_pair.to(theta.device).expand(theta.shape[:-2] + (1, theta.shape[-1]))
        return theta.gather(-2, index).squeeze(-2)

    def pairs_of(self, axis: str) -> torch.Tensor:
        """Indices of the frequency pairs the named axis drives."""
        return (self.axis_of_pair == self.axes.index(axis)).nonzero().flatten()

    def extra_repr(self) -> str:
        warps = ", ".join(f"{a}:{w}" for a, w in zip(self.axes, self.warp_names))
        text = (f"head_dim={self.head_dim}, base={self.base:g}, axes=[{warps}], layout={self.layout}, "
                f"sections={self.sections}")
        if self.scaling:
            text += f", rope_type={self.rope_type}"
        if self.rotating < self.head_dim // 2:
            text += f", p={self.p:g}"
        return text
