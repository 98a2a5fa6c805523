"""Put a position encoding into a transformers GPT-2 model.

GPT-2 in transformers 5.x builds q, k, v, stores the *unrotated* keys in the
cache, then calls the attention function named by
`config._attn_implementation`. We register two such functions, an sdpa one
for training and an eager twin that returns attention probabilities; both
hand q, k, v and positions to the layer's `position_encoding`. Because the
cache keeps unrotated keys, every call rotates all keys with their own
positions.

Positions travel in their own keyword, `token_positions`, never in
`position_ids` (a position that does not advance by one is read there as a
packed-sequence boundary). It holds the positions of every key, cached ones
included: shape (T_k,) or (B, T_k); queries take the last T_q. When absent,
positions are 0 .. T_k - 1.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .registry import get_encoding

SDPA = "mempos_sdpa"
EAGER = "mempos_eager"
CONFIG_KEY = "mempos_encoding"  # recorded in config.json so a reload can re-apply the patch


def key_positions(token_positions, length: int, device) -> torch.Tensor:
    """Float32 positions of shape (B, T_k), or (1, T_k) when every row shares them,
    clamped at 0 (log1p of a negative pad is NaN).

    A 3-D input (B or 1, T_k, A) carries A position axes per token (for a
    multi-axis encoding) and is kept 3-D; its token dimension is -2. A 1-D or
    2-D input is one axis. Queries take the last T_q along dim 1 either way.
    """
    if token_positions is None:
        return torch.arange(length, device=device, dtype=torch.float32)[None]
    pos = torch.as_tensor(token_positions, device=device).float()
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() not in (2, 3):
        raise ValueError(
            f"token_positions must be (T,), (B, T) or (B, T, axes); got shape {tuple(pos.shape)}"
        )
    tokens = pos.shape[-2] if pos.dim() == 3 else pos.shape[-1]
    if tokens != length:
        raise ValueError(f"token_positions covers {tokens} tokens but attention sees {length} keys")
    return pos.clamp_min(0)


def attend(module, query, key, value, attention_mask, token_positions, eager: bool, **kwargs):
    encoding = getattr(module, "position_encoding", None)
    if encoding is None:  # e.g. an unpatched model that shares its config object with a patched one
        raise RuntimeError(f"attention layer {module.layer_idx} has no position encoding; apply_encoding first")
    k_pos = key_positions(token_positions, key.shape[2], query.device)
    q_pos = k_pos if query.shape[2] == key.shape[2] else k_pos[:, key.shape[2] - query.shape[2]:]
    return encoding.attend(module, query, key, value, attention_mask, q_pos, k_pos, eager=eager, **kwargs)


def rotary_sdpa(module, query, key, value, attention_mask, token_positions=None, **kwargs):
    return attend(module, query, key, value, attention_mask, token_positions, eager=False, **kwargs)


def rotary_eager(module, query, key, value, attention_mask, token_positions=None, **kwargs):
    return attend(module, query, key, value, attention_mask, token_positions, eager=True, **kwargs)


# The mask builder must be registered under the same name, or no causal mask is built.
AttentionInterface.register(SDPA, rotary_sdpa)
AttentionMaskInterface.register(SDPA, sdpa_mask)
AttentionInterface.register(EAGER, rotary_eager)
AttentionMaskInterface.register(EAGER, eager_mask)


class NoPositionEmbedding(nn.Module):
    """Stands in for GPT-2's `wpe`: adds nothing and accepts any position."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)


def apply_encoding(model, name: str, **options):
    """Give `model` the named encoding in place and return it.

    `learned` leaves the model as it is. Any other name removes the learned
    absolute positions and puts an encoding into every attention layer.
    """
    spec = get_encoding(name)
    if name == "learned" and is_patched(model):
        raise ValueError("this model's learned positions were already removed; load a fresh model for 'learned'")
    config = model.config
    encoding = spec.build(config, **options)
    setattr(config, CONFIG_KEY, {"name": name, "options": dict(options)})
    if encoding is None:
        model.set_attn_implementation("sdpa")
        return model
    model.transformer.wpe = NoPositionEmbedding()
    for block in model.transformer.h:
        block.attn.position_encoding = spec.build(config, **options)
        if hasattr(block.attn.position_encoding, "install"):  # e.g. PaTH reads the layer's input
            block.attn.position_encoding.install(block.attn)
    model.set_attn_implementation(SDPA)
    return model


def encoding_name(model) -> str:
    recorded = getattr(model.config, CONFIG_KEY, None)
    return recorded["name"] if recorded else "learned"


def is_patched(model) -> bool:
    return isinstance(model.transformer.wpe, NoPositionEmbedding)


@contextlib.contextmanager
def eager_attention(model):
    """Switch to the eager twin (which returns attention probabilities) for the block."""
    before = model.config._attn_implementation
    model.set_attn_implementation(EAGER if is_patched(model) else "eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
