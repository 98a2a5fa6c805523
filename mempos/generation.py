"""Greedy decoding that carries the project's own positions.

`generate()` refuses unknown keyword arguments and would advance every
position axis by one, so patched models decode here: one prefill, then one
token at a time with the KV cache, passing the positions of *all* keys on
every step (the cache holds unrotated keys).
"""

from __future__ import annotations

from typing import Callable

import torch

from .encodings import is_patched


def next_position(positions: torch.Tensor) -> torch.Tensor:
    """The next token's position: one past the last one on every row."""
    return positions[:, -1:] + 1


@torch.no_grad()
def greedy_decode(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    positions: torch.Tensor | None = None,
    step: Callable[[torch.Tensor], torch.Tensor] = next_position,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue `prompt` (B, T) greedily by `max_new_tokens`; returns (B, T + new).

    `positions` (B, T) are the prompt's positions (default 0 .. T-1); `step`
    maps the positions so far to the next token's. With `use_cache=False`
    every step recomputes the whole sequence, the reference the cached path
    must equal.
    """
    batch, length = prompt.shape
    if positions is None:
        positions = torch.arange(length, device=prompt.device).expand(batch, length)
    patched = is_patched(model)
    extra = lambda pos: {"token_positions": pos} if patched else {}  # noqa: E731
    tokens, cache = prompt, None
    for _ in range(max_new_tokens):
        if cache is None or not use_cache:
            out = model(tokens, use_cache=use_cache, **extra(positions))
        else:
            out = model(tokens[:, -1:], cache=cache, use_cache=True, **extra(positions))
        cache = out.cache if use_cache else None
        new = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, new], dim=1)
        positions = torch.cat([positions, step(positions)], dim=1)
    return tokens
