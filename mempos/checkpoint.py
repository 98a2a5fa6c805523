"""Checkpoints that remember their encoding and reload through one call.

`attn_implementation` is not saved in config.json, so a reloaded GPT-2 would
silently fall back to learned positions. A checkpoint here holds the config,
the encoding name and options, the weights and the tokenizer, and
`load_checkpoint` re-applies the patch before loading the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .encodings import apply_encoding
from .encodings.gpt2 import CONFIG_KEY
from .errors import UsageError
from .io import atomic_path
from .models import tokenizer_from_json, tokenizer_to_json

FORMAT = "mempos-checkpoint/1"


def save_checkpoint(path, model, tokenizer, **meta) -> None:
    model = getattr(model, "module", model)  # unwrap DDP
    encoding = getattr(model.config, CONFIG_KEY, None) or {"name": "learned", "options": {}}
    config = model.config.to_dict()
    config.pop(CONFIG_KEY, None)
    payload = {
        "format": FORMAT,
        "config": config,
        "encoding": encoding,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tokenizer": tokenizer_to_json(tokenizer),
        "meta": meta,
    }
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as err:  # torch reports a full disk this way
            raise OSError(f"cannot write checkpoint {path}: {' '.join(str(err).split())[:200]}") from err


def load_checkpoint(path, device: str | torch.device = "cpu"):
    """Return (model, tokenizer, meta): the model patched, weights loaded, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UsageError(f"cannot read checkpoint {path}: {err.__class__.__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError(f"{path} is not a {FORMAT} checkpoint")
    model = GPT2LMHeadModel(GPT2Config.from_dict(payload["config"]))
    apply_encoding(model, payload["encoding"]["name"], **payload["encoding"]["options"])
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(device).eval(), tokenizer_from_json(payload["tokenizer"]), payload["meta"]
