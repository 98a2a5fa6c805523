"""Scale-invariant attention (Anson, Wang, Aitchison 2025): the logit transform and its p-RoPE."""

import math

import pytest
import torch
from torch import nn

from mempos.encodings import ENCODINGS, eager_attention
from mempos.encodings.scale_invariant import (  # importing registers "scale_invariant_attn"
    ScaleInvariantAttention,
    p_rope_frequencies,
    scale_invariant_coefficients,
)


def test_coefficients_by_hand():
    a, m = scale_invariant_coefficients(torch.tensor([0.0, 10.0, 90.0]), tau=10.0)
    # t = 0:  log(0/10 + 1) = 0        -> a = 1,                      m = 0
    # t = 10: log(10/10 + 1) = log 2   -> a = sqrt(1 + 2 log 2),      m = -2 log 2
    # t = 90: log(90/10 + 1) = log 10  -> a = sqrt(1 + 2 log 10),     m = -2 log 10
    assert torch.allclose(a, torch.tensor([1.0, 1.544763529191407, 2.367524062388404]), atol=1e-6)
    assert torch.allclose(m, torch.tensor([0.0, -1.3862943611198906, -4.605170185988092]), atol=1e-6)
    # the general form a^2 = 2[log(t/tau+1) - log alpha + beta/alpha], m = -a^2 + beta/alpha
    # with alpha = beta = e^0.5, the boundary condition a_0 = 1, m_0 = 0
    alpha = beta = math.exp(0.5)
    for t, a_t, m_t in zip((0.0, 10.0, 90.0), a.tolist(), m.tolist()):
        a2 = 2 * (math.log(t / 10 + 1) - math.log(alpha) + beta / alpha)
        assert a_t == pytest.approx(math.sqrt(a2), abs=1e-6)
        assert m_t == pytest.approx(-a2 + beta / alpha, abs=1e-6)


def test_coefficients_give_the_papers_expected_attention():
    """For standard Gaussian base logits, E[exp(L_t)] = exp(m_t + a_t^2/2) = alpha / (t/tau + 1)
    (their Eq. 15a) and E[L_t exp(L_t)] / E[exp(L_t)] = m_t + a_t^2 = beta/alpha = 1 (Eq. 33)."""
    t = torch.tensor([0.0, 1.0, 7.0, 100.0, 5000.0])
    for tau in (1.0, 10.0, 100.0):
        a, m = scale_invariant_coefficients(t, tau)
        assert torch.allclose(torch.exp(m + a**2 / 2), math.exp(0.5) / (t / tau + 1), rtol=1e-5)
        assert torch.allclose(m + a**2, torch.ones_like(t), atol=1e-5)


def test_negative_distances_are_clamped_to_the_diagonal():
    a, m = scale_invariant_coefficients(torch.tensor([-50.0, -1.0]))
    assert a.tolist() == [1.0, 1.0] and m.tolist() == [0.0, 0.0]


def test_transform_of_a_hand_made_score_matrix():
    si = ScaleInvariantAttention(8, tau=10.0)
    pos = torch.tensor([[0.0, 10.0, 100.0]])  # distances 10 (1,0), 100 (2,0), 90 (2,1)
    scores = torch.tensor([[[[0.5, 7.0, 7.0],
                             [2.0, -1.0, 7.0],
                             [1.0, 3.0, 0.25]]]])
    # L = a_t S + m_t; diagonal (t = 0) and the clamped upper triangle unchanged
    expected = torch.tensor([[[[0.5, 7.0, 7.0],
                               [1.544763529191407 * 2.0 - 1.3862943611198906, -1.0, 7.0],
                               [2.4074448167292934 * 1.0 - 4.795790545596741,
                                2.367524062388404 * 3.0 - 4.605170185988092, 0.25]]]])
    assert torch.allclose(si.transform(scores, pos, pos), expected, atol=1e-5)
    assert expected[0, 0, 1, 0].item() == pytest.approx(1.7032326972629234)
    assert expected[0, 0, 2, 0].item() == pytest.approx(-2.3883457288674476)
    assert expected[0, 0, 2, 1].item() == pytest.approx(2.49740200117712)


class _Layer(nn.Module):
    is_causal = True


@pytest.mark.parametrize("eager", [False, True])
def test_attend_is_softmax_of_transformed_scaled_scores(eager):
    """With fraction=0 (no pair rotates) the scores are plain q.k / sqrt(d), checkable by hand."""
    si = ScaleInvariantAttention(4, tau=1.0, fraction=0.0).double()
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    v = torch.randn(1, 1, 3, 5, dtype=torch.float64)
    pos = torch.tensor([[0.0, 1.0, 3.0]])
    mask = None
    if eager:
        mask = torch.zeros(1, 1, 3, 3, dtype=torch.float64).masked_fill(
            torch.ones(3, 3, dtype=torch.bool).triu(1), torch.finfo(torch.float64).min)
    out, probs = si.attend(_Layer(), q[None, None], k[None, None], v, mask, pos, pos, eager=eager,
                           dropout=0.0, scaling=0.5)
    # S = q.k * 0.5; query 2 (position 3) sees keys at distances 3, 2, 0 with tau = 1
    s = torch.tensor([4.0, 2.0, 4.0], dtype=torch.float64) * 0.5  # q2.k = 4, 2, 4
    u = torch.log(torch.tensor([4.0, 3.0, 1.0], dtype=torch.float64))
    w = torch.softmax(torch.sqrt(1 + 2 * u) * s - 2 * u, dim=-1)
    assert torch.allclose(out[0, 2, 0], w @ v[0, 0], atol=1e-6)
    # query 0 sees only itself
    assert torch.allclose(out[0, 0, 0], v[0, 0, 0], atol=1e-12)
    if eager:
        assert torch.allclose(probs[0, 0, 2], w, atol=1e-6) and probs[0, 0].triu(1).abs().max() == 0
    else:
        assert probs is None


