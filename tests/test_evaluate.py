"""Evaluation numbers checked against values worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from mempos.encodings import apply_encoding
from mempos.experiments import evaluate
from mempos.experiments.evaluate import (
    attention_entropy_curves,
    entropy_bits,
    evaluate_variant,
    generation_stats,
    needle_attention_mass,
    normalise_entropy,
    perplexity,
    repetition_rate,
    summarise_curves,
)

VOCAB = 64


def tiny_model(encoding: str = "rope", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=256,
                        bos_token_id=0, eos_token_id=0)
    return apply_encoding(GPT2LMHeadModel(config), encoding)


def blind_attention(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Zero the query and key projections: every score is 0, attention is uniform over visible keys."""
    width = model.config.n_embd
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :2 * width] = 0
            block.attn.c_attn.bias[:2 * width] = 0
    return model


def needle(chunk_index: int, token_index: int, length: int) -> SimpleNamespace:
    return SimpleNamespace(chunk_index=chunk_index, token_index=token_index, length=length)


class UniformLogits(nn.Module):
    """Stands in for a language model whose every prediction is uniform over the vocabulary."""

    def forward(self, ids):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, VOCAB))


def test_entropy_bits_hand_values():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]])
    assert entropy_bits(probs).tolist() == pytest.approx([2.0, 0.0, 1.5])
    assert not torch.isnan(entropy_bits(probs)).any()
    assert entropy_bits(probs.T, dim=0).tolist() == pytest.approx([2.0, 0.0, 1.5])


def test_normalised_entropy_of_uniform_causal_attention_is_one():
    length = 6
    causal = torch.tril(torch.ones(length, length))
    uniform = causal / causal.sum(-1, keepdim=True)
    normalised = normalise_entropy(entropy_bits(uniform))
    assert math.isnan(normalised[0])
    assert normalised[1:] == pytest.approx(np.ones(length - 1))


def test_perplexity_of_uniform_predictions_is_vocab_size():
    chunks = torch.randint(0, VOCAB, (5, 9))
    assert perplexity(UniformLogits(), chunks, batch_size=2) == pytest.approx(VOCAB)


def test_perplexity_restores_training_mode():
    model = tiny_model()
    model.train()
    perplexity(model, torch.randint(0, VOCAB, (2, 8)), batch_size=2)
    assert model.training


def test_entropy_curves_of_blind_attention_are_log2_of_visible_keys():
    model = blind_attention(tiny_model())
    curves = attention_entropy_curves(model, torch.randint(0, VOCAB, (3, 10)), batch_size=2)
    assert curves["raw"].shape == (2, 2, 10)
    assert curves["raw"] == pytest.approx(np.broadcast_to(np.log2(np.arange(1, 11)), (2, 2, 10)), abs=1e-5)
    assert curves["normalised"][..., 1:] == pytest.approx(np.ones((2, 2, 9)), abs=1e-5)
    assert model.config._attn_implementation == "mempos_sdpa"


def test_needle_mass_of_blind_attention_equals_uniform_baseline():
    model = blind_attention(tiny_model())
    chunks = torch.randint(0, VOCAB, (2, 12))
    records = [needle(1, 2, 3), needle(0, 4, 2)]  # out of chunk order on purpose: rows follow the records
    result = needle_attention_mass(model, chunks, records, batch_size=1, train_len=8)
    # chunk 0: needle 4..5, queries 6..11 see 2/(q+1); chunk 1: needle 2..4, queries 5..11 see 3/(q+1)
    chunk0 = {q: 2 / (q + 1) for q in range(6, 12)}
    chunk1 = {q: 3 / (q + 1) for q in range(5, 12)}
    shares = list(chunk0.items()) + list(chunk1.items())
    expected = np.mean([s for _, s in shares])
    inside = np.mean([s for q, s in shares if q < 8])
    beyond = np.mean([s for q, s in shares if q >= 8])
    assert result["needle_mass_uniform"] == pytest.approx(expected)
    assert result["needle_mass"] == pytest.approx(expected, abs=1e-6)
    assert result["needle_mass_inside"] == pytest.approx(inside, abs=1e-6)
    assert result["needle_mass_beyond"] == pytest.approx(beyond, abs=1e-6)
    assert result["needle_mass_uniform_beyond"] == pytest.approx(beyond)
    assert result["needle_mass_heads"] == pytest.approx(np.full((2, 2), expected), abs=1e-6)


