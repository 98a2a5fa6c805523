"""Passkey / needle-in-a-haystack retrieval: haystacks, needle placement, scoring and the grid.

A haystack is real filler text (whole sentences of the embedded corpus, or
any corpus, with no digits in them) with one or more key-value needles put
at sentence boundaries, followed by a question:

    ... filler. The pass key is 48213. filler ... What is the pass key? The pass key is| 48213.

The multi-key variant plants one needle per colour ("The pass key for blue
is 48213.", the others are distractors) and asks for one colour. The model
answers by greedy decoding (the project's own loop, with the KV cache) and
the answer is scored by exact match: the first run of digits it generates
must equal the key, so one digit off, a digit too many or a distractor's key
all count as wrong. No judge.

Lengths count every token of a training context: filler, needles, question,
answer and the final period. A haystack of length L therefore puts the
answer's last token at position L - 1, and at L = the training length it is
exactly the training distribution; longer haystacks test extrapolation.

The filler is whole sentences only. The needle's depth d in [0, 1] is
measured over the filler: the needle goes to the sentence boundary nearest
to d * (filler tokens), 0 = before the first sentence, 1 = after the last
(right before the question).

Per grid cell (encoding x length x depth): accuracy; answer-token accuracy
(teacher-forced: the share of answer tokens that are the model's top
prediction, which moves before exact match does); attention mass on the
target needle from the answer positions (the queries whose next token is an
answer token, teacher-forced on the gold answer), mean over layers, heads,
answer positions and haystacks; the share of heads whose most-attended key
from those positions lies in the needle (retrieval heads); and, per decade
of distance back from the answer position (1-9, 10-99, 100-999, ... tokens),
the attention mass in that band and the normalised entropy of attention
within the band (1 = uniform over the band's keys).
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..generation import greedy_decode
from ..models import encode
from .evaluate import entropy_bits, inference, model_device

NEEDLE = "The pass key is {key}."
QUESTION = "What is the pass key? The pass key is"
MULTI_NEEDLE = "The pass key for {colour} is {key}."
MULTI_QUESTION = "What is the pass key for {colour}? The pass key for {colour} is"
END = "."
COLOURS = ("blue", "red", "green", "yellow", "orange", "purple", "white", "black")
KEY_DIGITS = 5

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_DIGITS = re.compile(r"\d+")

Progress = Callable[[str], None] | None


# --- filler ------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Sentences of running text: cut after . ! ? followed by whitespace and a capital letter.

    Whitespace inside a sentence is collapsed to single spaces (the corpus has
    hard line breaks). Sentences with digits are dropped, so the only number in
    a haystack is a key, and so are fragments without a letter or without a
    final . ! ?.
    """
    sentences = []
    for raw in _SENTENCE_END.split(text):
        sentence = " ".join(raw.split())
        if (sentence and sentence[-1] in ".!?" and not _DIGITS.search(sentence)
                and re.search(r"[A-Za-z]{2}", sentence)):
            sentences.append(sentence)
    return sentences


def filler_sentences(text: str, tokenizer, min_tokens: int = 4, max_tokens: int = 24) -> list[list[int]]:
    """Token ids of each filler sentence (with its leading space), `min_tokens`..`max_tokens` long.

    The upper bound sets how finely depth can be placed: boundaries are never
    further apart than `max_tokens`.
    """
    sentences = split_sentences(text)
    encoded = tokenizer.backend_tokenizer.encode_batch([" " + s for s in sentences], add_special_tokens=False)
    kept = [list(e.ids) for e in encoded if min_tokens <= len(e.ids) <= max_tokens]
    if len(kept) < 8:
        raise UsageError(f"the filler text has only {len(kept)} usable sentences ({min_tokens}-{max_tokens} tokens, no digits)")
    return kept


# --- haystacks ----------------------------------------------------------------


