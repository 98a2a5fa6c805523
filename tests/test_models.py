"""Models and tokenizers: loading, building, saving and reloading, all offline."""

import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mempos import models
from mempos.data import load_text
from mempos.errors import UsageError
from mempos.models import (
    END_OF_TEXT,
    encode,
    load_pretrained,
    small_gpt2,
    tokenizer_from_json,
    tokenizer_to_json,
    train_tokenizer,
)

SAMPLE = "The quick brown fox jumps over the lazy dog.\n\n  Naïve café — 日本語, tabs\tand 3.14 numbers!\n"


@pytest.fixture(scope="module")
def corpus():
    return load_text(None)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus.train, 4096)


def tiny_model(vocab_size: int, seed: int = 0):
    return small_gpt2(vocab_size, n_layer=1, n_head=2, n_embd=16, n_positions=64, seed=seed)


# --- tokenizers --------------------------------------------------------------


def test_trained_tokenizer_has_the_asked_vocab_and_gpt2_special_tokens(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 4096
    assert tokenizer.convert_tokens_to_ids(END_OF_TEXT) == 0
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == tokenizer.unk_token_id == 0


def test_tokenizer_round_trips_any_text(tokenizer, corpus):
    for text in (SAMPLE, corpus.eval[:20_000]):
        ids = encode(tokenizer, text)
        assert tokenizer.decode(ids) == text
    assert len(encode(tokenizer, corpus.eval[:20_000])) < 20_000 / 3  # it learned real merges


def test_tokenizer_training_is_deterministic(corpus):
    text = corpus.train[:200_000]
    first, second = train_tokenizer(text, 1000), train_tokenizer(text, 1000)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_tokenizer_vocab_must_hold_the_bytes():
    with pytest.raises(UsageError, match="at least 257"):
        train_tokenizer("some text", 100)


def test_encode_in_pieces_equals_encoding_the_whole_text(tokenizer, corpus):
    text = corpus.eval[:60_000] + "\n\n  trailing  spaces \n"
    assert len(list(models._pieces(text))) > 2
    assert encode(tokenizer, text) == tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert encode(tokenizer, "") == []


def test_save_pretrained_and_auto_tokenizer_reload_give_identical_ids(tokenizer, corpus, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = corpus.eval[:5_000] + SAMPLE
    assert encode(reloaded, text) == encode(tokenizer, text)
    assert reloaded(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    assert reloaded.eos_token == reloaded.pad_token == END_OF_TEXT


def test_json_round_trip_gives_identical_ids_and_special_tokens(tokenizer, corpus):
    restored = tokenizer_from_json(tokenizer_to_json(tokenizer))
    text = corpus.eval[:5_000] + SAMPLE
    assert encode(restored, text) == encode(tokenizer, text)
    assert restored.special_tokens_map == tokenizer.special_tokens_map
    assert restored.model_max_length == tokenizer.model_max_length


def test_unreadable_tokenizer_json():
    with pytest.raises(UsageError, match="stored tokenizer is unreadable"):
        tokenizer_from_json('{"tokenizer": "not a tokenizer"}')


# --- small GPT-2 ---------------------------------------------------------------


def test_small_gpt2_is_deterministic_per_seed_and_leaves_global_rng_alone():
    rng = torch.get_rng_state()
    a, b, c = tiny_model(300, seed=1), tiny_model(300, seed=1), tiny_model(300, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.h.0.attn.c_attn.weight"], sc["transformer.h.0.attn.c_attn.weight"])


def test_small_gpt2_config_and_forward():
    model = small_gpt2(300, n_layer=3, n_head=2, n_embd=32, n_positions=512, dropout=0.1)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size) == (3, 2, 32, 512, 300)
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.1
    assert cfg.eos_token_id == 0
    model.eval()
    with torch.no_grad():
        out = model(torch.randint(0, 300, (2, 10)), labels=torch.randint(0, 300, (2, 10)))
    assert out.logits.shape == (2, 10, 300)
    assert abs(out.loss.item() - torch.log(torch.tensor(300.0)).item()) < 0.5  # near-uniform at init


def test_small_gpt2_rejects_heads_that_do_not_divide_width():
    with pytest.raises(UsageError, match="divisible"):
        small_gpt2(300, n_head=3, n_embd=32)


# --- load_pretrained -----------------------------------------------------------


def test_load_pretrained_from_a_local_folder_gives_the_same_model(tmp_path):
    tok = train_tokenizer("a small text to train a small tokenizer on. " * 100, 300)
    model = tiny_model(len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_pretrained(str(tmp_path))
    ids = torch.tensor([encode(tok, "a small text to train")])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    assert encode(loaded_tok, SAMPLE) == encode(tok, SAMPLE)


def test_load_pretrained_sets_a_missing_pad_token_to_eos(tmp_path):
    tok = train_tokenizer("text for a tokenizer without padding. " * 100, 300)
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=END_OF_TEXT)
    tiny_model(len(tok)).save_pretrained(tmp_path)
    bare.save_pretrained(tmp_path)
    _, loaded_tok = load_pretrained(str(tmp_path))
    assert loaded_tok.pad_token == loaded_tok.eos_token == END_OF_TEXT


def test_load_pretrained_refuses_a_model_that_is_not_gpt2(tmp_path):
    config = LlamaConfig(
        vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="type 'llama': only GPT-2-family models are supported"):
        load_pretrained(str(tmp_path))


def test_load_pretrained_missing_folder_or_not_a_model_folder(tmp_path):
    with pytest.raises(UsageError, match="model folder not found: ./no-such-model"):
        load_pretrained("./no-such-model")
    with pytest.raises(UsageError, match="no config.json"):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize(("offline", "reason"), [(True, "offline mode is set"), (False, "no network")])
def test_unreachable_hub_model_fails_fast_naming_the_alternatives(monkeypatch, offline, reason):
    monkeypatch.setattr(models, "is_offline_mode", lambda: offline)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(UsageError, match=f"model 'mempos-test/not-a-model' \\({reason}.*--model .*--model scratch"):
        load_pretrained("mempos-test/not-a-model")
    assert time.monotonic() - start < 10
