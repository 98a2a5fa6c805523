"""Evaluate one trained variant: perplexity, attention entropy, needle mass, generations.

Everything here is deterministic (eval mode, no sampling, fixed chunking) so
two runs of the same checkpoint give the same numbers, and every function
leaves the model's train/eval mode and attention implementation as it found
them. Attention probabilities come from the eager twin (`eager_attention`);
perplexity and generation use whatever fast path the model already has.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import chunk_tokens
from ..encodings import eager_attention, is_patched
from ..errors import UsageError
from ..generation import greedy_decode

Progress = Callable[[str], None] | None
REPETITION_NGRAM = 4  # n of the n-grams whose repeats `repetition_rate` counts


@contextlib.contextmanager
def inference(model) -> Iterator[None]:
    """Eval mode and no_grad for the block, then the model's own train/eval mode back."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model) -> torch.device:
    """Where inputs must go; CPU for parameter-free stubs."""
    return next(model.parameters(), torch.empty(0)).device


def batches(chunks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive row slices, so memory stays bounded and results keep chunk order."""
    for start in range(0, chunks.shape[0], batch_size):
        yield chunks[start:start + batch_size]


def nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries; NaN (without a warning) when there are none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if np.size(values) else math.nan


def entropy_bits(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in bits along `dim`, with 0 * log 0 = 0.

    Masked-out keys have probability exactly 0; a plain p * log p would turn
    them into NaN.
    """
    probs = probs.float()
    terms = torch.where(probs > 0, probs * torch.log2(probs.clamp_min(1e-45)), torch.zeros_like(probs))
    return -terms.sum(dim=dim)


def normalise_entropy(entropy):
    """Divide the entropy at query position i by log2(i + 1), its causal maximum.

    Query i sees i + 1 keys, so raw entropy grows with position even when
    attention does not change character; after division 1 means uniform over
    the visible keys and 0 means one key. Position 0 sees a single key
    (log2 1 = 0), so it is NaN. Accepts numpy arrays or tensors, shape (..., T).
    """
    values = np.asarray(entropy, dtype=np.float64)
    ceiling = np.log2(np.arange(values.shape[-1]) + 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = values / ceiling
    out[..., 0] = np.nan
    return out


def perplexity(model, chunks: torch.Tensor, batch_size: int) -> float:
    """exp of the mean next-token NLL over every predicted token of every chunk."""
    device = model_device(model)
    total, count = 0.0, 0
    with inference(model):
        for batch in batches(chunks, batch_size):
            batch = batch.to(device)
            logits = model(batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return math.exp(total / count)


def attention_maps(model, chunks: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (batch, probabilities (layers, B, H, T, T)) from the eager twin, batch by batch."""
    device = model_device(model)
    with inference(model), eager_attention(model):
        for batch in batches(chunks, batch_size):
            batch = batch.to(device)
            attentions = model(batch, output_attentions=True).attentions
            yield batch, torch.stack(attentions).float()


def attention_entropy_curves(model, chunks: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Attention entropy per layer, head and query position, averaged over sequences.

    Returns `raw` (bits) and `normalised` (see `normalise_entropy`), each of
    shape (layers, heads, T).
    """
    total = None
    for _, probs in attention_maps(model, chunks, batch_size):
        summed = entropy_bits(probs).sum(dim=1)  # (layers, H, T)
        total = summed if total is None else total + summed
    raw = (total / chunks.shape[0]).cpu().numpy().astype(np.float64)
    return {"raw": raw, "normalised": normalise_entropy(raw)}


def needle_masks(batch_records: Sequence, length: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: needle keys (B, T), queries after the needle (B, T), needle length (B, 1)."""
    pos = torch.arange(length, device=device)
    start = torch.tensor([r.token_index for r in batch_records], device=device)[:, None]
    size = torch.tensor([r.length for r in batch_records], device=device)[:, None]
    keys = (pos >= start) & (pos < start + size)
    queries = pos >= start + size
    return keys, queries, size


def needle_rows(chunks: torch.Tensor, records: Sequence) -> torch.Tensor:
    """The chunks that carry a needle, in record order (one needle per chunk, as planted)."""
    indices = [r.chunk_index for r in records]
    if not indices:
        raise ValueError("needle_attention_mass needs at least one needle record")
    if len(set(indices)) != len(indices) or not all(0 <= i < chunks.shape[0] for i in indices):
        raise ValueError(f"needle records must name distinct chunks among {chunks.shape[0]}, got {indices}")
    return chunks[indices]


def needle_attention_mass(model, chunks: torch.Tensor, records: Sequence, batch_size: int, train_len: int) -> dict:
    """Attention mass on the needle's tokens from every query after the needle ends.

    Only the chunks named by a record are used (`inject_needles` may plant
    one every few chunks). A query's mass is the sum of its probabilities on
    the needle's keys. All (sequence, query) pairs are pooled and averaged
    together with layers and heads, so `needle_mass` is the mean over layers, heads, queries and
    sequences; `_inside` / `_beyond` split the queries at `train_len`. The
    uniform baseline (`needle_mass_uniform`, with the same splits) is needle
    length / visible keys (i + 1) for the same queries, averaged the same
    way: the mass that attention blind to content would give. A split with
    no queries is NaN. `needle_mass_heads` is the (layers, heads) mean.
    """
    rows = needle_rows(chunks, records)
    length = chunks.shape[1]
    splits = ("", "_inside", "_beyond")
    sums, uniform, counts = dict.fromkeys(splits, 0.0), dict.fromkeys(splits, 0.0), dict.fromkeys(splits, 0)
    done = 0
    for batch, probs in attention_maps(model, rows, batch_size):
        keys, after, size = needle_masks(records[done:done + batch.shape[0]], length, probs.device)
        done += batch.shape[0]
        on_needle = torch.einsum("lbhqk,bk->lbhq", probs, keys.to(probs.dtype)).double()
        share = size / torch.arange(1, length + 1, device=probs.device, dtype=torch.float64)  # (B, T)
        in_window = torch.arange(length, device=probs.device) < train_len
        for split, queries in zip(splits, (after, after & in_window, after & ~in_window)):
            sums[split] = sums[split] + (on_needle * queries[None, :, None, :]).sum(dim=(1, 3))
            uniform[split] += share[queries].sum().item()
            counts[split] += int(queries.sum())
    result = {}
    for split in splits:
        n = counts[split]
        result[f"needle_mass{split}"] = sums[split].mean().item() / n if n else math.nan
        result[f"needle_mass_uniform{split}"] = uniform[split] / n if n else math.nan
    result["needle_mass_heads"] = (sums[""] / max(counts[""], 1)).cpu().numpy()
    return result


def repetition_rate(tokens, n: int = REPETITION_NGRAM) -> float:
    """Share of a sequence's n-grams that repeat an n-gram seen earlier in it.

    With m = len(tokens) - n + 1 n-grams (one starting at every position),
    the rate is (number of n-grams equal to one starting earlier) / m: 0 when
    all n-grams are distinct, approaching 1 when the text loops (a period-p
    loop of length L gives (L - n + 1 - p) / (L - n + 1)). NaN when the
    sequence is shorter than n.
    """
    values = [int(t) for t in tokens]
    grams = [tuple(values[i:i + n]) for i in range(len(values) - n + 1)]
    if not grams:
        return math.nan
    return (len(grams) - len(set(grams))) / len(grams)


def mean_repetition(rows: torch.Tensor) -> float:
    """Mean repetition rate over the rows (sequences) of a (N, T) tensor."""
    return float(np.mean([repetition_rate(row) for row in rows.tolist()]))


def summarise_curves(curves: dict[str, np.ndarray], train_len: int, prefix: str = "") -> dict[str, float]:
    """Mean raw and normalised entropy over all layers and heads, inside and beyond the window.

    Inside is query positions 0 .. train_len - 1 (position 0 is NaN in the
    normalised curve and so drops out of the nanmean), beyond is train_len ..
    T - 1; a split with no positions is NaN. Keys are
    f"{prefix}entropy_{raw|norm}_{inside|beyond}".
    """
    summary = {}
    for kind, key in (("raw", "raw"), ("norm", "normalised")):
        values = np.asarray(curves[key])
        summary[f"{prefix}entropy_{kind}_inside"] = nanmean(values[..., :train_len])
        summary[f"{prefix}entropy_{kind}_beyond"] = nanmean(values[..., train_len:])
    return summary


def generation_stats(
    model, chunks: torch.Tensor, prompt_len: int, batch_size: int, train_len: int | None = None
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Greedy continuations of held-out prompts: do they loop, and how does attention look?

    The first `prompt_len` tokens of each chunk are continued greedily to the
    chunk's full length. `repetition_generated` is the mean repetition rate
    of the generated part, `repetition_reference` that of the real text over
    the same span. A teacher-forced eager pass over the generated sequences
    gives `generated_raw` / `generated_normalised` entropy curves; with
    `train_len`, their inside/beyond summary is added to the scalars with the
    prefix "generated_".
    """
    n_chunks, eval_len = chunks.shape
    if n_chunks == 0:
        raise ValueError("generation_stats needs at least one chunk")
    if not 0 < prompt_len < eval_len:
        raise ValueError(f"prompt_len must be in 1 .. {eval_len - 1}, got {prompt_len}")
    device = model_device(model)
    with inference(model):
        generated = torch.cat(
            [greedy_decode(model, batch.to(device), eval_len - prompt_len).cpu()
             for batch in batches(chunks[:, :prompt_len], batch_size)]
        )
    scalars = {
        "repetition_generated": mean_repetition(generated[:, prompt_len:]),
        "repetition_reference": mean_repetition(chunks[:, prompt_len:]),
    }
    entropy = attention_entropy_curves(model, generated, batch_size)
    curves = {"generated_raw": entropy["raw"], "generated_normalised": entropy["normalised"]}
    if train_len is not None:
        scalars.update(summarise_curves(entropy, train_len, prefix="generated_"))
    return scalars, curves


def check_length_supported(model, length: int) -> None:
    """The learned control has no embedding for positions >= n_positions: say so plainly."""
    limit = model.config.n_positions
    if not is_patched(model) and length > limit:
        raise UsageError(
            f"the learned-position model has n_positions={limit} and cannot be evaluated at {length} tokens; "
            f"build it with n_positions >= {length}"
        )


def evaluate_variant(
    model,
    *,
    eval_text_ids: torch.Tensor,
    needle_chunks: torch.Tensor,
    needle_records: Sequence,
    train_len: int,
    eval_len: int,
    batch_size: int,
    n_generate: int,
    prompt_len: int,
    progress: Progress = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """All evaluation numbers for one trained model.

    Perplexity at `train_len` and at `eval_len` is measured on the same
    tokens (the held-out ids cut to a whole number of `eval_len` chunks), so
    the ratio isolates the effect of the longer context. Entropy curves use
    those `eval_len` chunks, generation the first `n_generate` of them.
    """
    say = progress or (lambda message: None)
    check_length_supported(model, max(eval_len, needle_chunks.shape[1]))
    long_chunks = chunk_tokens(eval_text_ids, eval_len)
    short_chunks = chunk_tokens(long_chunks, train_len)
    scalars: dict[str, float] = {}
    say(f"perplexity at {train_len} and {eval_len} tokens")
    scalars["ppl_train_len"] = perplexity(model, short_chunks, batch_size)
    scalars["ppl_eval_len"] = perplexity(model, long_chunks, batch_size)
    scalars[f"ppl_{train_len}"] = scalars["ppl_train_len"]
    scalars[f"ppl_{eval_len}"] = scalars["ppl_eval_len"]
    say(f"attention entropy on {long_chunks.shape[0]} chunks of {eval_len}")
    curves = attention_entropy_curves(model, long_chunks, batch_size)
    scalars.update(summarise_curves(curves, train_len))
    say(f"needle attention mass on {needle_chunks.shape[0]} chunks")
    needle = needle_attention_mass(model, needle_chunks, needle_records, batch_size, train_len)
    curves["needle_mass_heads"] = needle.pop("needle_mass_heads")
    scalars.update(needle)
    say(f"greedy generation from {prompt_len}-token prompts on {min(n_generate, long_chunks.shape[0])} chunks")
    generated, generated_curves = generation_stats(model, long_chunks[:n_generate], prompt_len, batch_size, train_len)
    scalars.update(generated)
    curves.update(generated_curves)
    return scalars, curves


def length_sweep(
    model, eval_text_ids: torch.Tensor, lengths: Sequence[int], train_len: int, batch_size: int,
    entropy_sequences: int = 4, progress: Progress = None,
) -> dict[int, dict[str, float]]:
    """Perplexity and mean normalised attention entropy at each evaluation length.

    Every length reads the same tokens (the held-out ids cut to whole chunks
    of the longest length), so differences come from context length alone.
    Entropy uses the first `entropy_sequences` chunks of each length; its
    mean is over all layers, heads and query positions >= 1, and beyond the
    training window over positions >= train_len.
    """
    say = progress or (lambda message: None)
    longest = max(lengths)
    check_length_supported(model, longest)
    tokens = chunk_tokens(eval_text_ids, longest).reshape(-1)
    results = {}
    for length in sorted(lengths):
        say(f"sweep at {length} tokens")
        chunks = chunk_tokens(tokens, length)
        normalised = attention_entropy_curves(model, chunks[:entropy_sequences], batch_size)["normalised"]
        results[length] = {
            "ppl": perplexity(model, chunks, batch_size),
            "entropy_norm": nanmean(normalised),
            "entropy_norm_beyond": nanmean(normalised[..., train_len:]),
        }
    return results
