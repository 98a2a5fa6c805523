"""Multi-axis rotary: per-axis relative properties, equality with plain rotary for one axis,
the frequency layouts of Qwen2-VL (sections) and Qwen3-VL (interleaved), and the GPT-2 patch
with 3-D positions."""

import pytest
import torch
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb as qwen2_apply
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb as qwen3_apply

from mempos.encodings import Rotary, apply_encoding, eager_attention
from mempos.encodings.gpt2 import key_positions
from mempos.encodings.multiaxis import MultiAxisRotary, axis_of_pairs
from mempos.encodings.warps import SplineWarp
from mempos.generation import greedy_decode

AXES = ("local", "slot", "module")


def scores(rotary, q, k, positions):
    """q.k after rotation for every query/key pair: (B, H, T, T)."""
    q_rot, k_rot = rotary.rotate(q, k, positions, positions)
    return q_rot @ k_rot.transpose(-1, -2)


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 12, 32, generator=g, dtype=torch.float64),
            torch.randn(2, 3, 12, 32, generator=g, dtype=torch.float64))


@pytest.fixture
def positions():
    g = torch.Generator().manual_seed(2)
    local = torch.arange(12.0)
    slot = torch.randint(0, 40, (12,), generator=g).float()
    module = torch.randint(0, 4, (12,), generator=g).float()
    return torch.stack([local, slot, module], -1).expand(2, 12, 3)


# ---- the maths -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sections", "interleaved"])
def test_linear_axes_are_each_shift_invariant(qk, positions, layout):
    q, k = qk
    rotary = MultiAxisRotary(32, axes=AXES, layout=layout).double()
    base = scores(rotary, q, k, positions)
    for axis in range(3):
        for shift in (1.0, 17.0, 1000.0):
            moved = positions.clone()
            moved[..., axis] += shift
            assert torch.allclose(scores(rotary, q, k, moved), base, atol=1e-4)
    # but moving one token's slot (not the whole axis) changes the scores
    moved = positions.clone()
    moved[:, 5, 1] += 3
    assert (scores(rotary, q, k, moved) - base).abs().max() > 1e-2


def test_log1p_axis_is_ratio_invariant_not_shift_invariant(qk, positions):
    q, k = qk
    rotary = MultiAxisRotary(32, axes=AXES, warps={"slot": "log1p"}).double()
    assert rotary.warp_names == ["linear", "log1p", "linear"]
    base = scores(rotary, q, k, positions)
    for scale in (2.0, 7.5):
        scaled = positions.clone()
        scaled[..., 1] = scale * (1 + positions[..., 1]) - 1
        assert torch.allclose(scores(rotary, q, k, scaled), base, atol=1e-4)
    shifted = positions.clone()
    shifted[..., 1] += 10
    assert (scores(rotary, q, k, shifted) - base).abs().max() > 1e-2
    shifted = positions.clone()
    shifted[..., 0] += 10  # the local axis is still linear
    assert torch.allclose(scores(rotary, q, k, shifted), base, atol=1e-4)


@pytest.mark.parametrize("warp", ["linear", "log1p", "spline"])
def test_single_axis_equals_plain_rotary_exactly(warp):
    if warp == "spline":
        shared = SplineWarp()
        with torch.no_grad():
            shared.raw_slopes.normal_()
        plain, multi = Rotary(32, warp=shared), MultiAxisRotary(32, axes=("local",), warps=shared)
    else:
        plain, multi = Rotary(32, warp=warp), MultiAxisRotary(32, axes=("local",), warps=warp)
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 20, 32, generator=g), torch.randn(2, 3, 20, 32, generator=g)
    pos = (torch.rand(2, 20, generator=g) * 5000).floor()
    with torch.no_grad():
        expected = plain.rotate(q, k, pos, pos)
        for given in (pos, pos[..., None]):  # (B, T) and (B, T, 1)
            got = multi.rotate(q, k, given, given)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_changing_one_axis_changes_only_its_pairs(positions):
    for layout in ("sections", "interleaved"):
        rotary = MultiAxisRotary(32, axes=AXES, sections=[6, 5, 5], layout=layout)
        cos, sin = rotary.cos_sin(positions, torch.float32)
        for axis, name in enumerate(AXES):
            moved = positions.clone()
            moved[..., axis] += torch.arange(1.0, 13.0)  # a different change for every token
            cos2, sin2 = rotary.cos_sin(moved, torch.float32)
            changed = ((cos2 != cos) | (sin2 != sin)).flatten(0, 2).any(0)  # per dimension
            owned = torch.zeros(16, dtype=torch.bool)
            owned[rotary.pairs_of(name)] = True
            assert torch.equal(changed, torch.cat([owned, owned])), (layout, name)


