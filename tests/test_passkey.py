"""Passkey haystacks: needle placement, exact-match scoring, attention diagnostics, grid outputs."""

import math
import random
import re

import pytest
import torch

from mempos.data import load_text
from mempos.errors import UsageError
from mempos.experiments import passkey
from mempos.experiments.passkey import (
    Cell, Templates, by_length, decades, exact_match, filler_sentences, first_number, make_haystack,
    nearest_boundary, ranking, ranking_table, split_sentences,
)
from mempos.models import train_tokenizer

MAX_SENTENCE = 24


@pytest.fixture(scope="module")
def corpus():
    return load_text("embedded")


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus.train[:300_000], 1024)


@pytest.fixture(scope="module")
def sentences(corpus, tokenizer):
    return filler_sentences(corpus.eval, tokenizer, max_tokens=MAX_SENTENCE)


@pytest.fixture(scope="module")
def templates(tokenizer):
    return Templates(tokenizer)


def test_split_sentences_keeps_whole_sentences_without_digits():
    text = ("The first sentence is here.  It spans\ntwo lines. Version 3 has a digit. Is this a question? "
            "Yes! a lower-case start does not cut. Fragment without an end")
    assert split_sentences(text) == [
        "The first sentence is here.",
        "It spans two lines.",
        "Is this a question?",
        "Yes! a lower-case start does not cut.",
    ]


def test_filler_sentences_are_bounded_and_digit_free(sentences, tokenizer):
    assert len(sentences) > 100
    assert all(4 <= len(s) <= MAX_SENTENCE for s in sentences)
    text = tokenizer.decode([t for s in sentences[:200] for t in s])
    assert not re.search(r"\d", text)


def test_nearest_boundary_prefers_the_earlier_on_a_tie():
    assert nearest_boundary([0, 10, 20], 15) == 10
    assert nearest_boundary([0, 10, 20], 16) == 20
    assert nearest_boundary([0, 10, 20], 0) == 0


@pytest.mark.parametrize("length", [128, 512])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
def test_needle_goes_to_the_sentence_boundary_nearest_the_depth(sentences, templates, tokenizer, length, depth):
    rng = random.Random(f"test/{length}/{depth}")
    h = make_haystack(sentences, templates, length, depth, rng, digits=5)
    # exact length: prompt + answer + final period
    assert h.length == length == len(h.full())
    assert h.full()[-len(h.answer_ids) - len(h.end_ids):] == h.answer_ids + h.end_ids
    # the needle sits where the span says, and the question closes the prompt
    start, end = h.needle_span
    assert h.ids[start:end] == templates.needle(h.key)
    assert h.ids[-len(templates.question()):] == templates.question()
    # at the boundary nearest to depth * filler, never more than half a sentence away from it
    assert start == h.filler_offset == nearest_boundary(h.boundaries, depth * h.filler_tokens)
    assert abs(start - depth * h.filler_tokens) <= MAX_SENTENCE / 2
    # on a sentence boundary: the start of the haystack, or right after . ! ?
    before = tokenizer.decode(h.ids[:start]).rstrip()
    assert start == 0 or before[-1] in ".!?"
    after = tokenizer.decode(h.ids[end:]).lstrip()
    assert after[0].isupper()  # a sentence (or the question) starts right after the needle
    if depth == 0.0:
        assert start == 0
    if depth == 1.0:
        assert end == len(h.ids) - len(templates.question())
    # the key is the only number in the prompt
    text = tokenizer.decode(h.ids)
    assert re.findall(r"\d+", text) == [h.key] and len(h.key) == 5 and h.key[0] != "0"
    assert f"The pass key is {h.key}." in text


def test_depths_are_monotone_in_position(sentences, templates):
    starts = []
    for depth in [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]:
        h = make_haystack(sentences, templates, 1024, depth, random.Random(7))  # same filler for every depth
        starts.append(h.needle_span[0])
    assert starts == sorted(starts) and starts[0] == 0 and len(set(starts)) == len(starts)