@dataclass(frozen=True)
class Templates:
    """The needle and question texts, tokenised once per tokenizer (pieces with a leading space)."""

    tokenizer: object
    cache: dict = field(default_factory=dict, compare=False)

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = encode(self.tokenizer, " " + text)
        return self.cache[text]

    def needle(self, key: str, colour: str | None = None) -> list[int]:
        return self.ids(NEEDLE.format(key=key) if colour is None else MULTI_NEEDLE.format(key=key, colour=colour))

    def question(self, colour: str | None = None) -> list[int]:
        return self.ids(QUESTION if colour is None else MULTI_QUESTION.format(colour=colour))

    def answer(self, key: str) -> list[int]:
        return self.ids(key)

    def end(self) -> list[int]:
        key = ("end", END)  # not a text key: the period has no leading space, it closes the answer
        if key not in self.cache:
            self.cache[key] = encode(self.tokenizer, END)
        return self.cache[key]


@dataclass
class Haystack:
    """One retrieval example. `ids` is the prompt; the gold continuation is `answer_ids` + `end_ids`."""

    ids: list[int]
    key: str
    answer_ids: list[int]
    end_ids: list[int]
    needle_span: tuple[int, int]  # [start, end) of the target needle in `ids`
    distractor_spans: list[tuple[int, int]]
    depth: float  # requested
    filler_tokens: int
    filler_offset: int  # where in the filler (token count before it) the target needle went
    boundaries: list[int]  # sentence boundaries of the filler (token offsets into it)
    colour: str | None = None
    distractor_keys: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.ids) + len(self.answer_ids) + len(self.end_ids)

    def full(self) -> list[int]:
        """Prompt plus gold answer and period: a training context."""
        return self.ids + self.answer_ids + self.end_ids


def random_key(rng: random.Random, digits: int = KEY_DIGITS, avoid: Sequence[str] = ()) -> str:
    """A key of `digits` digits, not starting with 0, different from those in `avoid`."""
    while True:
        key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if key not in avoid:
            return key


def nearest_boundary(boundaries: Sequence[int], target: float) -> int:
    """The boundary closest to `target` (the earlier one on a tie)."""
    return min(boundaries, key=lambda b: (abs(b - target), b))


