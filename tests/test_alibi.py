"""ALiBi (Press, Smith, Lewis 2022): head slopes, the bias, and what it does to attention."""

import math

import pytest
import torch
from torch import nn
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from mempos.encodings import ENCODINGS, eager_attention
from mempos.encodings.alibi import ALiBi, alibi_slopes  # importing registers "alibi"


def test_slopes_for_eight_heads_are_powers_of_one_half():
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    # n a power of two: m_h = 2^(-8h/n)
    assert torch.allclose(alibi_slopes(4), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256]))
    assert torch.allclose(alibi_slopes(16), torch.tensor([2 ** (-h / 2) for h in range(1, 17)]))


def test_slopes_for_twelve_heads_follow_the_reference_recipe():
    # closest power of two is 8: its slopes, then every other slope of 16 heads
    # (2^-0.5, 2^-1.5, ...) for the remaining 4 heads
    by_hand = [2.0**-h for h in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    assert torch.allclose(alibi_slopes(12), torch.tensor(by_hand))
    assert torch.allclose(alibi_slopes(12), _get_alibi_slopes(12, "cpu"))


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 7, 8, 12, 20, 25, 32, 48])
def test_slopes_match_bloom_and_mpt_references(n_heads):
    ours = alibi_slopes(n_heads)
    assert torch.allclose(ours, _get_alibi_slopes(n_heads, "cpu"), rtol=1e-6)
    # MPT's alibi row for two tokens is (-m_h, 0)
    mpt = -build_mpt_alibi_tensor(n_heads, 2)[:, 0, 0]
    assert torch.allclose(ours, mpt.float(), rtol=1e-6)


def test_bias_matrix_for_four_tokens_by_hand():
    alibi = ALiBi(8)
    pos = torch.arange(4, dtype=torch.float32)[None]
    bias = alibi.bias(pos, pos)
    assert bias.shape == (1, 8, 4, 4)
    # head 1, m = 1/2: -m * (i - j); above the diagonal is positive and masked later
    head1 = torch.tensor([
        [0.0, 0.5, 1.0, 1.5],
        [-0.5, 0.0, 0.5, 1.0],
        [-1.0, -0.5, 0.0, 0.5],
        [-1.5, -1.0, -0.5, 0.0],
    ])
    assert torch.equal(bias[0, 0], head1)
    # head 8, m = 1/256
    head8_causal = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],
        [-1 / 256, 0.0, 0.0, 0.0],
        [-2 / 256, -1 / 256, 0.0, 0.0],
        [-3 / 256, -2 / 256, -1 / 256, 0.0],
    ])
    assert torch.equal(bias[0, 7].tril(), head8_causal)


def test_bias_uses_positions_not_indices():
    alibi = ALiBi(2)  # slopes 1/16, 1/256
    q_pos = torch.tensor([[100.0]])
    k_pos = torch.tensor([[4.0, 36.0, 100.0]])
    bias = alibi.bias(q_pos, k_pos)
    assert torch.allclose(bias[0, 0, 0], torch.tensor([-96 / 16, -64 / 16, 0.0]))
    assert torch.allclose(bias[0, 1, 0], torch.tensor([-96 / 256, -64 / 256, 0.0]))


def test_single_axis_3d_positions_accepted_more_axes_refused():
    alibi = ALiBi(4)
    pos = torch.tensor([[0.0, 2.0, 9.0]])
    assert torch.equal(alibi.bias(pos[..., None], pos[..., None]), alibi.bias(pos, pos))
    with pytest.raises(ValueError, match="one position axis"):
        alibi.bias(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))


class _Layer(nn.Module):
    is_causal = True