def test_frequency_layouts():
    assert axis_of_pairs(8, [3, 3, 2], "sections").tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert axis_of_pairs(8, [3, 3, 2], "interleaved").tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    # explicit sizes in the interleaved layout: axis a >= 1 takes a, a + A, ...; axis 0 the rest
    assert axis_of_pairs(8, [4, 2, 2], "interleaved").tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    assert MultiAxisRotary(16, axes=("a", "b", "c")).sections == [3, 3, 2]
    with pytest.raises(ValueError, match="summing to 8"):
        axis_of_pairs(8, [4, 4, 4], "sections")
    with pytest.raises(ValueError, match="cannot own"):
        axis_of_pairs(8, [2, 1, 5], "interleaved")
    with pytest.raises(ValueError, match="layout"):
        MultiAxisRotary(16, axes=("a", "b"), layout="spiral")
    with pytest.raises(ValueError, match="distinct"):
        MultiAxisRotary(16, axes=("a", "a"))
    with pytest.raises(ValueError, match="unknown axes"):
        MultiAxisRotary(16, axes=("a", "b"), warps={"c": "log1p"})


# ---- against transformers' Qwen2-VL and Qwen3-VL ---------------------------------------------------


QWEN = {
    "sections": (Qwen2VLTextConfig, Qwen2VLRotaryEmbedding, qwen2_apply, [4, 6, 6]),
    "interleaved": (Qwen3VLTextConfig, Qwen3VLTextRotaryEmbedding, qwen3_apply, [6, 5, 5]),
}


@pytest.mark.parametrize("layout", list(QWEN))
def test_layout_and_rotation_match_qwen_vl(layout):
    config_class, rotary_class, apply, sections = QWEN[layout]
    config = config_class(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                          rope_parameters={"rope_type": "default", "mrope_section": sections, "rope_theta": 10000.0})
    reference = rotary_class(config)
    ours = MultiAxisRotary(32, axes=("t", "h", "w"), sections=sections, layout=layout)
    # which axis owns each pair: feed transformers' recomposition the axis number itself
    owner = torch.arange(3.0)[:, None].expand(3, 16).clone()
    assert reference.recomposition_frequencies(owner)[:16].long().tolist() == ours.axis_of_pair.tolist()
    # and the rotated q, k for random (t, h, w) positions
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 2, 9, 32, generator=g), torch.randn(2, 2, 9, 32, generator=g)
    pos = torch.randint(0, 60, (2, 9, 3), generator=g)
    cos, sin = reference(q, pos.permute(2, 0, 1))  # transformers takes (3, B, T)
    q_ref, k_ref = apply(q, k, cos, sin)
    q_ours, k_ours = ours.rotate(q, k, pos.float(), pos.float())
    assert torch.allclose(q_ours, q_ref, atol=2e-6) and torch.allclose(k_ours, k_ref, atol=2e-6)


def test_default_interleaved_layout_is_qwen3_for_its_default_sections():
    """Qwen3-VL's [24, 20, 20] on 64 pairs is the rule used here, and our round robin for 3 axes."""
    config = Qwen3VLTextConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=128)
    reference = Qwen3VLTextRotaryEmbedding(config)
    assert reference.mrope_section == [24, 20, 20]
    owner = reference.recomposition_frequencies(torch.arange(3.0)[:, None].expand(3, 64).clone())[:64].long()
    assert torch.equal(owner, axis_of_pairs(64, [24, 20, 20], "interleaved"))
    assert torch.equal(owner[:60], MultiAxisRotary(128, axes=AXES, layout="interleaved").axis_of_pair[:60])


# ---- positions in the patch ------------------------------------------------------------------------


def test_key_positions_accepts_axes():
    pos = key_positions(torch.tensor([[[0, 3], [1, -2], [2, 5]]]), 3, "cpu")
    assert pos.shape == (1, 3, 2) and pos.dtype == torch.float32 and pos[0, 1].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="covers 3 tokens but attention sees 4"):
        key_positions(torch.zeros(1, 3, 2), 4, "cpu")
    assert key_positions(torch.zeros(2, 4), 4, "cpu").shape == (2, 4)  # 2-D stays one axis
    with pytest.raises(ValueError, match="shape"):
        key_positions(torch.zeros(1, 1, 4, 2), 4, "cpu")