def take_filler(sentences: list[list[int]], n_tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Exactly `n_tokens` of whole sentences, and the sentence boundaries (token offsets, 0 included).

    Sentences are read in corpus order (cyclically) from a random start; one
    after which the remaining length could not be made of whole sentences is
    skipped, so the filler is whole sentences only and ends exactly at `n_tokens`.
    """
    reachable = _reachable(frozenset(map(len, sentences)), max(n_tokens, 0))
    if n_tokens < 0 or not reachable[n_tokens]:
        raise UsageError(f"haystack too short: the needles and question leave {n_tokens} tokens of filler, "
                         "not enough for whole sentences")
    index = rng.randrange(len(sentences))
    tokens, boundaries, remaining = [], [0], n_tokens
    while remaining > 0:
        sentence = sentences[index % len(sentences)]
        index += 1
        if len(sentence) <= remaining and reachable[remaining - len(sentence)]:
            tokens += sentence
            boundaries.append(len(tokens))
            remaining -= len(sentence)
    return tokens, boundaries


@functools.lru_cache(maxsize=16)
def _reachable_cached(lengths: frozenset, limit: int) -> tuple[bool, ...]:
    reachable = [True] + [False] * limit
    for total in range(1, limit + 1):
        reachable[total] = any(n <= total and reachable[total - n] for n in lengths)
    return tuple(reachable)


def _reachable(lengths: frozenset, n_tokens: int) -> tuple[bool, ...]:
    """reachable[r]: r tokens can be made of whole sentences with these lengths (each usable again)."""
    limit = 1 << max(10, n_tokens.bit_length())  # cache per power of two
    return _reachable_cached(lengths, limit)


def make_haystack(
    sentences: list[list[int]], templates: Templates, length: int, depth: float, rng: random.Random,
    n_keys: int = 1, digits: int = KEY_DIGITS,
) -> Haystack:
    """A haystack of exactly `length` tokens (answer and period included) with the target at `depth`.

    n_keys = 1: one plain needle. n_keys > 1: one needle per colour, the asked
    colour at `depth`, the distractors at other boundaries chosen at random.
    """
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"needle depth must be between 0 and 1, got {depth}")
    if not 1 <= n_keys <= len(COLOURS):
        raise UsageError(f"number of keys must be between 1 and {len(COLOURS)}, got {n_keys}")
    key = random_key(rng, digits)
    if n_keys == 1:
        colour, colours, distractor_keys = None, [None], []
    else:
        colours = rng.sample(COLOURS, n_keys)
        colour = colours[0]
        distractor_keys = []
        for _ in colours[1:]:
            distractor_keys.append(random_key(rng, digits, avoid=[key, *distractor_keys]))
    keys = [key, *distractor_keys]
    needles = [templates.needle(k, c) for k, c in zip(keys, colours)]
    question, answer, end = templates.question(colour), templates.answer(key), templates.end()
    n_filler = length - sum(map(len, needles)) - len(question) - len(answer) - len(end)
    filler, boundaries = take_filler(sentences, n_filler, rng)
    target = nearest_boundary(boundaries, depth * n_filler)
    others = [b for b in boundaries if b != target] or [target]
    places = [target] + [rng.choice(others) for _ in needles[1:]]
    # insert from the back so earlier offsets stay valid; equal places keep needle order
    order = sorted(range(len(needles)), key=lambda i: (places[i], i), reverse=True)
    ids = list(filler)
    for i in order:
        ids[places[i]:places[i]] = needles[i]
    spans = []
    for i in range(len(needles)):
        before = sum(len(needles[j]) for j in range(len(needles))
                     if places[j] < places[i] or (places[j] == places[i] and j < i))
        start = places[i] + before
        spans.append((start, start + len(needles[i])))
    ids += question
    return Haystack(ids, key, answer, end, spans[0], spans[1:], depth, n_filler, target, boundaries,
                    colour, distractor_keys)


# --- scoring ------------------------------------------------------------------


def first_number(text: str) -> str | None:
    """The first run of digits in `text`, or None."""
    found = _DIGITS.search(text)
    return found.group() if found else None


def exact_match(generated: str, key: str) -> bool:
    """True when the first number in the generated text is exactly the key (no judge, no partial credit)."""
    return first_number(generated) == key


# --- running a model on haystacks ------------------------------------------------


def answer_texts(model, tokenizer, haystacks: Sequence[Haystack], batch_size: int) -> list[str]:
    """Greedy continuations (answer length + period), decoded, batched by equal prompt length."""
    device = model_device(model)
    texts: list[str | None] = [None] * len(haystacks)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, h in enumerate(haystacks):
        groups.setdefault((len(h.ids), len(h.answer_ids) + len(h.end_ids)), []).append(index)
    with inference(model):
        for (_, n_new), indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                prompt = torch.tensor([haystacks[i].ids for i in chunk], device=device)
                out = greedy_decode(model, prompt, n_new)[:, prompt.shape[1]:].cpu()
                for i, row in zip(chunk, out.tolist()):
                    texts[i] = tokenizer.decode(row)
    return texts


def decades(max_distance: int) -> list[tuple[int, int]]:
    """Distance bands [10^k, 10^(k+1) - 1] covering 1 .. max_distance."""
    bands, low = [], 1
    while low <= max_distance:
        bands.append((low, 10 * low - 1))
        low *= 10
    return bands


def band_name(band: tuple[int, int]) -> str:
    return f"{band[0]}-{band[1]}"


def attention_diagnostics(model, haystacks: Sequence[Haystack], batch_size: int) -> list[dict]:
    """Per haystack: answer-token accuracy, needle mass, retrieval-head share and per-decade
    mass/entropy from the answer positions.

    The gold answer is teacher-forced (prompt + answer ids); the answer
    positions are the queries whose next token is an answer token: the last
    prompt token and every answer token but the last. `answer_tokens` is the
    share of those positions whose most likely next token is the gold one (a
    graded retrieval measure that moves before exact match does); the rest is
    averaged over layers, heads and those positions.
    """
    from ..encodings import eager_attention

    device = model_device(model)
    results: list[dict | None] = [None] * len(haystacks)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, h in enumerate(haystacks):
        groups.setdefault((len(h.ids), len(h.answer_ids)), []).append(index)
    with inference(model), eager_attention(model):
        for (prompt_len, answer_len), indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                ids = torch.tensor([haystacks[i].ids + haystacks[i].answer_ids for i in chunk], device=device)
                out = model(ids, output_attentions=True)
                queries = torch.arange(prompt_len - 1, prompt_len + answer_len - 1, device=device)
                # (layers, B, H, Q, T_k) at the answer positions
                probs = torch.stack([a[:, :, queries].float() for a in out.attentions])
                hits = (out.logits[:, queries].argmax(-1) == ids[:, queries + 1]).float().mean(-1)
                for row, i in enumerate(chunk):
                    results[i] = {"answer_tokens": hits[row].item(),
                                  **_diagnose(probs[:, row], queries, haystacks[i].needle_span)}
    return results


def _diagnose(probs: torch.Tensor, queries: torch.Tensor, span: tuple[int, int]) -> dict:
    """probs (layers, H, Q, T_k) for one haystack; see `attention_diagnostics`."""
    n_keys = probs.shape[-1]
    keys = torch.arange(n_keys, device=probs.device)
    in_needle = (keys >= span[0]) & (keys < span[1])
    mass = probs[..., in_needle].sum(-1)  # (layers, H, Q)
    top = probs.argmax(-1)
    retrieval = in_needle[top].float()
    out = {"needle_mass": mass.mean().item(), "retrieval_heads": retrieval.mean().item()}
    distance = queries[:, None] - keys[None, :]  # (Q, T_k); negative above the diagonal
    for band in decades(int(queries.max())):
        name = band_name(band)
        inside = (distance >= band[0]) & (distance <= band[1])  # (Q, T_k)
        band_probs = probs * inside
        band_mass = band_probs.sum(-1)  # (layers, H, Q)
        width = inside.sum(-1).float()  # keys in the band per query
        conditional = band_probs / band_mass.clamp_min(1e-30)[..., None]
        entropy = entropy_bits(conditional)
        normalised = torch.where(width > 1, entropy / torch.log2(width.clamp_min(2)), torch.full_like(entropy, math.nan))
        valid = (band_mass > 0) & (width > 1)
        out[f"mass_{name}"] = band_mass.mean().item()
        out[f"entropy_{name}"] = normalised[valid].mean().item() if bool(valid.any()) else math.nan
    return out


def score_haystacks(model, tokenizer, haystacks: Sequence[Haystack], batch_size: int,
                    diagnostics: bool = True) -> dict:
    """Accuracy, the answers, and (optionally) attention diagnostics per haystack and their means."""
    texts = answer_texts(model, tokenizer, haystacks, batch_size)
    correct = [exact_match(text, h.key) for text, h in zip(texts, haystacks)]
    result = {"accuracy": float(np.mean(correct)), "n": len(haystacks), "answers": texts, "correct": correct}
    if diagnostics:
        per = attention_diagnostics(model, haystacks, batch_size)
        result["per_haystack"] = per
        result.update(mean_diagnostics(per))
    return result


# --- training on haystacks ---------------------------------------------------------------


def answer_mask(ids: torch.Tensor, answer_token: int) -> torch.Tensor:
    """(B, T-1) over next-token targets: True where the target is an answer token or the final period,
    i.e. every target after the last `answer_token` (the question's last token) of its row."""
    inputs = ids[:, :-1]
    position = torch.arange(inputs.shape[1], device=ids.device)
    last = torch.where(inputs == answer_token, position, -1).max(dim=1).values[:, None]
    return (position >= last) & (last >= 0)


class RetrievalLoss(nn.Module):
    """A causal LM whose `model(ids, labels=ids).loss` (what `train_lm` calls) is the LM loss over the
    whole context plus `weight` x the mean loss on the answer tokens (see `answer_mask`).

    The filler keeps the model a language model; the weighted answer term is
    what makes retrieval appear within a few hundred steps at small scale
    (with the LM loss alone the answer is under a tenth of the targets, and a
    small model does not learn it in that time). `.model` is the LM itself.
    """

    def __init__(self, model, answer_token: int, weight: float):
        super().__init__()
        self.model, self.answer_token, self.weight = model, int(answer_token), float(weight)

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.model(input_ids, **kwargs).logits[:, :-1].float()
        targets = input_ids[:, 1:]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="none").view(targets.shape)
        mask = answer_mask(input_ids, self.answer_token).float()
        answer = (losses * mask).sum() / mask.sum().clamp_min(1.0)
        return SimpleNamespace(loss=losses.mean() + self.weight * answer, logits=None)


# --- the grid -------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One grid cell's address: haystack kind ('single' or 'multi'), length in tokens, needle depth."""

    kind: str
    length: int
    depth: float


def grid_haystacks(
    sentences: list[list[int]], templates: Templates, lengths: Sequence[int], depths: Sequence[float],
    per_cell: int, seed: int, n_keys: int = 1, digits: int = KEY_DIGITS,
) -> dict[Cell, list[Haystack]]:
    """`per_cell` haystacks for every (length, depth), drawn from one seeded generator per cell,
    so a cell's haystacks do not depend on which other cells are asked for."""
    kind = "single" if n_keys == 1 else "multi"
    cells = {}
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}/{kind}/{length}/{depth}")
            cells[Cell(kind, int(length), float(depth))] = [
                make_haystack(sentences, templates, int(length), float(depth), rng, n_keys=n_keys, digits=digits)
                for _ in range(per_cell)
            ]
    return cells


