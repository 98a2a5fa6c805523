"""Warps (power, learnable spline), frequency schedules from transformers, p-RoPE,
and the new registered rotary encodings through the patched GPT-2."""

import contextlib
import math
import re

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from mempos.encodings import ENCODINGS, Rotary, apply_encoding, eager_attention, get_warp
from mempos.encodings.warps import WARPS, PowerWarp, SplineWarp
from mempos.generation import greedy_decode

NEW_ENCODINGS = ["rope_power", "rope_spline", "rope_linear_pi", "rope_ntk", "rope_yarn", "rope_llama3",
                 "p_rope", "rope_multiaxis"]


# ---- warps -----------------------------------------------------------------------------


def test_power_warp_values_by_hand():
    f = get_warp("power", beta=0.5)
    assert isinstance(f, PowerWarp) and f.beta == 0.5
    assert f(torch.tensor([0.0, 1.0, 4.0, 9.0, 100.0])).tolist() == [0.0, 1.0, 2.0, 3.0, 10.0]
    cube = get_warp("power", beta=1 / 3)
    assert torch.allclose(cube(torch.tensor([8.0, 27.0, 1000.0])), torch.tensor([2.0, 3.0, 10.0]))
    x = torch.arange(50.0)
    assert torch.equal(get_warp("power", beta=1.0)(x), x)
    assert get_warp("power")(torch.tensor(16.0)).item() == 4.0  # default beta 0.5
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="beta"):
            get_warp("power", beta=bad)


def test_get_warp_api():
    assert get_warp("linear") is WARPS["linear"] and get_warp("log1p") is WARPS["log1p"]
    a, b = get_warp("spline"), get_warp("spline")
    assert isinstance(a, SplineWarp) and a is not b  # factories give fresh, independent modules
    with pytest.raises(TypeError, match="takes no options"):
        get_warp("log1p", beta=2)
    with pytest.raises(KeyError, match="unknown warp"):
        get_warp("cubic")


@pytest.mark.parametrize("init,reference", [("log1p", torch.log1p), ("linear", lambda x: x)])
def test_spline_init_reproduces_its_warp_exactly(init, reference):
    spline = SplineWarp(init=init)
    last_knot = spline.knots[-1].item()
    g = torch.Generator().manual_seed(0)
    positions = torch.cat([
        torch.arange(0, 20000, dtype=torch.float32),                 # every integer, inside and past the knots
        torch.rand(5000, generator=g) * 3 * last_knot,               # fractional positions
        torch.tensor([1e5, 1e6, 5e6, 1.6e7]),                        # far beyond the last knot
    ])
    with torch.no_grad():
        assert torch.equal(spline(positions), reference(positions))
        # and through the rotary layer: the spline-at-init rotary is the plain rotary
        pos = positions[None, :4000]
        assert torch.equal(Rotary(16, warp=spline).cos_sin(pos, torch.float32)[0],
                           Rotary(16, warp=init).cos_sin(pos, torch.float32)[0])


@pytest.mark.parametrize("init", ["log1p", "linear"])
def test_spline_is_monotone_for_random_parameters(init):
    g = torch.Generator().manual_seed(3)
    grid = torch.cat([torch.linspace(0, 100, 20001, dtype=torch.float64),
                      torch.logspace(2, 7, 20001, dtype=torch.float64)]).unique()  # sorted, far beyond the knots
    for trial in range(5):
        spline = SplineWarp(init=init)
        with torch.no_grad():
            spline.raw_slopes.copy_(torch.randn(spline.raw_slopes.shape, generator=g) * 2)
        with torch.no_grad():
            f64 = spline.double()(grid)
            assert (f64.diff() > 0).all(), "strictly increasing in float64"
            f32 = spline.float()(grid.float())
            assert (f32.diff() >= 0).all(), "never decreasing as evaluated in float32"
            # beyond the last knot f continues linearly in the coordinate, with the tail slope: no clipping
            last = spline.knots[-1].double()
            last_position = last.expm1() if init == "log1p" else last
            far = last_position * torch.tensor([2.0, 10.0, 1000.0], dtype=torch.float64)
            spline.double()
            tail = spline.raw_slopes[-1].exp()
            assert torch.allclose(spline(far).diff(), tail * spline.coordinate(far).diff(), rtol=1e-9)