def test_needle_mass_on_hand_built_attention(monkeypatch):
    """Needle at keys 1..2 of a 6-token chunk; queries 3, 4, 5 come after it."""
    length = 6
    on_key_one = torch.zeros(length, length)
    on_key_one[:, 1] = 1.0  # head 0: every query puts all its mass on key 1 (a needle token)
    on_previous = torch.zeros(length, length)
    on_previous[torch.arange(1, length), torch.arange(length - 1)] = 1.0  # head 1: query q on key q - 1
    probs = torch.stack([on_key_one, on_previous])[None, None]  # (layers 1, B 1, heads 2, T, T)
    chunks = torch.zeros(1, length, dtype=torch.long)
    monkeypatch.setattr(evaluate, "attention_maps", lambda model, chunks, batch_size: iter([(chunks, probs)]))
    result = evaluate.needle_attention_mass(None, chunks, [needle(0, 1, 2)], batch_size=1, train_len=5)
    # head 0: 1, 1, 1; head 1: query 3 -> key 2 (needle) 1, queries 4, 5 -> 0
    assert result["needle_mass"] == pytest.approx((3 + 1) / 6)
    assert result["needle_mass_inside"] == pytest.approx((2 + 1) / 4)
    assert result["needle_mass_beyond"] == pytest.approx(1 / 2)
    assert result["needle_mass_heads"] == pytest.approx(np.array([[1.0, 1 / 3]]))
    assert result["needle_mass_uniform"] == pytest.approx((2 / 4 + 2 / 5 + 2 / 6) / 3)


def test_needle_mass_uses_only_chunks_with_a_needle(monkeypatch):
    """Chunk 1 has no record and must not be attended; chunk 2 carries needle (2, 2)."""
    seen = []

    def fake_maps(model, rows, batch_size):
        seen.append(rows.clone())
        probs = torch.zeros(1, rows.shape[0], 1, 6, 6)
        probs[..., 2] = 1.0  # every query puts everything on key 2
        return iter([(rows, probs)])

    monkeypatch.setattr(evaluate, "attention_maps", fake_maps)
    chunks = torch.arange(18).reshape(3, 6)
    result = evaluate.needle_attention_mass(None, chunks, [needle(2, 2, 2), needle(0, 4, 1)], 4, train_len=6)
    assert torch.equal(seen[0], chunks[[2, 0]])
    # chunk 2: key 2 is in its needle (queries 4, 5 -> 1 each); chunk 0: needle is key 4 (query 5 -> 0)
    assert result["needle_mass"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="distinct chunks"):
        needle_attention_mass(None, chunks, [needle(0, 1, 2), needle(0, 3, 1)], 2, 4)


def test_repetition_rate_hand_values():
    assert repetition_rate(list(range(10))) == 0.0
    # period-4 loop of length 12: 9 four-grams, the first 4 new, the other 5 repeats
    assert repetition_rate([1, 2, 3, 4] * 3) == pytest.approx(5 / 9)
    # bigrams of 1 1 1 2: (1,1) (1,1) (1,2) -> one repeat out of three
    assert repetition_rate(torch.tensor([1, 1, 1, 2]), n=2) == pytest.approx(1 / 3)
    assert math.isnan(repetition_rate([1, 2, 3]))