def run_grid(model, tokenizer, cells: dict[Cell, list[Haystack]], batch_size: int,
             progress: Progress = None) -> list[dict]:
    """Score every cell; one dict per cell with its address, accuracy and attention diagnostics."""
    say = progress or (lambda message: None)
    results = []
    by_length: dict[tuple[str, int], list[Cell]] = {}
    for cell in cells:
        by_length.setdefault((cell.kind, cell.length), []).append(cell)
    for (kind, length), group in by_length.items():
        say(f"{kind}-key haystacks of {length} tokens, {len(group)} depths")
        flat = [h for cell in group for h in cells[cell]]
        scored = score_haystacks(model, tokenizer, flat, batch_size)
        start = 0
        for cell in group:  # per-cell means from the per-haystack parts
            n = len(cells[cell])
            part = slice(start, start + n)
            start += n
            row = {"kind": cell.kind, "length": cell.length, "depth": cell.depth, "n": n,
                   "accuracy": float(np.mean(scored["correct"][part]))}
            row.update(mean_diagnostics(scored["per_haystack"][part]))
            results.append(row)
    return results


def mean_diagnostics(per: Sequence[dict]) -> dict:
    """Mean of each diagnostic over haystacks, ignoring NaN (a band a haystack does not reach)."""
    names = list(dict.fromkeys(name for p in per for name in p))
    out = {}
    for name in names:
        values = np.array([p.get(name, math.nan) for p in per], dtype=np.float64)
        out[name] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    return out