@pytest.mark.parametrize("eager", [False, True])
def test_attention_with_zero_scores_is_softmax_of_bias(eager):
    """q = 0 makes every score 0, so probabilities are softmax(-m (i - j)) over j <= i."""
    alibi = ALiBi(1).double()  # m = 2^-8
    alibi.slopes = torch.tensor([0.5], dtype=torch.float64)  # a round slope for hand values
    q = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    k = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    v = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    pos = torch.arange(4, dtype=torch.float32)[None]
    mask = None if not eager else torch.zeros(1, 1, 4, 4, dtype=torch.float64).masked_fill(
        torch.ones(4, 4, dtype=torch.bool).triu(1), torch.finfo(torch.float64).min)
    out, probs = alibi.attend(_Layer(), q, k, v, mask, pos, pos, eager=eager, dropout=0.0, scaling=None)
    # query 3 sees keys 0..3 with logits -1.5, -1, -0.5, 0
    w = torch.tensor([math.exp(-1.5), math.exp(-1.0), math.exp(-0.5), 1.0], dtype=torch.float64)
    w = w / w.sum()
    assert torch.allclose(out[0, 3, 0], w @ v[0, 0], atol=1e-12)
    # query 1 sees keys 0, 1 with logits -0.5, 0
    w1 = torch.tensor([math.exp(-0.5), 1.0], dtype=torch.float64)
    assert torch.allclose(out[0, 1, 0], (w1 / w1.sum()) @ v[0, 0, :2], atol=1e-12)
    if eager:
        assert torch.allclose(probs[0, 0, 3], w, atol=1e-12)
        assert probs[0, 0].triu(1).abs().max() == 0
    else:
        assert probs is None


def test_single_query_through_cache_sees_all_keys_with_bias():
    """Decoding: one query (mask None), keys from a cache; the bias uses the query's own position."""
    alibi = ALiBi(1).double()
    alibi.slopes = torch.tensor([1.0], dtype=torch.float64)
    q = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    k = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)[None, None]
    q_pos, k_pos = torch.tensor([[2.0]]), torch.tensor([[0.0, 1.0, 2.0]])
    out, _ = alibi.attend(_Layer(), q, k, v, None, q_pos, k_pos, eager=False)
    w = torch.tensor([math.exp(-2.0), math.exp(-1.0), 1.0], dtype=torch.float64)
    assert torch.allclose(out[0, 0, 0], (w / w.sum()) @ v[0, 0], atol=1e-12)


def test_model_is_shift_invariant_and_position_sensitive(make_model):
    model = make_model("alibi")
    ids = torch.randint(0, 97, (2, 30))
    base = model(ids).logits
    for shift in (1, 123, 10_000):
        assert torch.allclose(model(ids, token_positions=torch.arange(30) + shift).logits, base, atol=1e-5)
    # stretching the distances does change the logits
    assert (model(ids, token_positions=torch.arange(30) * 2).logits - base).abs().max() > 1e-3


def test_registered_with_no_rotation_and_no_learned_positions(make_model):
    assert "alibi" in ENCODINGS and "Press" in ENCODINGS["alibi"].summary
    model = make_model("alibi")
    assert not any("wpe" in name for name, _ in model.named_parameters())
    encoding = model.transformer.h[0].attn.position_encoding
    assert isinstance(encoding, ALiBi) and encoding.slopes.tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16)
    pos = torch.arange(3.0)[None]
    q2, k2 = encoding.rotate(q, k, pos, pos)
    assert torch.equal(q2, q) and torch.equal(k2, k)


def test_eager_probabilities_in_model_match_bias(make_model):
    """Layer-0 probabilities of the eager twin equal softmax(q k^T / sqrt(d) - m (i - j)),
    recomputed here from the layer's own q and k."""
    model = make_model("alibi")
    ids = torch.randint(0, 97, (1, 10))
    with eager_attention(model):
        out = model(ids, output_attentions=True, output_hidden_states=True)
    attn = model.transformer.h[0].attn
    hidden = model.transformer.h[0].ln_1(out.hidden_states[0])
    q, k, _ = attn.c_attn(hidden).split(64, dim=2)
    q = q.view(1, 10, 4, 16).transpose(1, 2)
    k = k.view(1, 10, 4, 16).transpose(1, 2)
    i = torch.arange(10.0)
    slopes = torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256])
    logits = q @ k.transpose(-1, -2) / 4 - slopes[:, None, None] * (i[:, None] - i[None, :])
    logits = logits.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(out.attentions[0], logits.softmax(-1), atol=1e-6)