def test_summarise_curves_on_synthetic_array():
    raw = np.zeros((2, 3, 6))
    raw[..., :4] = 1.0
    raw[..., 4:] = 3.0
    raw[0, 0, 5] = 5.0  # one head out of six at one position: beyond mean = (3*11 + 5) / 12
    normalised = np.full((2, 3, 6), 0.5)
    normalised[..., 0] = np.nan
    normalised[..., 4:] = 0.25
    summary = summarise_curves({"raw": raw, "normalised": normalised}, train_len=4)
    assert summary == pytest.approx({
        "entropy_raw_inside": 1.0,
        "entropy_raw_beyond": (3 * 11 + 5) / 12,
        "entropy_norm_inside": 0.5,
        "entropy_norm_beyond": 0.25,
    })
    beyond_nothing = summarise_curves({"raw": raw, "normalised": normalised}, train_len=6)
    assert math.isnan(beyond_nothing["entropy_norm_beyond"])


def test_generation_stats_measures_generated_and_reference_text():
    model = tiny_model()
    chunks = torch.tensor([[1, 2, 3, 4] * 4, list(range(16))])
    scalars, curves = generation_stats(model, chunks, prompt_len=4, batch_size=2, train_len=8)
    reference = (repetition_rate(chunks[0, 4:]) + repetition_rate(chunks[1, 4:])) / 2
    assert scalars["repetition_reference"] == pytest.approx(reference)
    assert 0.0 <= scalars["repetition_generated"] <= 1.0
    assert curves["generated_raw"].shape == (2, 2, 16)
    assert np.isfinite(scalars["generated_entropy_norm_beyond"])


SCALAR_KEYS = {
    "ppl_train_len", "ppl_eval_len", "ppl_16", "ppl_32",
    "entropy_raw_inside", "entropy_raw_beyond", "entropy_norm_inside", "entropy_norm_beyond",
    "needle_mass", "needle_mass_inside", "needle_mass_beyond", "needle_mass_uniform",
    "repetition_generated", "repetition_reference",
    "generated_entropy_norm_inside", "generated_entropy_norm_beyond",
}


def test_evaluate_variant_on_tiny_rope_model():
    model = tiny_model("si_rope")
    model.train()
    before = model.config._attn_implementation
    ids = torch.randint(0, VOCAB, (100,))
    needle_chunks = torch.randint(0, VOCAB, (2, 32))
    records = [needle(0, 3, 4), needle(1, 20, 4)]
    messages: list[str] = []
    scalars, curves = evaluate_variant(
        model, eval_text_ids=ids, needle_chunks=needle_chunks, needle_records=records,
        train_len=16, eval_len=32, batch_size=2, n_generate=2, prompt_len=8, progress=messages.append,
    )
    assert SCALAR_KEYS <= set(scalars)
    assert all(np.isfinite(scalars[key]) for key in SCALAR_KEYS)
    assert scalars["ppl_16"] == scalars["ppl_train_len"]
    # both perplexities use the same 96 tokens (3 chunks of 32)
    assert scalars["ppl_train_len"] == pytest.approx(perplexity(model, ids[:96].reshape(6, 16), 2))
    assert scalars["ppl_eval_len"] == pytest.approx(perplexity(model, ids[:96].reshape(3, 32), 2))
    assert set(curves) == {"raw", "normalised", "generated_raw", "generated_normalised", "needle_mass_heads"}
    assert curves["raw"].shape == (2, 2, 32) and curves["needle_mass_heads"].shape == (2, 2)
    assert messages and model.training and model.config._attn_implementation == before


def test_evaluate_variant_refuses_learned_model_beyond_its_positions():
    from mempos.errors import UsageError

    model = tiny_model("learned")
    with pytest.raises(UsageError, match="n_positions=256"):
        evaluate_variant(
            model, eval_text_ids=torch.zeros(600, dtype=torch.long), needle_chunks=torch.zeros(1, 300, dtype=torch.long),
            needle_records=[needle(0, 1, 2)], train_len=128, eval_len=300, batch_size=1, n_generate=1, prompt_len=4,
        )