def test_rotary_holds_a_module_warp_as_a_submodule():
    rotary = Rotary(16, warp="spline", warp_options={"init": "linear", "n_knots": 8})
    names = [name for name, _ in rotary.named_parameters()]
    assert names == ["warp.raw_slopes"] and rotary.warp.raw_slopes.shape == (8,)
    assert "warp=spline" in repr(rotary)


def test_spline_trains_through_gpt2_and_survives_a_state_dict_round_trip(make_model, tmp_path):
    model = make_model("rope_spline").train()
    splines = [block.attn.position_encoding.warp for block in model.transformer.h]
    assert len({id(s) for s in splines}) == 2 and all(isinstance(s, SplineWarp) for s in splines)
    ids = torch.randint(0, 97, (2, 40))
    positions = (torch.arange(40) * 60).expand(2, -1)  # spread over many knots (up to log1p(2340) = 7.8)
    loss = model(ids, labels=ids, token_positions=positions).loss
    loss.backward()
    for spline in splines:
        grad = spline.raw_slopes.grad
        assert grad is not None and torch.isfinite(grad).all() and (grad != 0).sum() >= 10
    optimizer = torch.optim.SGD([s.raw_slopes for s in splines], lr=1.0)
    optimizer.step()
    assert all((s.raw_slopes != 0).any() for s in splines)
    model.eval()
    with torch.no_grad():
        trained = model(ids, token_positions=positions).logits
    state = model.state_dict()
    assert "transformer.h.1.attn.position_encoding.warp.raw_slopes" in state
    torch.save(state, tmp_path / "model.pt")
    fresh = make_model("rope_spline", seed=1)
    with torch.no_grad():
        assert (fresh(ids, token_positions=positions).logits - trained).abs().max() > 1e-3
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids, token_positions=positions).logits, trained)


# ---- frequency schedules vs transformers --------------------------------------------------

