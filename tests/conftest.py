import os

# Tests must never touch a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from mempos.encodings import apply_encoding  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one intra-op thread is as fast, and on a loaded 2-core
    machine torch's default pool oversubscribes and runs them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_model():
    """A tiny GPT-2 with the named encoding, deterministic per seed, in eval mode."""

    def make(encoding="rope", seed=0, n_positions=256, vocab_size=97):
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=64, n_positions=n_positions,
            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return apply_encoding(GPT2LMHeadModel(config), encoding).eval()

    return make
