"""Properties every registered encoding must have, on the sdpa path and on its eager twin.

A new encoding is covered by registering it: the tests run over
`mempos.encodings.ENCODINGS` as it stands after import. An encoding whose
positions are not one number per token (extra axes for a memory slot, a
module, a program-counter step) tells these tests how to make them through
optional attributes, looked up on its `EncodingSpec` first and then on its
builder function:

- `example_positions(batch, length) -> Tensor`: `token_positions` for a batch
  of sequences, (B, T) or (B, T, axes) as the GPT-2 patch takes them; the
  token axis is dim 1 either way (prefixes are taken with `[:, :n]`).
  Default: each row its own arithmetic progression, (B, T).
- `next_position(positions) -> Tensor`: the decoding step `greedy_decode`
  appends along dim 1. Default: `mempos.generation.next_position`.
- `needs_inputs`: a non-empty string naming inputs these tests cannot supply
  (e.g. a memory to read fingerprints from). Only then are its tests skipped,
  with that string as the reason.

The control `learned` keeps GPT-2's own positions and is run without
`token_positions`.
"""

import pytest
import torch

import mempos.encodings
from mempos.encodings import ENCODINGS, eager_attention, is_patched
from mempos.encodings import alibi, scale_invariant  # noqa: F401  (register their encodings)
from mempos.generation import greedy_decode, next_position

NAMES = sorted(ENCODINGS)
VOCAB = 97


def hook(name: str, attribute: str):
    spec = mempos.encodings.get_encoding(name)
    found = getattr(spec, attribute, None)
    return found if found is not None else getattr(spec.build, attribute, None)


@pytest.fixture(params=NAMES)
def encoding(request):
    reason = hook(request.param, "needs_inputs")
    if reason:
        pytest.skip(f"{request.param} needs inputs these tests cannot supply: {reason}")
    return request.param


def positions_for(name: str, batch: int, length: int) -> torch.Tensor:
    make = hook(name, "example_positions")
    if make is not None:
        return make(batch, length)
    # gaps and a per-row offset, so neither indices nor a shared row stand in for positions
    return (3 * torch.arange(length) + 5 + 11 * torch.arange(batch)[:, None]).float()


def run(model, ids, positions, **kwargs):
    extra = {"token_positions": positions} if is_patched(model) else {}
    return model(ids, **extra, **kwargs)


def maybe_eager(model, eager: bool):
    return eager_attention(model) if eager else _nothing()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_every_encoding_has_a_one_line_summary():
    for name, spec in ENCODINGS.items():
        assert spec.name == name and spec.summary.strip() and "\n" not in spec.summary


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_causal_mask_holds(make_model, encoding, eager):
    model = make_model(encoding)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % VOCAB
    positions = positions_for(encoding, 2, 24)
    with maybe_eager(model, eager):
        a, b = run(model, ids, positions).logits, run(model, changed, positions).logits
    assert torch.allclose(a[:, :15], b[:, :15], rtol=0, atol=1e-6), "a later token changed earlier logits"
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-3


def test_eager_twin_matches_sdpa_and_returns_probabilities(make_model, encoding):
    model = make_model(encoding)
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 20))
    positions = positions_for(encoding, 2, 20)
    sdpa = run(model, ids, positions).logits
    before = model.config._attn_implementation
    with eager_attention(model):
        out = run(model, ids, positions, output_attentions=True)
    assert model.config._attn_implementation == before
    assert torch.allclose(out.logits, sdpa, atol=1e-5)
    assert len(out.attentions) == model.config.n_layer
    for probs in out.attentions:
        assert probs.shape == (2, model.config.n_head, 20, 20)
        assert probs.min() >= 0
        assert torch.allclose(probs.sum(-1), torch.ones(2, model.config.n_head, 20), atol=1e-5)
        assert probs.triu(1).abs().max() == 0


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_cached_decoding_equals_full_forward(make_model, encoding, eager):
    """Prefill 5 tokens, then a chunk of 4 (T_q < T_k with a mask), then one at a time."""
    model = make_model(encoding)
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 13))
    positions = positions_for(encoding, 3, 13)
    with maybe_eager(model, eager):
        full = run(model, ids, positions).logits
        out = run(model, ids[:, :5], positions[:, :5], use_cache=True)
        pieces = [out.logits]
        out = run(model, ids[:, 5:9], positions[:, :9], cache=out.cache, use_cache=True)
        pieces.append(out.logits)
        for t in range(9, 13):
            out = run(model, ids[:, t:t + 1], positions[:, :t + 1], cache=out.cache, use_cache=True)
            pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)


def test_greedy_decode_with_and_without_cache_agree(make_model, encoding):
    model = make_model(encoding)
    torch.manual_seed(4)
    prompt = torch.randint(0, VOCAB, (2, 7))
    positions = positions_for(encoding, 2, 7)
    step = hook(encoding, "next_position") or next_position
    cached = greedy_decode(model, prompt, 12, positions=positions, step=step)
    recomputed = greedy_decode(model, prompt, 12, positions=positions, step=step, use_cache=False)
    assert cached.shape == (2, 19) and torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, recomputed)