def test_multi_key_haystack_has_distractors_and_asks_one_colour(sentences, templates, tokenizer):
    h = make_haystack(sentences, templates, 256, 0.5, random.Random(3), n_keys=3, digits=5)
    assert h.length == 256 and h.colour in passkey.COLOURS
    assert len(h.distractor_keys) == 2 and len({h.key, *h.distractor_keys}) == 3
    text = tokenizer.decode(h.ids)
    assert f"The pass key for {h.colour} is {h.key}." in text
    assert text.endswith(f"What is the pass key for {h.colour}? The pass key for {h.colour} is")
    assert sorted(re.findall(r"\d+", text)) == sorted([h.key, *h.distractor_keys])
    spans = sorted([h.needle_span, *h.distractor_spans])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "needles overlap"
    assert h.ids[h.needle_span[0]:h.needle_span[1]] == templates.needle(h.key, h.colour)


def test_haystacks_are_reproducible(sentences, templates):
    a = make_haystack(sentences, templates, 256, 0.3, random.Random(11), n_keys=2)
    b = make_haystack(sentences, templates, 256, 0.3, random.Random(11), n_keys=2)
    assert a == b


def test_bad_haystack_requests_are_usage_errors(sentences, templates):
    with pytest.raises(UsageError, match="depth"):
        make_haystack(sentences, templates, 256, 1.5, random.Random(0))
    with pytest.raises(UsageError, match="too short"):
        make_haystack(sentences, templates, 10, 0.5, random.Random(0))
    with pytest.raises(UsageError, match="keys"):
        make_haystack(sentences, templates, 256, 0.5, random.Random(0), n_keys=0)


@pytest.mark.parametrize(("generated", "right"), [
    (" 48213.", True),
    ("48213", True),
    (" 48213 and then 99", True),  # the first number counts
    (" 48214.", False),  # one digit off
    (" 58213.", False),
    (" 4821.", False),  # a digit short
    (" 482130.", False),  # a digit too many
    (" 4 8213.", False),  # split by a space: the first number is 4
    (" 71934.", False),  # a distractor's key
    (" the pass key", False),  # no number at all
    ("", False),
])
def test_exact_match_accepts_the_key_and_rejects_near_misses(generated, right):
    assert exact_match(generated, "48213") is right


def test_first_number():
    assert first_number("is 12. then 34") == "12" and first_number("none") is None


def test_decades_cover_every_distance():
    assert decades(9) == [(1, 9)]
    assert decades(10) == [(1, 9), (10, 99)]
    assert decades(1023) == [(1, 9), (10, 99), (100, 999), (1000, 9999)]


def test_diagnostics_on_hand_made_attention():
    # 1 layer, 2 heads, 1 answer query at position 12 over 13 keys; needle at keys 2..4
    probs = torch.zeros(1, 2, 1, 13)
    probs[0, 0, 0, 3] = 1.0  # head 0: all on the needle, 9 tokens back
    probs[0, 1, 0, :] = 1.0 / 13  # head 1: uniform
    out = passkey._diagnose(probs, torch.tensor([12]), (2, 5))
    assert out["needle_mass"] == pytest.approx((1.0 + 3 / 13) / 2)
    assert out["retrieval_heads"] == 0.5  # head 1's argmax is key 0, outside the needle
    # band 1-9 back = keys 3..11: head 0 has all its mass there on one key (entropy 0), head 1 9/13 uniformly
    assert out["mass_1-9"] == pytest.approx((1.0 + 9 / 13) / 2)
    assert out["entropy_1-9"] == pytest.approx(0.5)  # mean of 0 (one key) and 1 (uniform)
    # band 10-99 back = keys 0..2: only head 1 has mass there, uniform over its 3 keys
    assert out["mass_10-99"] == pytest.approx((0 + 3 / 13) / 2)
    assert out["entropy_10-99"] == pytest.approx(1.0)


def test_score_haystacks_with_a_model(make_model, sentences, templates, tokenizer):
    model = make_model("rope", vocab_size=len(tokenizer), n_positions=512)
    haystacks = [make_haystack(sentences, templates, 128, d, random.Random(d)) for d in (0.0, 0.5, 1.0)]
    scored = passkey.score_haystacks(model, tokenizer, haystacks, batch_size=2)
    assert scored["n"] == 3 and len(scored["answers"]) == 3 and 0 <= scored["accuracy"] <= 1
    assert 0 <= scored["needle_mass"] <= 1 and 0 <= scored["retrieval_heads"] <= 1
    bands = [scored[f"mass_{passkey.band_name(b)}"] for b in decades(127)]
    assert 0 < sum(bands) <= 1 + 1e-6  # the rest of the mass is on the answer position itself
    # a model that "answers" with the key is scored right: patch the decoder
    texts = [" " + h.key + "." for h in haystacks]
    assert [exact_match(t, h.key) for t, h in zip(texts, haystacks)] == [True] * 3