def test_p_rope_frequencies_are_the_papers_half_truncated_rope():
    freq = p_rope_frequencies(16, fraction=0.5, base=1024.0)
    assert torch.allclose(freq, torch.tensor([1.0, 1024 ** (-1 / 3), 1024 ** (-2 / 3), 1 / 1024, 0, 0, 0, 0]))
    # modded-nanogpt: (1/1024) ** linspace(0, 1, d/4), then d/4 zeros
    nanogpt = torch.cat([(1 / 1024) ** torch.linspace(0, 1, 128 // 4), torch.zeros(128 // 4)])
    assert torch.allclose(p_rope_frequencies(128), nanogpt, rtol=1e-5)
    assert p_rope_frequencies(16, fraction=0.25).tolist() == [1.0, 1 / 1024, 0, 0, 0, 0, 0, 0]
    assert not p_rope_frequencies(16, fraction=0.0).any()
    with pytest.raises(ValueError):
        p_rope_frequencies(16, fraction=1.5)


def test_only_the_rotating_pairs_carry_position():
    si = ScaleInvariantAttention(16)
    pos = torch.tensor([[0.0, 5.0, 1234.0]])
    x = torch.randn(1, 1, 3, 16)
    free = torch.zeros(16, dtype=torch.bool)
    free[4:8] = free[12:16] = True  # pairs 4..7 (half-split layout) have frequency 0
    q_rot, _ = si.rotate(x * free, x * free, pos, pos)
    assert torch.allclose(q_rot, x * free)
    q_rot, _ = si.rotate(x * ~free, x * ~free, pos, pos)
    assert (q_rot[0, 0, 2] - (x * ~free)[0, 0, 2]).abs().max() > 1e-3


def test_model_depends_only_on_distance(make_model):
    model = make_model("scale_invariant_attn")
    ids = torch.randint(0, 97, (2, 30))
    base = model(ids).logits
    for shift in (1, 77, 4000):
        assert torch.allclose(model(ids, token_positions=torch.arange(30) + shift).logits, base, atol=1e-4)
    # unlike si_rope, scaling all positions is not a symmetry
    one_plus_i = torch.arange(30, dtype=torch.float32) + 1
    ratio_a = model(ids, token_positions=one_plus_i - 1).logits
    ratio_b = model(ids, token_positions=4 * one_plus_i - 1).logits
    assert (ratio_a - ratio_b).abs().max() > 1e-3


def test_registered_apart_from_si_rope(make_model):
    spec = ENCODINGS["scale_invariant_attn"]
    assert "not si_rope" in spec.summary and "Anson" in spec.summary
    model = make_model("scale_invariant_attn")
    encoding = model.transformer.h[1].attn.position_encoding
    assert isinstance(encoding, ScaleInvariantAttention)
    assert (encoding.tau, encoding.fraction, encoding.base) == (10.0, 0.5, 1024.0)
    assert encoding.spacing == "nanogpt"
    assert torch.equal(encoding.rotary.inv_freq, p_rope_frequencies(16))


def test_rope_spacing_is_the_projects_p_rope(make_model):
    """spacing="rope" rotates exactly as the registered p_rope with the same fraction."""
    si = ScaleInvariantAttention(16, fraction=0.75, spacing="rope")
    p_rope = make_model("p_rope").transformer.h[0].attn.position_encoding
    assert p_rope.p == 0.75 and torch.equal(si.rotary.inv_freq, p_rope.inv_freq)
    assert torch.equal(p_rope_frequencies(16, 0.75, spacing="rope"), p_rope.inv_freq)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16)
    pos = torch.arange(5.0)[None] * 7
    for ours, theirs in zip(si.rotate(q, k, pos, pos), p_rope.rotate(q, k, pos, pos)):
        assert torch.equal(ours, theirs)


def test_single_axis_3d_positions_accepted_more_axes_refused():
    si = ScaleInvariantAttention(16)
    pos = torch.tensor([[0.0, 4.0, 30.0]])
    a2, m2 = si.coefficients(pos, pos)
    a3, m3 = si.coefficients(pos[..., None], pos[..., None])
    assert torch.equal(a2, a3) and torch.equal(m2, m3)
    with pytest.raises(ValueError, match="one position axis"):
        si.coefficients(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))


def test_eager_probabilities_in_model_match_formula(make_model):
    """Layer-0 eager probabilities equal softmax(a_t * S + m_t) with S from p-RoPE, recomputed here."""
    model = make_model("scale_invariant_attn")
    ids = torch.randint(0, 97, (1, 12))
    with eager_attention(model):
        out = model(ids, output_attentions=True, output_hidden_states=True)
    attn = model.transformer.h[0].attn
    q, k, _ = attn.c_attn(model.transformer.h[0].ln_1(out.hidden_states[0])).split(64, dim=2)
    q, k = (x.view(1, 12, 4, 16).transpose(1, 2) for x in (q, k))
    i = torch.arange(12.0)
    theta = i[:, None] * p_rope_frequencies(16)
    cos, sin = torch.cat([theta, theta], -1).cos(), torch.cat([theta, theta], -1).sin()

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    s = rot(q) @ rot(k).transpose(-1, -2) / 4
    u = torch.log1p((i[:, None] - i[None, :]).clamp_min(0) / 10)
    logits = torch.sqrt(1 + 2 * u) * s - 2 * u
    logits = logits.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(out.attentions[0], logits.softmax(-1), atol=1e-5)