def by_length(cells: Sequence[dict], kind: str = "single", field_name: str = "accuracy") -> dict[int, float]:
    """Mean of one field over depths (cells weighted equally) per haystack length."""
    lengths: dict[int, list[float]] = {}
    for cell in cells:
        if cell["kind"] == kind:
            lengths.setdefault(cell["length"], []).append(cell[field_name])
    return {length: float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            for length, values in sorted(lengths.items())}


# --- outputs -------------------------------------------------------------------------


def plot_heatmap(cells: Sequence[dict], encoding: str, train_len: int, path) -> None:
    """Accuracy over needle depth (rows) x haystack length (columns), one panel per haystack kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    kinds = [k for k in ("single", "multi") if any(c["kind"] == k for c in cells)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.6 + 1.3 * len(kinds) * max(2, _n_lengths(cells)), 4.4),
                             squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mine = [c for c in cells if c["kind"] == kind]
        lengths = sorted({c["length"] for c in mine})
        depths = sorted({c["depth"] for c in mine})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for c in mine:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(lengths)), [f"{n}\n({n / train_len:g}x)" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("haystack length (tokens; x training length)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{encoding}: {'one key' if kind == 'single' else 'several keys, one asked'}")
        fig.colorbar(image, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_overview(grids: dict[str, Sequence[dict]], train_len: int, path) -> None:
    """Accuracy (mean over depths) against haystack length, one line per encoding in ranking order,
    one panel per haystack kind: the whole grid at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    kinds = [k for k in ("single", "multi") if any(c["kind"] == k for cells in grids.values() for c in cells)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds) + 1.8, 4.6), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    order = [name for name, _ in ranking(grids, train_len)]  # one colour per encoding in both panels
    for ax, kind in zip(axes[0], kinds):
        for i, name in enumerate(order):
            accuracy = by_length(grids[name], kind)
            if accuracy:
                ax.plot(list(accuracy), list(accuracy.values()), marker="o", lw=1.4, ms=3.5,
                        color=colours[i % 20], ls="-" if i < 10 else "--", label=name)
        ax.set_xscale("log", base=2)
        lengths = sorted({c["length"] for cells in grids.values() for c in cells if c["kind"] == kind})
        ax.set_xticks(lengths, [f"{n}\n({n / train_len:g}x)" for n in lengths])
        ax.minorticks_off()
        ax.axvline(train_len, color="grey", ls=":", lw=1)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("haystack length (tokens; x training length)")
        ax.set_title("one key" if kind == "single" else "several keys, one asked")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy (mean over depths)")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False,
                       title="ranked at 4x, 8x", title_fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _n_lengths(cells: Sequence[dict]) -> int:
    return len({c["length"] for c in cells})


