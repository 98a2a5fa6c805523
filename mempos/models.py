"""GPT-2-family models and byte-level BPE tokenizers, loaded or built in one place.

Experiments either load a pretrained GPT-2 (distilgpt2 in the full recipe) or
build a small GPT-2 and a tokenizer trained on the corpus itself; both paths
end in the same `GPT2LMHeadModel` class so the encodings patch applies to both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from mempos.data import hub_reachable
from mempos.errors import UsageError

END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
ENCODE_PIECE_CHARS = 1 << 14

# GPT-2's pre-tokenizer always cuts between a letter and a following " word",
# and no pre-token spans that cut, so text cut there encodes to exactly the
# ids of the whole text. Pieces let the Rust tokenizer work in parallel.
_SAFE_CUT = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")


# --- pretrained models -------------------------------------------------------


def load_pretrained(name_or_path: str) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """A GPT-2-family model and its tokenizer from a local folder, the HF cache, or the hub.

    The cache is tried without network first; the hub only after a quick probe,
    because `from_pretrained` otherwise retries for about 50 s before failing.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{name_or_path} has no config.json: expected a folder made by save_pretrained")
        return _load_or_explain(str(path), local_files_only=True)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise UsageError(f"model folder not found: {name_or_path}")
    try:
        return _load(name_or_path, local_files_only=True)
    except OSError:  # not (fully) in the local cache
        pass
    if is_offline_mode() or not hub_reachable():
        why = "offline mode is set (HF_HUB_OFFLINE)" if is_offline_mode() else "no network"
        raise UsageError(
            f"cannot reach the Hugging Face hub for model {name_or_path!r} ({why}) and it is not cached: "
            "pass --model a local save_pretrained folder, or --model scratch for the embedded small GPT-2"
        )
    return _load_or_explain(name_or_path, local_files_only=False)


def _load_or_explain(source: str, local_files_only: bool) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """`_load`, with library errors (missing files, bad weights, hub errors) as one line."""
    try:
        return _load(source, local_files_only)
    except UsageError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, EnvironmentError, HTTP errors...
        raise UsageError(f"cannot load model {source!r}: {' '.join(str(e).split())}") from e


def _load(source: str, local_files_only: bool) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Check the config is GPT-2 before reading any weights, then load tokenizer and model."""
    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    if config.model_type != "gpt2":
        raise UsageError(
            f"model {source!r} is of type {config.model_type!r}: only GPT-2-family models are supported"
        )
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer when the files are missing
        raise UsageError(f"model {source!r} has no usable tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    model = AutoModelForCausalLM.from_pretrained(source, config=config, local_files_only=local_files_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- small models and tokenizers trained here ----------------------------------


def small_gpt2(
    vocab_size: int,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    n_positions: int = 1024,
    seed: int = 0,
    dropout: float = 0.0,
    eos_token_id: int = 0,
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2, identical for the same arguments and seed.

    `n_positions` bounds the learned-position control model, so it must cover
    the longest evaluation length. `eos_token_id` 0 is `<|endoftext|>` in a
    `train_tokenizer` vocabulary. The global torch RNG is left as it was.
    """
    if n_embd % n_head:
        raise UsageError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on `text`, so the default needs no download.

    `<|endoftext|>` (id 0) serves as bos, eos, pad and unk, as in GPT-2.
    """
    if vocab_size < 257:
        raise UsageError(f"vocab_size must be at least 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_pieces(text), trainer)
    return _wrap(backend, {key: END_OF_TEXT for key in SPECIAL_TOKEN_KEYS})


def _wrap(backend: Tokenizer, special_tokens: dict[str, str], **kwargs) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a `tokenizers` one, savable with `save_pretrained`."""
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens, **kwargs)


def tokenizer_to_json(tokenizer: PreTrainedTokenizerFast) -> str:
    """Everything needed to rebuild the tokenizer, as one string to embed in a checkpoint."""
    specials = {key: str(value) for key, value in tokenizer.special_tokens_map.items() if key in SPECIAL_TOKEN_KEYS}
    return json.dumps(
        {
            "tokenizer": tokenizer.backend_tokenizer.to_str(),
            "special_tokens": specials,
            "model_max_length": tokenizer.model_max_length,
        }
    )


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """Inverse of `tokenizer_to_json`: same ids, same special tokens."""
    try:
        state = json.loads(text)
        backend = Tokenizer.from_str(state["tokenizer"])
        specials, max_length = state["special_tokens"], state["model_max_length"]
    except Exception as e:  # bad JSON, a missing key, or the plain Exception `tokenizers` raises
        raise UsageError(f"stored tokenizer is unreadable: {' '.join(str(e).split())}") from e
    return _wrap(backend, specials, model_max_length=max_length)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of a text of any size, equal to encoding it whole, without max-length warnings.

    Goes straight to the Rust tokenizer, in pieces cut where GPT-2's
    pre-tokenizer cuts anyway, so the pieces are encoded in parallel.
    """
    encodings = tokenizer.backend_tokenizer.encode_batch(list(_pieces(text)), add_special_tokens=False)
    return [i for encoding in encodings for i in encoding.ids]


def _pieces(text: str, size: int = ENCODE_PIECE_CHARS) -> Iterator[str]:
    """Consecutive pieces of about `size` characters, cut only at `_SAFE_CUT` points."""
    start = 0
    while start < len(text):
        cut = _SAFE_CUT.search(text, start + size)
        end = cut.start() if cut else len(text)
        yield text[start:end]
        start = end
