"""PaTH attention: the maths of the transform, the GPT-2 patch, cached decoding, drift."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import mempos.encodings.path as path  # registers "path"
from mempos.encodings import EAGER, PositionEncoding, apply_encoding, eager_attention, get_encoding
from mempos.encodings.path import (
    DRIFT_FALSIFIER, PaTH, accumulated_angles, householders, install, path_attention, path_scores,
    path_scores_reference, transform_drift, ut_factor,
)
from mempos.generation import greedy_decode

F64 = torch.float64


def random_inputs(length, dim=8, batch=2, heads=3, dtype=F64, seed=0, beta_max=2.0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, length, dim, generator=g, dtype=dtype) for _ in range(2))
    w = F.normalize(torch.randn(batch, heads, length, dim, generator=g, dtype=dtype), dim=-1)
    beta = beta_max * torch.rand(batch, heads, length, generator=g, dtype=dtype)
    return q, k, w, beta


@pytest.fixture
def path_model(make_model):
    def make(seed=0, **options):
        model = make_model("path", seed=seed)
        if options:  # rebuild with options, same seed for the rest of the model
            torch.manual_seed(seed)
            model = apply_encoding(model, "path", **options).eval()
        return install(model)

    return make


# ---------------------------------------------------------------- maths


def test_reference_follows_the_papers_order():
    """score(i, j) = q_i^T H_i ... H_{j+1} k_j, checked pair by pair with explicit matrix products."""
    q, k, w, beta = random_inputs(6, dim=4, batch=1, heads=1)
    H = householders(w, beta)[0, 0]
    scores = path_scores_reference(q, k, w, beta)[0, 0]
    for i in range(6):
        for j in range(6):
            if j > i:
                assert scores[i, j] == 0
                continue
            product = torch.eye(4, dtype=F64)
            for s in range(i, j, -1):  # H_i first on the left ... H_{j+1} last
                product = product @ H[s]
            assert torch.allclose(scores[i, j], q[0, 0, i] @ product @ k[0, 0, j], atol=1e-12)


def test_ut_factor_gives_the_block_product():
    _, _, w, beta = random_inputs(7, dim=5)
    a = ut_factor(w, beta)
    H = householders(w, beta)
    product = torch.linalg.multi_dot([H[0, 0, t] for t in range(7)])  # H_0 H_1 ... H_6
    assert torch.allclose(product, torch.eye(5, dtype=F64) - w[0, 0].T @ a[0, 0] @ w[0, 0], atol=1e-12)
    assert torch.equal(a, a.triu())


@pytest.mark.parametrize("length", [1, 7, 16, 33, 70])
@pytest.mark.parametrize("block", [4, 16])
def test_blockwise_equals_reference(length, block):
    q, k, w, beta = random_inputs(length)
    assert torch.allclose(path_scores(q, k, w, beta, block), path_scores_reference(q, k, w, beta), atol=1e-10)


def test_blockwise_attention_equals_reference_float32():
    q, k, w, beta = random_inputs(45, dim=16, dtype=torch.float32)
    v = torch.randn_like(q)
    fast = path_attention(q, k, v, w, beta, block_size=16)
    slow = path_attention(q, k, v, w, beta, reference=True)
    assert (fast - slow).abs().max() < 1e-4


def test_blockwise_continues_from_carried_keys():
    """A chunk after a past whose keys were carried equals the tail of the whole sequence."""
    q, k, w, beta = random_inputs(29)
    whole = path_scores_reference(q, k, w, beta)
    _, carried = path_scores(q[..., :11, :], k[..., :11, :], w[..., :11, :], beta[..., :11], 4, return_keys=True)
    tail = path_scores(q[..., 11:, :], k[..., 11:, :], w[..., 11:, :], beta[..., 11:], 4, past_keys=carried)
    assert torch.allclose(tail, whole[..., 11:, :], atol=1e-10)


def test_blockwise_gradients_equal_reference():
    inputs = [t.requires_grad_() for t in random_inputs(13, dim=4, batch=1, heads=2)]
    weights = torch.randn(1, 2, 13, 13, dtype=F64)
    grads = []
    for fn in (lambda *a: path_scores(*a, block_size=4), path_scores_reference):
        grads.append(torch.autograd.grad((fn(*inputs) * weights).sum(), inputs))
    for fast, slow in zip(*grads):
        assert torch.allclose(fast, slow, atol=1e-10)


def test_beta_two_is_orthogonal_and_smaller_beta_is_not():
    q, k, w, _ = random_inputs(40)
    ones = torch.ones(q.shape[:-1], dtype=F64)
    _, carried = path_scores(q, k, w, 2 * ones, 16, return_keys=True)
    assert torch.allclose(carried.norm(dim=-1), k.norm(dim=-1), atol=1e-10, rtol=0)
    products = torch.linalg.multi_dot(list(householders(w, 2 * ones)[0, 0]))
    assert torch.allclose(products @ products.T, torch.eye(8, dtype=F64), atol=1e-10)
    _, shrunk = path_scores(q, k, w, 1.5 * ones, 16, return_keys=True)
    ratio = shrunk.norm(dim=-1) / k.norm(dim=-1)
    assert (ratio[..., :-1] < 1 - 1e-6).all()  # every key that met at least one later H_t
    assert torch.allclose(ratio[..., -1], torch.ones_like(ratio[..., -1]))


def test_zero_beta_or_zero_w_is_plain_dot_product():
    q, k, w, beta = random_inputs(10)
    plain = (q @ k.transpose(-1, -2)).tril()
    assert torch.allclose(path_scores(q, k, w, torch.zeros_like(beta), 4), plain, atol=1e-12)
    assert torch.allclose(path_scores(q, k, torch.zeros_like(w), beta, 4), plain, atol=1e-12)
    # hand-checkable: one reflection across e1's complement flips e1 components of earlier keys
    e1 = torch.zeros(1, 1, 2, 2, dtype=F64)
    e1[..., 1, 0] = 1.0
    q2 = torch.tensor([[[[1.0, 0.0], [1.0, 2.0]]]], dtype=F64)
    k2 = torch.tensor([[[[3.0, 5.0], [7.0, 11.0]]]], dtype=F64)
    got = path_scores(q2, k2, e1, torch.full((1, 1, 2), 2.0, dtype=F64), 4)[0, 0]
    # row 1: key 0 sees H_1 = diag(-1, 1): (-3, 5) . (1, 2) = 7; key 1 plain: 7 + 22 = 29
    assert torch.allclose(got, torch.tensor([[3.0, 0.0], [7.0, 29.0]], dtype=F64))


# ---------------------------------------------------------------- the GPT-2 patch


def test_registered_and_installed(path_model):
    assert "arXiv 2505.16381" in get_encoding("path").summary
    model = path_model()
    encodings = path.path_encodings(model)
    assert len(encodings) == 2 and all(isinstance(e, PaTH) for e in encodings)
    install(model)  # idempotent
    assert all(len(block.attn._forward_pre_hooks) == 1 for block in model.transformer.h)
    assert any(name.endswith("position_encoding.w_up.weight") for name, _ in model.named_parameters())


def test_state_dict_round_trip_and_deepcopy(path_model, make_model):
    import copy

    model = path_model(seed=4)
    ids = torch.randint(0, 97, (1, 15))
    logits = model(ids).logits
    fresh = install(make_model("path", seed=5))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.allclose(fresh(ids).logits, logits, atol=1e-6)
    twin = copy.deepcopy(model)  # the copied hooks must feed the copied encodings
    assert torch.allclose(twin(ids).logits, logits, atol=1e-6)
    assert all(e._pending is None for e in path.path_encodings(model) + path.path_encodings(twin))


def test_missing_hook_is_a_clear_error(make_model):
    model = make_model("path")
    for block in model.transformer.h:
        block.attn._forward_pre_hooks.clear()
    with pytest.raises(RuntimeError, match="install"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_sdpa_and_eager_agree_and_eager_gives_probabilities(path_model):
    model = path_model()
    ids = torch.randint(0, 97, (2, 21))
    logits = model(ids).logits
    with eager_attention(model):
        assert model.config._attn_implementation == EAGER
        out = model(ids, output_attentions=True)
    assert torch.allclose(out.logits, logits, atol=1e-5)
    probs = out.attentions[0]
    assert probs.shape == (2, 4, 21, 21)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 21), atol=1e-5)
    assert probs.triu(1).abs().max() == 0


@pytest.mark.parametrize("eager", [False, True])
def test_causal(path_model, eager):
    model = path_model()
    ids = torch.randint(0, 97, (2, 24))
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 97
    with eager_attention(model) if eager else torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert torch.allclose(before[:, :15], after[:, :15], atol=1e-6)
    assert (before[:, 15:] - after[:, 15:]).abs().max() > 1e-4


def test_zero_projection_or_zero_beta_reduces_to_nope(path_model):
    model = path_model(seed=3)
    ids = torch.randint(0, 97, (2, 18))
    encodings = path.path_encodings(model)
    nope = path_model(seed=3)
    for block in nope.transformer.h:
        block.attn.position_encoding = PositionEncoding()  # plain q.k, sdpa, causal mask
    reference = nope(ids).logits
    assert (model(ids).logits - reference).abs().max() > 1e-4
    with torch.no_grad():
        for encoding in encodings:
            encoding.w_up.weight.zero_()  # w = 0: H_t = I whatever beta
    assert torch.allclose(model(ids).logits, reference, atol=1e-5)
    model = path_model(seed=3)
    with torch.no_grad():
        for encoding in path.path_encodings(model):
            encoding.beta_proj.weight.zero_()
            encoding.beta_proj.bias.fill_(-1e4)  # beta = 2 sigmoid(-1e4) = 0
    assert torch.allclose(model(ids).logits, reference, atol=1e-5)


def test_left_padding_stays_finite(path_model):
    model = path_model()
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    for context in (torch.no_grad(), eager_attention(model)):
        with context:
            assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


# ---------------------------------------------------------------- decoding with the cache


@pytest.mark.parametrize("options", [{}, {"rotary": True, "block_size": 4}])
def test_cached_greedy_equals_recomputation(path_model, options):
    model = path_model(seed=1, **options)
    prompt = torch.randint(0, 97, (2, 7))
    cached = greedy_decode(model, prompt, 20)
    assert torch.equal(cached, greedy_decode(model, prompt, 20, use_cache=False))


@pytest.mark.parametrize("eager", [False, True])
def test_chunked_prefill_then_steps_match_full_forward(path_model, eager):
    model = path_model(seed=2, block_size=4)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad(), (eager_attention(model) if eager else torch.no_grad()):
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        pieces, start = [5, 4] + [1] * 7, 0
        for size in pieces:
            out = model(ids[:, start:start + size], cache=cache, use_cache=True)
            assert torch.allclose(out.logits, full[:, start:start + size], atol=1e-5), start
            start += size
        # a fresh prefill on the same layers starts over; another cache does not clash
        other = DynamicCache(config=model.config)
        out = model(ids[:, :3], cache=other, use_cache=True)
        assert torch.allclose(out.logits, full[:, :3], atol=1e-5)
        out = model(ids[:, 3:4], cache=other, use_cache=True)
        assert torch.allclose(out.logits, full[:, 3:4], atol=1e-5)


def test_continuing_an_unknown_cache_is_a_clear_error(path_model):
    model = path_model()
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        for encoding in path.path_encodings(model):
            encoding.reset_state()
        with pytest.raises(RuntimeError, match="decoding state"):
            model(ids[:, :1], cache=cache, use_cache=True)


# ---------------------------------------------------------------- training


def test_parameters_receive_gradients(path_model):
    model = path_model().train()
    ids = torch.randint(0, 97, (2, 20))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model(ids, labels=ids).loss
    before.backward()
    for encoding in path.path_encodings(model):
        for name in ("w_down", "w_up", "w_conv", "beta_proj"):
            grad = getattr(encoding, name).weight.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
    optimizer.step()
    assert model(ids, labels=ids).loss < before


# ---------------------------------------------------------------- drift


def test_drift_angles_by_hand():
    # beta = 2, w = e1 every step, probe e1: P_t e1 = (-1)^(t+1) e1, angle to t = train_len - 1 alternates pi, 0
    w = torch.zeros(1, 1, 8, 3, dtype=F64)
    w[..., 0] = 1.0
    angles = accumulated_angles(w, torch.full((1, 1, 8), 2.0, dtype=F64), torch.eye(3, dtype=F64)[:1], 4)
    assert torch.allclose(angles[0, 0, 0], torch.tensor([math.pi, 0, math.pi, 0], dtype=F64))
    # a probe orthogonal to every w never moves
    angles = accumulated_angles(w, torch.full((1, 1, 8), 2.0, dtype=F64), torch.eye(3, dtype=F64)[1:], 4)
    assert angles.abs().max() < 1e-7


def test_drift_of_model(path_model):
    model = path_model()
    chunks = torch.randint(0, 97, (3, 40))
    drift = transform_drift(model, chunks, train_len=10, eval_len=30, n_probes=4, batch_size=2)
    assert len(drift.per_layer) == 2 and len(drift.per_head[0]) == 4
    assert drift.mean > DRIFT_FALSIFIER  # beta near 1 at initialisation: directions wander far
    assert drift.mean == pytest.approx(sum(drift.per_layer) / 2)
    with torch.no_grad():
        for encoding in path.path_encodings(model):
            encoding.beta_proj.weight.zero_()
            encoding.beta_proj.bias.fill_(-1e4)
    still = transform_drift(model, chunks, train_len=10, eval_len=30, n_probes=4)
    assert still.mean == 0.0 and not still.exceeds_falsifier