def test_grid_cells_are_seeded_per_cell(sentences, templates):
    both = passkey.grid_haystacks(sentences, templates, [128, 256], [0.0, 1.0], 2, seed=0)
    one = passkey.grid_haystacks(sentences, templates, [256], [1.0], 2, seed=0)
    assert list(both) == [Cell("single", 128, 0.0), Cell("single", 128, 1.0), Cell("single", 256, 0.0),
                          Cell("single", 256, 1.0)]
    assert one[Cell("single", 256, 1.0)] == both[Cell("single", 256, 1.0)]


CELLS = {
    "a": [{"kind": "single", "length": 64, "depth": 0.0, "accuracy": 1.0},
          {"kind": "single", "length": 256, "depth": 0.0, "accuracy": 0.5},
          {"kind": "single", "length": 256, "depth": 1.0, "accuracy": 0.0},
          {"kind": "single", "length": 512, "depth": 0.0, "accuracy": 0.0}],
    "b": [{"kind": "single", "length": 64, "depth": 0.0, "accuracy": 0.5},
          {"kind": "single", "length": 256, "depth": 0.0, "accuracy": 1.0},
          {"kind": "single", "length": 512, "depth": 0.0, "accuracy": 0.5}],
    "c": [{"kind": "single", "length": 64, "depth": 0.0, "accuracy": 1.0}],
}


def test_by_length_averages_over_depths():
    assert by_length(CELLS["a"]) == {64: 1.0, 256: 0.25, 512: 0.0}


def test_ranking_uses_4x_and_8x_the_training_length():
    order = [name for name, _ in ranking(CELLS, train_len=64)]
    assert order == ["b", "a", "c"]  # b: (1 + .5)/2, a: (.25 + 0)/2, c: nothing at 4x or 8x
    text = ranking_table(CELLS, 64)
    assert text.splitlines()[2].startswith("| 1 | b |") and "256 (4x)" in text and "n/a" in text


def test_heatmap_is_a_png(tmp_path):
    passkey.plot_heatmap(CELLS["a"], "a", 64, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.part"))
    assert math.isnan(by_length(CELLS["a"], kind="multi").get(64, math.nan))


def test_answer_mask_marks_everything_after_the_last_question_token():
    import torch

    ids = torch.tensor([[5, 9, 1, 9, 7, 8, 3], [9, 1, 2, 3, 4, 5, 6]])
    mask = passkey.answer_mask(ids, answer_token=9)
    assert mask.tolist() == [[False, False, False, True, True, True],
                             [True, True, True, True, True, True]]


def test_retrieval_loss_weights_the_answer(make_model):
    model = make_model("rope", vocab_size=16)
    ids = torch.tensor([[1, 2, 3, 9, 4, 5]])
    plain = model(ids, labels=ids).loss
    same = passkey.RetrievalLoss(model, answer_token=9, weight=0.0)(ids).loss
    weighted = passkey.RetrievalLoss(model, answer_token=9, weight=2.0)(ids).loss
    logits = model(ids).logits[0, :-1]
    answer = torch.nn.functional.cross_entropy(logits[3:], ids[0, 4:])  # targets 4 and 5 follow the 9
    assert same.item() == pytest.approx(plain.item(), rel=1e-5)
    assert weighted.item() == pytest.approx(plain.item() + 2.0 * answer.item(), rel=1e-5)


def test_ranking_ties_are_broken_by_answer_tokens():
    cells = {name: [{"kind": "single", "length": 256, "depth": 0.0, "accuracy": 0.0, "answer_tokens": tokens}]
             for name, tokens in (("x", 0.1), ("y", 0.6), ("z", 0.3))}
    assert [name for name, _ in ranking(cells, train_len=64)] == ["y", "z", "x"]
    assert "| 1 | y | 0 | 0 | 0.6 |" in ranking_table(cells, 64)
