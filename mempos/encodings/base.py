"""What the patched GPT-2 attention asks of a position encoding.

Most encodings only rotate q and k (`rotate`). Those that change the scores
themselves (an additive bias, a logit transform, a data-dependent transform
of keys) override `attend`, which receives everything the attention
function does and returns (output, probabilities or None).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward


class PositionEncoding(nn.Module):
    """Base class. Positions are float32 of shape (B or 1, T_q) and (B or 1, T_k)."""

    def rotate(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        return q, k

    def attend(self, module, query, key, value, attention_mask, q_pos, k_pos, eager: bool, **kwargs):
        """Default: rotate, then transformers' own sdpa or eager attention."""
        query, key = self.rotate(query, key, q_pos, k_pos)
        attention = eager_attention_forward if eager else sdpa_attention_forward
        return attention(module, query, key, value, attention_mask, **kwargs)
