"""The maths of the rotary layer and of the GPT-2 patch."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers import LlamaConfig

from mempos.encodings import EAGER, SDPA, Rotary, eager_attention, get_warp, rotate_half
from mempos.encodings.gpt2 import key_positions
from mempos.generation import greedy_decode

torch.manual_seed(0)


def scores(rotary, q, k, positions):
    """q.k after rotation for every query/key pair: (B, H, T, T)."""
    pos = torch.as_tensor(positions, dtype=torch.float32).expand(q.shape[0], -1)
    q_rot, k_rot = rotary.rotate(q, k, pos, pos)
    return q_rot @ k_rot.transpose(-1, -2)


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 32, generator=g, dtype=torch.float64), torch.randn(2, 3, 16, 32, generator=g, dtype=torch.float64)


def test_rotate_half_is_a_quarter_turn():
    x = torch.randn(5, 8)
    assert torch.allclose(rotate_half(rotate_half(x)), -x)
    assert torch.allclose((x * rotate_half(x)).sum(-1), torch.zeros(5), atol=1e-6)


def test_rope_scores_invariant_to_shift(qk):
    q, k = qk
    rope = Rotary(32, warp="linear").double()
    base = scores(rope, q, k, torch.arange(16))
    for shift in (1, 7, 1000):
        assert torch.allclose(scores(rope, q, k, torch.arange(16) + shift), base, atol=1e-4)


def test_log_warp_invariant_to_ratio_not_to_shift(qk):
    q, k = qk
    si = Rotary(32, warp="log1p").double()
    one_plus_i = torch.arange(16, dtype=torch.float64) + 1
    base = scores(si, q, k, one_plus_i - 1)
    for scale in (2.0, 3.5, 100.0):
        # angles are float32 by design, so agreement is to float32 precision
        assert torch.allclose(scores(si, q, k, scale * one_plus_i - 1), base, atol=1e-4)
    shifted = scores(si, q, k, one_plus_i - 1 + 10)
    assert (shifted - base).abs().max() > 1e-2


def test_log_warp_is_not_homogeneous():
    f = get_warp("log1p")
    i = torch.tensor([10.0, 1000.0])
    assert not torch.allclose(f(2 * i), 2 * f(i))
    # what holds instead: f(a i) ~ f(i) + log a for large i
    assert abs(f(torch.tensor(2e6)) - f(torch.tensor(1e6)) - math.log(2)) < 1e-6


@pytest.mark.parametrize("warp", ["linear", "log1p"])
def test_rotation_preserves_norms(qk, warp):
    q, k = qk
    rotary = Rotary(32, warp=warp).double()
    pos = torch.arange(16, dtype=torch.float64).expand(2, -1) * 37
    q_rot, k_rot = rotary.rotate(q, k, pos, pos)
    assert torch.allclose(q_rot.norm(dim=-1), q.norm(dim=-1))
    assert torch.allclose(k_rot.norm(dim=-1), k.norm(dim=-1))


def test_linear_rotary_equals_transformers_rope(qk):
    q, k = qk
    q, k = q.float(), k.float()
    config = LlamaConfig(hidden_size=32 * 3, num_attention_heads=3, max_position_embeddings=4096)
    reference = LlamaRotaryEmbedding(config)
    position_ids = torch.arange(16).expand(2, -1) + 500
    cos, sin = reference(q, position_ids)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    ours = Rotary(32, base=config.rope_parameters["rope_theta"], warp="linear")
    q_ours, k_ours = ours.rotate(q, k, position_ids.float(), position_ids.float())
    assert torch.allclose(q_ours, q_ref, atol=1e-5) and torch.allclose(k_ours, k_ref, atol=1e-5)


def test_angles_in_float32_for_low_precision_inputs():
    rotary = Rotary(16)
    cos, _ = rotary.cos_sin(torch.tensor([[100000.0]]), torch.bfloat16)
    exact = torch.cos(torch.tensor(100000.0) * rotary.inv_freq[0])
    assert cos.dtype == torch.bfloat16 and abs(cos[0, 0, 0, 0].float() - exact) < 1e-2


def test_negative_pad_positions_are_clamped():
    pos = key_positions(torch.tensor([[-3, -1, 0, 1]]), 4, "cpu")
    assert pos.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    rotary = Rotary(8, warp="log1p")
    cos, sin = rotary.cos_sin(torch.tensor([[-5.0, 2.0]]), torch.float32)
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()


# ---- the GPT-2 patch ---------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["rope", "si_rope"])
def test_patch_replaces_learned_positions(make_model, encoding):
    model = make_model(encoding)
    assert model.config._attn_implementation == SDPA
    ids = torch.randint(0, 97, (2, 40))
    before = model(ids).logits
    # positions beyond the old table no longer raise, and no absolute table remains
    assert not any("wpe" in name for name, _ in model.named_parameters())
    assert model(torch.randint(0, 97, (1, 300))).logits.shape[1] == 300
    # the output does not depend on the old position-embedding weights
    fresh = make_model("learned")
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    fresh.transformer.wpe.weight.data.normal_()
    from mempos.encodings import apply_encoding

    apply_encoding(fresh, encoding).eval()
    assert torch.allclose(fresh(ids).logits, before, atol=1e-6)


def test_rope_model_logits_invariant_to_position_shift(make_model):
    model = make_model("rope")
    ids = torch.randint(0, 97, (2, 30))
    base = model(ids).logits
    shifted = model(ids, token_positions=torch.arange(30) + 123).logits
    assert torch.allclose(base, shifted, atol=1e-5)


def test_si_rope_model_logits_invariant_to_ratio(make_model):
    model = make_model("si_rope")
    ids = torch.randint(0, 97, (2, 30))
    one_plus_i = torch.arange(30, dtype=torch.float32) + 1
    base = model(ids, token_positions=one_plus_i - 1).logits
    assert torch.allclose(model(ids, token_positions=4 * one_plus_i - 1).logits, base, atol=1e-4)
    assert (model(ids, token_positions=one_plus_i - 1 + 50).logits - base).abs().max() > 1e-3


@pytest.mark.parametrize("encoding", ["learned", "rope", "si_rope"])
@pytest.mark.parametrize("eager", [False, True])
def test_causal_mask_holds(make_model, encoding, eager):
    model = make_model(encoding)
    ids = torch.randint(0, 97, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 97
    if eager:
        with eager_attention(model):
            a, b = model(ids).logits, model(changed).logits
    else:
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :15], b[:, :15])
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


@pytest.mark.parametrize("encoding", ["learned", "rope", "si_rope"])
def test_eager_twin_matches_sdpa_and_returns_probabilities(make_model, encoding):
    model = make_model(encoding)
    ids = torch.randint(0, 97, (2, 20))
    sdpa = model(ids).logits
    with eager_attention(model):
        assert model.config._attn_implementation in (EAGER, "eager")
        out = model(ids, output_attentions=True)
    assert model.config._attn_implementation in (SDPA, "sdpa")
    assert torch.allclose(out.logits, sdpa, atol=1e-5)
    probs = out.attentions[0]
    assert probs.shape == (2, 4, 20, 20)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 20), atol=1e-5)
    assert probs.triu(1).abs().max() == 0


@pytest.mark.parametrize("encoding", ["learned", "rope", "si_rope"])
def test_cached_decoding_equals_recomputation(make_model, encoding):
    model = make_model(encoding)
    ids = torch.randint(0, 97, (3, 12))
    full = model(ids).logits
    # chunked prefill then one token at a time, all through the cache
    out = model(ids[:, :5], use_cache=True)
    cache, pieces = out.cache, [out.logits]
    out = model(ids[:, 5:9], cache=cache, use_cache=True)
    pieces.append(out.logits)
    for t in range(9, 12):
        out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
        pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)
    # and the greedy loop gives the same tokens with and without the cache
    assert torch.equal(greedy_decode(model, ids, 20), greedy_decode(model, ids, 20, use_cache=False))


def test_cached_decoding_with_explicit_positions(make_model):
    model = make_model("si_rope")
    ids = torch.randint(0, 97, (2, 10))
    positions = (torch.arange(10) * 3 + 5).expand(2, -1)
    full = model(ids, token_positions=positions).logits
    out = model(ids[:, :6], token_positions=positions[:, :6], use_cache=True)
    out2 = model(ids[:, 6:], cache=out.cache, use_cache=True, token_positions=positions)
    assert torch.allclose(out2.logits, full[:, 6:], atol=1e-5)
    with pytest.raises(ValueError, match="covers"):
        model(ids, token_positions=positions[:, :4])