def test_two_dimensional_positions_mean_axis_zero(positions):
    rotary = MultiAxisRotary(32, axes=AXES, layout="interleaved")
    local = positions[..., 0]
    padded = torch.stack([local, torch.zeros_like(local), torch.zeros_like(local)], -1)
    assert torch.equal(rotary.cos_sin(local, torch.float32)[1], rotary.cos_sin(padded, torch.float32)[1])
    with pytest.raises(ValueError, match=r"\(B, T, 3\)"):
        rotary.cos_sin(positions[..., :2], torch.float32)
    with pytest.raises(ValueError, match="rope_multiaxis"):
        Rotary(32).cos_sin(positions, torch.float32)


# ---- through the patched GPT-2 ---------------------------------------------------------------------------


def multiaxis_model(make_model, **options):
    return apply_encoding(make_model("learned"), "rope_multiaxis", **options)


def token_positions(batch=2, length=14):
    """local 0..T-1, a memory slot per chunk of 4 tokens, module 2, program counter every 3 tokens."""
    local = torch.arange(length)
    return torch.stack([local, 7 + local // 4, torch.full_like(local, 2), local // 3], -1).expand(batch, -1, -1)


def next_token_position(pos):
    """local +1, same slot and module, program counter +1."""
    return pos[:, -1:] + torch.tensor([1, 0, 0, 1])


OPTIONS = [
    {"axes": ["local", "slot", "module", "pc"], "layout": "sections"},
    {"axes": ["local", "slot", "module", "pc"], "layout": "interleaved", "warps": {"slot": "log1p"}},
    {"axes": ["local", "slot", "module", "pc"], "sections": [2, 2, 2, 2], "warps": {"local": "spline"}},
]


@pytest.mark.parametrize("options", OPTIONS, ids=["sections", "interleaved", "spline"])
def test_multiaxis_model_is_causal_and_caches_exactly(make_model, options):
    model = multiaxis_model(make_model, **options)
    ids = torch.randint(0, 97, (2, 14))
    pos = token_positions()
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 97
    with torch.no_grad():
        full = model(ids, token_positions=pos).logits
        assert torch.equal(model(changed, token_positions=pos).logits[:, :9], full[:, :9])
        with eager_attention(model):
            eager = model(changed, token_positions=pos).logits
        assert torch.allclose(eager[:, :9], full[:, :9], atol=1e-5)
        # the slot axis matters
        other_slot = pos.clone()
        other_slot[:, :, 1] = 0
        assert (model(ids, token_positions=other_slot).logits - full).abs().max() > 1e-4
        # chunked prefill and one-token steps through the cache equal the full forward
        out = model(ids[:, :6], token_positions=pos[:, :6], use_cache=True)
        pieces = [out.logits]
        out = model(ids[:, 6:10], cache=out.cache, use_cache=True, token_positions=pos[:, :10])
        pieces.append(out.logits)
        for t in range(10, 14):
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True, token_positions=pos[:, :t + 1])
            pieces.append(out.logits)
        assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)
    cached = greedy_decode(model, ids, 4, positions=pos, step=next_token_position)
    assert torch.equal(cached, greedy_decode(model, ids, 4, positions=pos, step=next_token_position, use_cache=False))


def test_single_axis_model_equals_rope_model(make_model):
    rope, multi = make_model("rope"), make_model("rope_multiaxis")
    ids = torch.randint(0, 97, (2, 16))
    pos = torch.arange(16) * 5 + 3
    with torch.no_grad():
        assert torch.equal(multi(ids, token_positions=pos).logits, rope(ids, token_positions=pos).logits)
        assert torch.equal(multi(ids, token_positions=pos[None, :, None]).logits,
                           rope(ids, token_positions=pos).logits)


def test_learnable_axis_warp_trains_and_is_saved(make_model):
    model = multiaxis_model(make_model, axes=["local", "slot"], warps={"slot": "spline"}).train()
    pos = token_positions()[..., :2] * torch.tensor([1, 50])
    ids = torch.randint(0, 97, (2, 14))
    model(ids, labels=ids, token_positions=pos).loss.backward()
    spline = model.transformer.h[0].attn.position_encoding.warps["slot"]
    assert spline.raw_slopes.grad is not None and (spline.raw_slopes.grad != 0).any()
    assert "transformer.h.0.attn.position_encoding.warps.slot.raw_slopes" in model.state_dict()