def _mean_at(values: dict[int, float], lengths: Sequence[int]) -> float:
    finite = [values[n] for n in lengths if n in values and not math.isnan(values[n])]
    return sum(finite) / len(finite) if finite else math.nan


def ranking(grids: dict[str, Sequence[dict]], train_len: int, multiples: Sequence[int] = (4, 8),
            kind: str = "single") -> list[tuple[str, dict[int, float]]]:
    """Encodings ordered by mean accuracy at `multiples` x the training length (each a mean over depths),
    best first; ties are broken by answer-token accuracy at the same lengths, then by name; an
    encoding without those lengths sorts last. Returns (encoding, accuracy per length)."""
    lengths = [m * train_len for m in multiples]

    def score(name):
        accuracy = _mean_at(by_length(grids[name], kind), lengths)
        tokens = _mean_at(by_length(grids[name], kind, "answer_tokens"), lengths) \
            if any("answer_tokens" in c for c in grids[name]) else math.nan
        return (math.isnan(accuracy), -(0.0 if math.isnan(accuracy) else accuracy),
                -(0.0 if math.isnan(tokens) else tokens), name)

    return [(name, by_length(grids[name], kind)) for name in sorted(grids, key=score)]


def ranking_table(grids: dict[str, Sequence[dict]], train_len: int, kind: str = "single") -> str:
    """Markdown: rank, encoding, accuracy at every grid length (mean over depths), the mean at 4x and 8x
    that ranks them, and answer-token accuracy there (the tie-breaker)."""
    from .report import table

    ranked = ranking(grids, train_len, kind=kind)
    lengths = sorted({length for _, accuracy in ranked for length in accuracy})
    key = [4 * train_len, 8 * train_len]
    header = ["rank", "encoding", *[f"{n} ({n / train_len:g}x)" for n in lengths], "mean of 4x and 8x",
              "answer tokens at 4x and 8x"]
    rows = []
    for rank, (name, accuracy) in enumerate(ranked, 1):
        tokens = by_length(grids[name], kind, "answer_tokens") if any("answer_tokens" in c for c in grids[name]) else {}
        rows.append([rank, name, *[accuracy.get(n, math.nan) for n in lengths], _mean_at(accuracy, key),
                     _mean_at(tokens, key)])
    return table(header, rows)


def cells_table(cells: Sequence[dict]) -> str:
    """Markdown: every cell with its accuracy and attention diagnostics."""
    from .report import table

    bands = sorted({k for c in cells for k in c if k.startswith(("mass_", "entropy_"))},
                   key=lambda k: (k.split("_", 1)[0], int(k.split("_", 1)[1].split("-")[0])))
    header = ["kind", "length", "depth", "n", "accuracy", "answer tokens", "needle mass", "retrieval heads",
              *[b.replace("_", " ") + " back" for b in bands]]
    rows = [[c["kind"], c["length"], f"{c['depth']:.0%}", c["n"], c["accuracy"], c.get("answer_tokens", math.nan),
             c.get("needle_mass", math.nan), c.get("retrieval_heads", math.nan),
             *[c.get(b, math.nan) for b in bands]] for c in cells]
    return table(header, rows)