D, H = 16, 2
SHORT = [1.0 + 0.1 * k for k in range(D // 2)]
LONG = [1.0 + 0.5 * k for k in range(D // 2)]
SCHEDULES = {
    # ours: scaling dict given to Rotary; transformers: rope_parameters and max_position_embeddings
    "linear": ({"rope_type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}, 2048),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 128},
                {"rope_type": "dynamic", "factor": 4.0}, 128),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, 512),
    "llama3": ({"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 128,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0},
               {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 128,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 512),
    "longrope": ({"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 128,
                  "short_factor": SHORT, "long_factor": LONG},
                 {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 128,
                  "short_factor": SHORT, "long_factor": LONG}, 512),
}


def reference(rope_type, base=10000.0):
    _, params, max_len = SCHEDULES[rope_type]
    config = LlamaConfig(hidden_size=D * H, num_attention_heads=H, max_position_embeddings=max_len,
                         rope_parameters=dict(params, rope_theta=base))
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("length", [100, 300])  # inside and beyond the original 128 positions
@pytest.mark.parametrize("rope_type", list(SCHEDULES))
def test_schedules_equal_transformers_rotary(rope_type, length):
    ours = Rotary(D, scaling=SCHEDULES[rope_type][0])
    ref = reference(rope_type)
    g = torch.Generator().manual_seed(length)
    q, k = torch.randn(2, H, length, D, generator=g), torch.randn(2, H, length, D, generator=g)
    position_ids = torch.arange(length).expand(2, -1)
    cos, sin = ref(q, position_ids)  # dynamic / longrope update ref.inv_freq for this length here
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    pos = position_ids.float()
    assert torch.equal(ours.frequencies(pos), ref.inv_freq)
    assert ours.attention_scaling == ref.attention_scaling
    q_ours, k_ours = ours.rotate(q, k, pos, pos)
    assert torch.allclose(q_ours, q_ref, atol=1e-6) and torch.allclose(k_ours, k_ref, atol=1e-6)


def test_schedules_change_frequencies_as_published():
    plain = Rotary(D).inv_freq
    assert torch.allclose(Rotary(D, scaling=SCHEDULES["linear"][0]).inv_freq, plain / 4)
    yarn = Rotary(D, scaling=SCHEDULES["yarn"][0])
    assert yarn.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert torch.allclose(yarn.inv_freq[0], plain[0]) and torch.allclose(yarn.inv_freq[-1], plain[-1] / 4)
    ntk = Rotary(D, scaling=SCHEDULES["dynamic"][0])
    assert torch.equal(ntk.frequencies(torch.arange(128.0)[None]), ntk.inv_freq)  # no change within L0
    longer = ntk.frequencies(torch.arange(512.0)[None])
    new_base = 10000.0 * (4 * 512 / 128 - 3) ** (D / (D - 2))
    assert torch.allclose(longer, new_base ** (-torch.arange(0, D, 2) / D), rtol=1e-5)


def test_dynamic_ntk_follows_transformers_as_lengths_grow_and_resets_by_design():
    ours, ref = Rotary(D, scaling=SCHEDULES["dynamic"][0]), reference("dynamic")
    x = torch.zeros(1, 1, 1, D)
    for length in (50, 200, 300, 400):
        ref(x, torch.arange(length)[None])
        assert torch.equal(ours.frequencies(torch.arange(length, dtype=torch.float32)[None]), ref.inv_freq)
    # transformers keeps the longest length's frequencies for a later, shorter call above 128; ours is
    # stateless and uses the current call's length (the documented difference)
    ref(x, torch.arange(200)[None])
    assert not torch.equal(ours.frequencies(torch.arange(200.0)[None]), ref.inv_freq)
    assert torch.equal(ours.frequencies(torch.arange(200.0)[None]),
                       ROPE_INIT_FUNCTIONS["dynamic"](ours._rope_config, seq_len=torch.tensor(200.0))[0])


def test_pinned_run_time_schedule_equals_transformers_at_that_length():
    pinned = Rotary(D, scaling=SCHEDULES["dynamic"][0], schedule_length=300)
    ref = reference("dynamic")
    ref(torch.zeros(1, 1, 1, D), torch.arange(300)[None])
    for length in (10, 300, 1000):  # whatever the call's length
        assert torch.equal(pinned.frequencies(torch.arange(float(length))[None]), ref.inv_freq)
    long = Rotary(D, scaling=SCHEDULES["longrope"][0], schedule_length=300)
    ref = reference("longrope")
    ref(torch.zeros(1, 1, 1, D), torch.arange(300)[None])
    assert torch.equal(long.frequencies(torch.arange(10.0)[None]), ref.inv_freq)


def test_schedule_composes_with_a_warp():
    """yarn frequencies applied to log1p(i): transformers' yarn rotary fed positions log1p(i)."""
    ours = Rotary(D, warp="log1p", scaling=SCHEDULES["yarn"][0])
    ref = reference("yarn")
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, H, 50, D, generator=g), torch.randn(2, H, 50, D, generator=g)
    pos = (torch.arange(50.0) * 17).expand(2, -1)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, *ref(q, torch.log1p(pos)))
    q_ours, k_ours = ours.rotate(q, k, pos, pos)
    assert torch.allclose(q_ours, q_ref, atol=1e-6) and torch.allclose(k_ours, k_ref, atol=1e-6)


# ---- p-RoPE ------------------------------------------------------------------------------------


def test_p_rope_leaves_the_lowest_frequencies_position_free():
    rope, prope = Rotary(32), Rotary(32, p=0.75)
    assert prope.rotating == 12 and (prope.inv_freq[12:] == 0).all()
    assert torch.equal(prope.inv_freq[:12], rope.inv_freq[:12])  # the highest frequencies are kept
    # transformers' "proportional" RoPE (partial_rotary_factor = p) drops the same pairs
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32,
                         rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.75})
    proportional, _ = ROPE_INIT_FUNCTIONS["proportional"](config)
    assert torch.allclose(prope.inv_freq, proportional) and torch.equal(proportional == 0, prope.inv_freq == 0)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 10, 32, generator=g), torch.randn(2, 3, 10, 32, generator=g)
    still = torch.tensor([k in range(12, 16) or k in range(28, 32) for k in range(32)])
    for positions in (torch.arange(10.0), torch.arange(10.0) * 1000 + 7, torch.rand(10, generator=g) * 1e5):
        pos = positions.expand(2, -1)
        q_p, k_p = prope.rotate(q, k, pos, pos)
        q_r, k_r = rope.rotate(q, k, pos, pos)
        assert torch.equal(q_p[..., still], q[..., still]) and torch.equal(k_p[..., still], k[..., still])
        assert torch.equal(q_p[..., ~still], q_r[..., ~still]) and torch.equal(k_p[..., ~still], k_r[..., ~still])
    q0, _ = Rotary(32, p=0.0).rotate(q, k, pos, pos)
    assert torch.equal(q0, q)
    with pytest.raises(ValueError, match="p-RoPE"):
        Rotary(32, p=1.5)


# ---- the registered encodings through the patched GPT-2 ---------------------------------------


def test_new_encodings_are_registered_with_summaries():
    for name in NEW_ENCODINGS:
        summary = ENCODINGS[name].summary
        assert "=" in summary and re.search(r"(19|20)\d\d|this project", summary), name  # formula and source
        assert "\n" not in summary and len(summary) < 170, name
    assert "log(1 + i)" in ENCODINGS["si_rope"].summary


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("encoding", NEW_ENCODINGS)
def test_causal_mask_holds(make_model, encoding, eager):
    model = make_model(encoding)
    ids = torch.randint(0, 97, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 97
    positions = torch.arange(24) + 150  # beyond the 128-token training length the schedules assume
    with torch.no_grad(), (eager_attention(model) if eager else contextlib.nullcontext()):
        a = model(ids, token_positions=positions).logits
        b = model(changed, token_positions=positions).logits
    assert torch.equal(a[:, :15], b[:, :15])
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


def chunked_logits(model, ids, positions):
    """Prefill 5 tokens, then 4, then one at a time, all through the cache."""
    out = model(ids[:, :5], token_positions=positions[:, :5], use_cache=True)
    pieces = [out.logits]
    out = model(ids[:, 5:9], cache=out.cache, use_cache=True, token_positions=positions[:, :9])
    pieces.append(out.logits)
    for t in range(9, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True, token_positions=positions[:, :t + 1])
        pieces.append(out.logits)
    return torch.cat(pieces, 1)


# rope_ntk pinned at one length: a run-time (dynamic) schedule is tested on its own below
EXACT_CACHE = [(name, {}) for name in NEW_ENCODINGS if name != "rope_ntk"] + [("rope_ntk", {"length": 512})]


@pytest.mark.parametrize("encoding,options", EXACT_CACHE, ids=[name for name, _ in EXACT_CACHE])
def test_cached_decoding_equals_recomputation(make_model, encoding, options):
    model = apply_encoding(make_model("learned"), encoding, **options) if options else make_model(encoding)
    ids = torch.randint(0, 97, (2, 11))
    positions = (torch.arange(11) * 3 + 130).expand(2, -1)  # past the 128-token training length
    with torch.no_grad():
        assert torch.allclose(chunked_logits(model, ids, positions), model(ids, token_positions=positions).logits,
                              atol=1e-5)
    step = lambda pos: pos[:, -1:] + 3  # noqa: E731
    cached = greedy_decode(model, ids, 6, positions=positions, step=step)
    assert torch.equal(cached, greedy_decode(model, ids, 6, positions=positions, step=step, use_cache=False))


def test_dynamic_ntk_cache_is_exact_within_the_training_length_only(make_model):
    model = make_model("rope_ntk")
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        inside = torch.arange(11).expand(2, -1) * 10  # largest position 100 < 128: plain RoPE frequencies
        assert torch.allclose(chunked_logits(model, ids, inside), model(ids, token_positions=inside).logits,
                              atol=1e-5)
        # beyond 128 each call's length sets the frequencies, so the states of earlier tokens that
        # layer 2 caches were made with other frequencies than a recomputation uses: close, not equal
        beyond = inside + 100
        full = model(ids, token_positions=beyond).logits
        chunked = chunked_logits(model, ids, beyond)
        assert torch.allclose(chunked[:, -1], full[:, -1], atol=1e-3)
        assert not torch.allclose(chunked[:, :5], full[:, :5], atol=1e-6)
    assert torch.equal(greedy_decode(model, ids, 6, positions=inside), greedy_decode(model, ids, 6, positions=inside,
                                                                                     use_cache=False))


def test_encoding_options_reach_the_layers(make_model):
    model = apply_encoding(make_model("learned"), "rope_yarn", factor=8.0, train_len=64, warp="log1p")
    enc = model.transformer.h[0].attn.position_encoding
    assert enc.scaling["factor"] == 8.0 and enc.scaling["original_max_position_embeddings"] == 64
    assert enc.warp_name == "log1p" and enc.attention_scaling == pytest.approx(0.1 * math.log(8) + 1)
    power = apply_encoding(make_model("learned"), "rope_power", beta=0.25).transformer.h[1].attn.position_encoding
    assert power.warp.beta == 0.25
    spline = apply_encoding(make_model("learned"), "rope_spline", init="linear").transformer.h[0].attn.position_encoding
    assert spline.warp.init == "linear"
    assert apply_encoding(make_model("learned"), "p_rope", p=0.5).transformer.h[0].attn.position_encoding.rotating == 4
