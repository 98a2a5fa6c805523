"""`mempos bench`: the needle benchmark as a regression suite, and the passkey grid.

A fixed benchmark: fixed seeds, the embedded corpus as filler, a fixed small
GPT-2 configuration and every registered encoding. For each encoding one
model is trained from scratch on passkey retrieval in real filler text at the
training length, then measured:

    <enc>/ppl@<L>                   perplexity of held-out filler text at 1x and 4x the training length
    <enc>/entropy_inside@<4L>       mean normalised attention entropy on held-out text of 4x the
    <enc>/entropy_beyond@<4L>       training length, query positions inside / beyond the window
    <enc>/accuracy@<L>              exact-match passkey accuracy (greedy decoding), mean over depths
    <enc>/multikey_accuracy@<L>     the same with distractor keys (sizes that train on them)
    <enc>/answer_tokens@<L>         teacher-forced share of answer tokens predicted right (moves before
                                    exact match does: the retrieval signal of the smoke size)
    <enc>/needle_mass@<L>           attention mass on the needle from the answer positions
    <enc>/retrieval_heads@<L>       share of heads whose most-attended key is in the needle

Every figure is compared with a baseline file (`baselines/<size>.json`, the
smoke one ships with the package): value, tolerance ({"abs": x} or
{"rel": y}) and direction per figure. Verdicts: ok, REGRESSION (worse than
tolerance), improved (better than tolerance: the baseline is stale), CHANGED
(a figure without a better direction moved beyond tolerance), missing (in the
baseline, not measured), new (measured, not in the baseline). Exit status: 0
when every figure holds, 1 on REGRESSION, CHANGED or missing, 2 on bad input.

Determinism: one torch thread per process, deterministic algorithms, every
generator seeded; each encoding is trained and measured in one process on
its own (workers only split the encodings between them), so the figures do
not depend on --jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shlex
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Mapping, Sequence

from ..errors import UsageError
from .options import number_list, parts
from .workers import (
    default_jobs, results_as_completed, stop_pool, terminate_as_interrupt, torch_threads, worker_pool,
)

BENCHMARK_VERSION = 1
BASELINE_DIR = Path(__file__).resolve().parent / "baselines"
SIZES_HELP = {
    "smoke": "2-layer width-64 GPT-2, 64-token contexts, 3-digit keys (under a minute; tests, CI)",
    "tiny": "2-layer width-128 GPT-2, 128-token contexts, 3-digit keys, distractor keys; grid 128-1024 x 11 depths",
}

Progress = Callable[[str], None] | None


# --- the fixed benchmark ---------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """Everything that defines one size of the benchmark. Changing any value changes the figures:
    bump BENCHMARK_VERSION (or the size's own baseline) when you do."""

    name: str
    train_len: int
    vocab_size: int
    tokenizer_chars: int  # the tokenizer is trained on the first N characters of the training text
    n_layer: int
    n_head: int
    n_embd: int
    train_contexts: int
    batch_size: int
    lr: float
    key_digits: int
    multiples: tuple[int, ...]  # haystack lengths as multiples of train_len
    depths: tuple[float, ...]
    per_cell: int  # haystacks per (length, depth) cell
    multi_key_share: float = 0.0  # share of training contexts with distractor keys (0: none, no multi-key figures)
    n_keys: int = 3  # keys per multi-key haystack (one asked, the rest distractors)
    answer_weight: float = 5.0  # loss = LM loss on the whole context + answer_weight * loss on the answer tokens
    epochs: float = 1.0
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_sentence_tokens: int = 24
    text_sequences: int = 4  # held-out sequences of 4x train_len for perplexity and entropy
    eval_batch_size: int = 8
    seed: int = 0

    @property
    def eval_len(self) -> int:
        """The length schedules (PI, NTK, YaRN, Llama 3) are set for, and perplexity / entropy are read at."""
        return 4 * self.train_len

    @property
    def lengths(self) -> list[int]:
        return [m * self.train_len for m in self.multiples]

    def replace(self, **changes) -> "Size":
        return dataclasses.replace(self, **changes)


SIZES: dict[str, Size] = {
    "smoke": Size(
        name="smoke", train_len=64, vocab_size=1024, tokenizer_chars=400_000, n_layer=2, n_head=2, n_embd=64,
        train_contexts=1600, batch_size=8, lr=3e-3, key_digits=3, multiples=(1, 2, 4, 8),
        depths=(0.0, 0.25, 0.5, 0.75, 1.0), per_cell=4, max_sentence_tokens=16,
    ),
    # 1500 steps: enough for rope to retrieve 3-digit keys at 1x (0.83 in a pilot with a smaller grid);
    # 5-digit keys needed twice the steps for the same (1.00 at 3000 steps)
    "tiny": Size(
        name="tiny", train_len=128, vocab_size=2048, tokenizer_chars=1_000_000, n_layer=2, n_head=4, n_embd=128,
        train_contexts=12_000, batch_size=8, lr=2e-3, key_digits=3, multiples=(1, 2, 4, 8),
        depths=tuple(round(0.1 * i, 1) for i in range(11)), per_cell=5, multi_key_share=0.25,
        text_sequences=8, eval_batch_size=4,
    ),
}


def get_size(name: str) -> Size:
    try:
        return SIZES[name]
    except KeyError:
        raise UsageError(f"unknown benchmark size {name!r}; choose from {', '.join(SIZES)}") from None


# --- determinism -------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic(threads: int = 1):
    """One torch thread and deterministic algorithms for the block, then the caller's settings back."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch_threads(threads):
            yield
    finally:
        torch.use_deterministic_algorithms(before)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- data ------------------------------------------------------------------------------


@dataclass
class BenchData:
    """Everything every encoding shares; plain data so it travels to worker processes."""

    tokenizer_json: str
    train_chunks: object  # LongTensor (N, train_len): passkey contexts
    answer_token: int  # the question's last token: the answer starts right after its last occurrence
    text_ids: object  # LongTensor: held-out filler text for perplexity and entropy
    cells: dict  # Cell -> list[Haystack]


def build_data(size: Size, lengths: Sequence[int] | None = None, depths: Sequence[float] | None = None,
               per_cell: int | None = None, progress: Progress = None) -> BenchData:
    """Tokenizer, training contexts and evaluation haystacks, all from fixed seeds."""
    import torch

    from ..data import load_text
    from ..models import tokenizer_to_json, train_tokenizer
    from .passkey import Templates, filler_sentences, grid_haystacks, make_haystack

    say = progress or (lambda message: None)
    corpus = load_text("embedded")
    say(f"tokenizer ({size.vocab_size} tokens) and {size.train_contexts} training haystacks of {size.train_len} tokens")
    tokenizer = train_tokenizer(corpus.train[: size.tokenizer_chars], size.vocab_size)
    templates = Templates(tokenizer)
    train_filler = filler_sentences(corpus.train, tokenizer, max_tokens=size.max_sentence_tokens)
    eval_filler = filler_sentences(corpus.eval, tokenizer, max_tokens=size.max_sentence_tokens)
    rng = random.Random(f"{size.seed}/train")
    contexts = []
    for _ in range(size.train_contexts):
        n_keys = size.n_keys if rng.random() < size.multi_key_share else 1
        haystack = make_haystack(train_filler, templates, size.train_len, rng.random(), rng,
                                 n_keys=n_keys, digits=size.key_digits)
        contexts.append(haystack.full())
    lengths = list(lengths or size.lengths)
    depths = list(depths if depths is not None else size.depths)
    per_cell = per_cell or size.per_cell
    cells = grid_haystacks(eval_filler, templates, lengths, depths, per_cell, size.seed, digits=size.key_digits)
    if size.multi_key_share > 0:
        cells |= grid_haystacks(eval_filler, templates, lengths, depths, per_cell, size.seed,
                                n_keys=size.n_keys, digits=size.key_digits)
    # perplexity and entropy read held-out filler: the eval split's sentences in order, as the training filler
    text = [t for sentence in eval_filler for t in sentence][: size.text_sequences * size.eval_len]
    if len(text) < size.text_sequences * size.eval_len:
        raise UsageError(f"the held-out filler has {len(text)} tokens, fewer than {size.text_sequences} x {size.eval_len}")
    text_ids = torch.tensor(text, dtype=torch.long)
    return BenchData(tokenizer_to_json(tokenizer), torch.tensor(contexts, dtype=torch.long),
                     templates.question()[-1], text_ids, cells)


# --- training ----------------------------------------------------------------------------


def train_config(size: Size, seed: int) -> SimpleNamespace:
    return SimpleNamespace(epochs=size.epochs, seed=seed, batch_size=size.batch_size, lr=size.lr,
                           weight_decay=size.weight_decay, grad_clip=size.grad_clip, warmup_ratio=size.warmup_ratio)


def train_encoding(name: str, size: Size, data: BenchData, tokenizer, seed: int | None = None):
    """A fresh small GPT-2 with the named encoding, trained on the passkey contexts; (model, summary)."""
    from accelerate import Accelerator

    from ..encodings import apply_encoding
    from ..encodings.registry import length_options
    from ..models import small_gpt2
    from .passkey import RetrievalLoss
    from .train import train_lm

    seed = size.seed if seed is None else seed
    longest = max(max(c.length for c in data.cells), size.eval_len)
    model = small_gpt2(len(tokenizer), n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd,
                       n_positions=max(1024, longest), seed=seed)
    model = apply_encoding(model, name, **length_options(name, size.train_len, size.eval_len))
    seed_everything(seed)
    # CPU on purpose, even where a GPU exists: the baseline figures are CPU figures
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    wrapped = RetrievalLoss(model, data.answer_token, size.answer_weight)
    summary = train_lm(wrapped, data.train_chunks, train_config(size, seed), accelerator, label=name)
    model = accelerator.unwrap_model(wrapped).model
    model.eval()
    return model, summary


# --- measuring ---------------------------------------------------------------------------


def measure(model, tokenizer, name: str, size: Size, data: BenchData, progress: Progress = None,
            text: bool = True) -> tuple[dict[str, float], list[dict]]:
    """The figures of one trained model, and the grid cells they were read from."""
    from ..data import chunk_tokens
    from .evaluate import attention_entropy_curves, perplexity, summarise_curves
    from .passkey import by_length, run_grid

    figures: dict[str, float] = {}
    if text:
        long_chunks = chunk_tokens(data.text_ids, size.eval_len)
        short_chunks = chunk_tokens(long_chunks, size.train_len)
        figures[f"{name}/ppl@{size.train_len}"] = perplexity(model, short_chunks, size.eval_batch_size)
        figures[f"{name}/ppl@{size.eval_len}"] = perplexity(model, long_chunks, size.eval_batch_size)
        entropy = summarise_curves(attention_entropy_curves(model, long_chunks, size.eval_batch_size), size.train_len)
        figures[f"{name}/entropy_inside@{size.eval_len}"] = entropy["entropy_norm_inside"]
        figures[f"{name}/entropy_beyond@{size.eval_len}"] = entropy["entropy_norm_beyond"]
    cells = run_grid(model, tokenizer, data.cells, size.eval_batch_size, progress=progress)
    for kind, prefix in (("single", ""), ("multi", "multikey_")):
        for length, value in by_length(cells, kind).items():
            figures[f"{name}/{prefix}accuracy@{length}"] = value
        if kind == "single":
            for field in ("answer_tokens", "needle_mass", "retrieval_heads"):
                for length, value in by_length(cells, kind, field).items():
                    figures[f"{name}/{field}@{length}"] = value
    return figures, cells


def run_encoding(name: str, size: Size, data: BenchData, text: bool = True, quiet: bool = False,
                 seed: int | None = None, threads: int = 1) -> dict:
    """Train and measure one encoding, deterministically; what a worker process returns."""
    from ..models import tokenizer_from_json

    start, cpu_start = time.perf_counter(), time.process_time()
    with deterministic(threads), _quiet_bars(quiet):
        tokenizer = tokenizer_from_json(data.tokenizer_json)
        model, summary = train_encoding(name, size, data, tokenizer, seed)
        trained = time.perf_counter()
        figures, cells = measure(model, tokenizer, name, size, data, text=text)
    losses = summary.pop("losses")
    return {
        "encoding": name, "figures": figures, "cells": cells,
        "train": summary | {"loss_curve": losses[:: max(1, len(losses) // 50)]},
        "seconds": {"train": trained - start, "measure": time.perf_counter() - trained,
                    "cpu": time.process_time() - cpu_start},
    }


@contextlib.contextmanager
def _quiet_bars(quiet: bool):
    """Silence train_lm's tqdm bar (workers run side by side: their bars would interleave)."""
    if not quiet:
        yield
        return
    from . import train as train_module

    original = train_module.tqdm

    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return original(*args, **kwargs)

    train_module.tqdm = silent
    try:
        yield
    finally:
        train_module.tqdm = original


def _worker(name: str, size: Size, data: BenchData, text: bool, seed, threads) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    steps = math.ceil(len(data.train_chunks) * size.epochs / size.batch_size)
    print(f"bench: {name}: training {steps} steps (worker {os.getpid()})", file=sys.stderr, flush=True)
    return run_encoding(name, size, data, text=text, quiet=True, seed=seed, threads=threads)


def run_suite(size: Size, encodings: Sequence[str], jobs: int = 1, data: BenchData | None = None,
              text: bool = True, seed: int | None = None, threads: int = 1, progress: Progress = None) -> dict:
    """Train and measure every encoding; {"figures": {...}, "encodings": {name: details}}.

    jobs > 1 runs encodings in that many worker processes (forkserver), one
    encoding per process at a time with one thread each: the same figures as
    jobs = 1, sooner on several cores.
    """
    say = progress or (lambda message: None)
    jobs = max(1, min(jobs, len(encodings)))
    with terminate_as_interrupt():
        return _run_suite(size, encodings, jobs, data, text, seed, threads, say)


def _run_suite(size, encodings, jobs, data, text, seed, threads, say) -> dict:
    pool = worker_pool(jobs, WORKER_PRELOAD) if jobs > 1 else None  # its server loads while the data build
    try:
        if data is None:
            with deterministic():
                data = build_data(size, progress=say)
    except BaseException:
        if pool is not None:
            stop_pool(pool, finished=False)
        raise
    say(f"training and measuring {len(encodings)} encodings" + (f" in {jobs} worker processes" if pool else ""))
    if pool is None:
        outcomes = ((i, run_encoding(name, size, data, text=text, seed=seed, threads=threads))
                    for i, name in enumerate(encodings))
    else:
        outcomes = results_as_completed(pool, _worker, [(name, size, data, text, seed, threads) for name in encodings])
    results = {}
    with contextlib.closing(outcomes):  # an error here still ends the workers at once
        for count, (_, result) in enumerate(outcomes, 1):
            results[result["encoding"]] = result
            say(_done_line(count, len(encodings), result, size))
    ordered = {name: results[name] for name in encodings}
    figures = {key: value for result in ordered.values() for key, value in result["figures"].items()}
    return {"figures": figures, "encodings": ordered}


# imported once by the fork server, so every worker starts with them loaded
WORKER_PRELOAD = ["torch", "transformers", "accelerate", "mempos.encodings", "mempos.models",
                  "mempos.experiments.train", "mempos.experiments.evaluate", "mempos.experiments.passkey", __name__]


def _done_line(index: int, total: int, result: dict, size: Size) -> str:
    name, prefix = result["encoding"], f"{result['encoding']}/accuracy@"
    accuracy = {int(key[len(prefix):]): value for key, value in result["figures"].items() if key.startswith(prefix)}
    shown = ", ".join(f"{length / size.train_len:g}x {value:.2f}" for length, value in sorted(accuracy.items()))
    seconds = result["seconds"]
    return (f"[{index}/{total}] {name}: final loss {result['train']['final_loss']:.3f}; accuracy {shown} "
            f"({seconds['train']:.1f} s training, {seconds['measure']:.1f} s measuring, {seconds['cpu']:.1f} s CPU)")


# --- comparison: small pure functions ------------------------------------------------------

OK, REGRESSION, IMPROVED, CHANGED, MISSING, NEW = "ok", "REGRESSION", "improved", "CHANGED", "missing", "new"
FAILING = (REGRESSION, CHANGED, MISSING)

# the better direction of each kind of figure (None: no better direction, any move beyond tolerance is a change)
DIRECTIONS = {
    "accuracy": True, "multikey_accuracy": True, "answer_tokens": True, "needle_mass": True, "retrieval_heads": True,
    "ppl": False, "entropy_inside": None, "entropy_beyond": None,
}


def figure_kind(figure: str) -> str:
    """'rope/accuracy@512' -> 'accuracy'."""
    return figure.split("/", 1)[-1].split("@", 1)[0]


def figure_encoding(figure: str) -> str:
    """'rope/accuracy@512' -> 'rope'."""
    return figure.split("/", 1)[0]


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def clean(value):
    """A JSON-safe number: NaN and infinities become None."""
    return value if finite(value) else None


@dataclass(frozen=True)
class Row:
    """One line of the comparison table."""

    figure: str
    baseline: float | None
    now: float | None
    verdict: str
    tolerance: str = ""

    @property
    def change(self) -> float | None:
        return self.now - self.baseline if finite(self.baseline) and finite(self.now) else None

    def as_dict(self) -> dict:
        return {"figure": self.figure, "baseline": clean(self.baseline), "now": clean(self.now),
                "change": clean(self.change), "tolerance": self.tolerance, "verdict": self.verdict}


def allowed_change(value: float, tolerance: Mapping) -> float:
    """How far a figure may move from its baseline `value`: {"abs": x} -> x, {"rel": y} -> y * |value|."""
    if "abs" in tolerance:
        return float(tolerance["abs"])
    return float(tolerance["rel"]) * abs(value)


def describe_tolerance(tolerance: Mapping) -> str:
    return f"±{tolerance['abs']:g}" if "abs" in tolerance else f"±{100 * tolerance['rel']:g}%"


def judge(entry: Mapping, now) -> str:
    """The verdict for one figure: its baseline entry against the value measured now.

    Within tolerance (inclusive) is ok. Beyond it, the direction decides:
    better is `improved`, worse is REGRESSION; a figure without a better
    direction (higher_is_better null) is CHANGED. A value that could not be
    measured (None or NaN) where the baseline had one is a REGRESSION (or
    CHANGED); both undefined is ok.
    """
    base, better = entry.get("value"), entry.get("higher_is_better")
    if not finite(base) or not finite(now):
        if not finite(base) and not finite(now):
            return OK
        return CHANGED if better is None else REGRESSION
    delta = now - base
    if abs(delta) <= allowed_change(base, entry["tolerance"]) * (1 + 1e-9) + 1e-12:
        return OK
    if better is None:
        return CHANGED
    return IMPROVED if (delta > 0) == bool(better) else REGRESSION


def compare(baseline: Mapping, figures: Mapping[str, float], encodings: Iterable[str] | None = None) -> list[Row]:
    """One row per figure of the baseline (restricted to `encodings` when given) and per new figure."""
    wanted = None if encodings is None else set(encodings)
    entries = {name: entry for name, entry in baseline["figures"].items()
               if wanted is None or figure_encoding(name) in wanted}
    rows = []
    for name, entry in entries.items():
        tolerance = describe_tolerance(entry["tolerance"])
        if name not in figures:
            rows.append(Row(name, entry.get("value"), None, MISSING, tolerance))
        else:
            rows.append(Row(name, entry.get("value"), figures[name], judge(entry, figures[name]), tolerance))
    for name, value in figures.items():
        if name not in entries and (wanted is None or figure_encoding(name) in wanted):
            rows.append(Row(name, None, value, NEW))
    return rows


def exit_status(rows: Sequence[Row]) -> int:
    """0 when every figure holds (ok, improved, new), 1 on any REGRESSION, CHANGED or missing figure."""
    return 1 if any(row.verdict in FAILING for row in rows) else 0


def tally(rows: Sequence[Row]) -> dict[str, int]:
    counts = {verdict: 0 for verdict in (OK, REGRESSION, CHANGED, IMPROVED, MISSING, NEW)}
    for row in rows:
        counts[row.verdict] += 1
    return counts


def moved(rows: Sequence[Row]) -> list[Row]:
    """The rows that did not hold or that are worth a look: everything but ok."""
    return [row for row in rows if row.verdict != OK]


def rows_table(rows: Sequence[Row]) -> str:
    from .report import table

    def signed(value):
        return "n/a" if value is None else f"{value:+.4g}"

    return table(["figure", "baseline", "now", "change", "tolerance", "verdict"],
                 [[r.figure, r.baseline, r.now, signed(r.change), r.tolerance or "n/a", r.verdict] for r in rows])


def summary_line(rows: Sequence[Row]) -> str:
    counts = tally(rows)
    parts = ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n)
    status = "FAIL" if exit_status(rows) else "PASS"
    return f"{status}: {len(rows)} figures ({parts or 'none'})"


# --- baseline files ---------------------------------------------------------------------


class BaselineError(UsageError):
    """The baseline file cannot be used: missing, malformed, or made for another benchmark or size."""


def baseline_path(size: str) -> Path:
    return BASELINE_DIR / f"{size}.json"


def parse_baseline(obj, size: str | None = None, source: str = "baseline") -> dict:
    """Check a baseline's structure, benchmark version and size; return it, or raise BaselineError."""
    if not isinstance(obj, dict):
        raise BaselineError(f"{source} is malformed: expected a JSON object at the top level")
    version = obj.get("benchmark_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BaselineError(f"{source} is malformed: no integer 'benchmark_version'")
    if version != BENCHMARK_VERSION:
        raise BaselineError(
            f"{source} was made by benchmark version {version}, this is version {BENCHMARK_VERSION}: "
            "figures are not comparable; make a new one with --update-baseline"
        )
    if size is not None and obj.get("size") != size:
        raise BaselineError(f"{source} is for size {obj.get('size')!r}, not {size!r}")
    figures = obj.get("figures")
    if not isinstance(figures, dict) or not figures:
        raise BaselineError(f"{source} is malformed: 'figures' must be a non-empty object")
    for name, entry in figures.items():
        problem = _entry_problem(entry)
        if problem:
            raise BaselineError(f"{source} is malformed: figure {name!r} {problem}")
    return obj


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return "is not an object"
    value = entry.get("value", "absent")
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return "has no numeric 'value' (null for a figure that could not be measured)"
    if entry.get("higher_is_better", "absent") not in (True, False, None):
        return "has 'higher_is_better' other than true, false or null"
    tolerance = entry.get("tolerance")
    if not isinstance(tolerance, dict) or len(tolerance) != 1 or not set(tolerance) <= {"abs", "rel"}:
        return 'needs a tolerance of {"abs": x} or {"rel": y}'
    (amount,) = tolerance.values()
    if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 <= amount < math.inf:
        return "has a tolerance that is not a finite number >= 0"
    return None


def load_baseline(path, size: str | None = None) -> dict:
    """Read and check a baseline file; every problem is one line (BaselineError, exit status 2)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BaselineError(f"no baseline at {path}: make one with --update-baseline") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BaselineError(f"cannot read baseline {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BaselineError(f"baseline {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    return parse_baseline(obj, size, source=f"baseline {path}")


def tolerance_for(figure: str, rule: Mapping) -> dict:
    """The tolerance a figure gets from a rule {kind: {"abs": x} | {"rel": y}}."""
    kind = figure_kind(figure)
    if kind not in rule:
        raise KeyError(f"no tolerance rule for figures of kind {kind!r}")
    return dict(rule[kind])


def new_baseline(figures: Mapping[str, float], size: str, rule: Mapping, tolerances_note: Mapping,
                 old: Mapping | None = None, encodings: Iterable[str] | None = None, extra: Mapping | None = None) -> dict:
    """A baseline for `figures`. With `old` and `encodings`, only those encodings' figures are replaced
    and the others are kept as they were. Tolerances come from `rule` by figure kind."""
    kept = {}
    if old is not None and encodings is not None:
        wanted = set(encodings)
        kept = {name: entry for name, entry in old["figures"].items() if figure_encoding(name) not in wanted}
    entries = dict(kept)
    for name, value in figures.items():
        entries[name] = {"value": clean(value), "tolerance": tolerance_for(name, rule),
                         "higher_is_better": DIRECTIONS.get(figure_kind(name))}
    return {"benchmark_version": BENCHMARK_VERSION, "size": size, "tolerances": dict(tolerances_note),
            **(dict(extra) if extra else {}), "figures": dict(sorted(entries.items()))}


# --- tolerances -------------------------------------------------------------------------

# Per kind of figure, the tolerance a new baseline gets when no older baseline (which records its own rule)
# exists and --calibrate is not given. smoke: measured by `mempos bench --update-baseline --calibrate 3`
# (2 x the largest move under 2 torch threads, see `calibration_note`; the committed baseline records the
# spreads). tiny: the same rule, not calibrated (its runs take too long to repeat three times on 2 cores).
TOLERANCE_RULES: dict[str, dict[str, dict]] = {
    "smoke": {
        "accuracy": {"abs": 0.1}, "multikey_accuracy": {"abs": 0.1}, "answer_tokens": {"abs": 0.05},
        "needle_mass": {"abs": 0.064}, "retrieval_heads": {"abs": 0.13}, "ppl": {"rel": 0.049},
        "entropy_inside": {"abs": 0.067}, "entropy_beyond": {"abs": 0.051},
    },
}
TOLERANCE_RULES["tiny"] = dict(TOLERANCE_RULES["smoke"])
TOLERANCE_NOTES = {
    "smoke": {"method": "the smoke rule measured with --calibrate 3 (see the committed smoke baseline)"},
    "tiny": {"method": "the smoke rule, not calibrated for tiny; run --update-baseline --calibrate N to measure"},
}
CALIBRATION_MULTIPLIER = 2.0


def deviations(reference: Mapping[str, float], runs: Sequence[Mapping[str, float]]) -> dict[str, list[float]]:
    """Per kind of figure, every |run - reference| over runs and figures (relative for perplexity)."""
    out: dict[str, list[float]] = {}
    for run in runs:
        for name, base in reference.items():
            now = run.get(name)
            if not (finite(base) and finite(now)):
                continue
            kind = figure_kind(name)
            delta = abs(now - base) / abs(base) if kind == "ppl" and base else abs(now - base)
            out.setdefault(kind, []).append(delta)
    return out


def calibrated_rule(reference: Mapping[str, float], runs: Sequence[Mapping[str, float]], floors: Mapping[str, Mapping],
                    multiplier: float = CALIBRATION_MULTIPLIER) -> tuple[dict, dict]:
    """Tolerances from measured run-to-run spread: per kind, `multiplier` x the largest
    |perturbed run - reference| over every figure of that kind and every run (relative for
    perplexity), rounded up to two significant digits, never below the kind's floor.
    Returns (rule, spread statistics)."""
    import numpy as np

    rule, stats = {}, {}
    spread = deviations(reference, runs)
    for kind, floor in floors.items():
        values = spread.get(kind, [])
        largest = float(max(values)) if values else 0.0
        unit = "rel" if kind == "ppl" else "abs"
        rule[kind] = {unit: max(round_up(multiplier * largest), floor.get(unit, 0.0))}
        stats[kind] = {"max_deviation": round(largest, 5),
                       "p90_deviation": round(float(np.percentile(values, 90)), 5) if values else 0.0,
                       "figures": len(values)}
    return rule, stats


def round_up(value: float, digits: int = 2) -> float:
    """Up to `digits` significant digits, rounding away from zero (a tolerance never shrinks by rounding)."""
    if value <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale - 1e-9) / scale


def tolerance_floors(size: Size) -> dict[str, dict]:
    """The smallest tolerance per kind: two haystacks' worth of accuracy (one flip either way is noise),
    and small fixed amounts for the continuous figures."""
    flips = 2.0 / (size.per_cell * len(size.depths))
    return {
        "accuracy": {"abs": round(flips, 4)}, "multikey_accuracy": {"abs": round(flips, 4)},
        "answer_tokens": {"abs": round(flips / 2, 4)},
        "needle_mass": {"abs": 0.01}, "retrieval_heads": {"abs": 0.02}, "ppl": {"rel": 0.01},
        "entropy_inside": {"abs": 0.005}, "entropy_beyond": {"abs": 0.005},
    }


# --- outputs ----------------------------------------------------------------------------


def write_outputs(out: Path, size: Size, suite: dict, command: str) -> None:
    """figures.json, grid.json, grid.md (ranking and every cell) and one heatmap per encoding."""
    from ..io import write_json, write_text
    from .passkey import cells_table, plot_heatmap, plot_overview, ranking_table

    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    environment = {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "machine": platform.machine()}
    details = {name: {k: v for k, v in result.items() if k not in ("figures", "cells", "encoding")}
               for name, result in suite["encodings"].items()}
    write_json(out / "figures.json", {
        "benchmark_version": BENCHMARK_VERSION, "size": size.name, "command": command,
        "config": dataclasses.asdict(size), "environment": environment,
        "figures": {name: clean(value) for name, value in suite["figures"].items()}, "encodings": details,
    })
    grids = {name: result["cells"] for name, result in suite["encodings"].items()}
    write_json(out / "grid.json", {"size": size.name, "train_len": size.train_len,
                                   "cells": {name: [{k: clean(v) if isinstance(v, float) else v for k, v in c.items()}
                                                    for c in cells] for name, cells in grids.items()}})
    lines = [f"# Passkey grid ({size.name})", "", f"Command: `{command}`", "",
             f"Trained at {size.train_len} tokens; accuracy is exact match of the {size.key_digits}-digit key "
             "from greedy decoding, mean over needle depths.", "",
             "## Ranking by accuracy at 4x and 8x the training length (one key)", "",
             ranking_table(grids, size.train_len), "", "![accuracy against length](grid.png)", ""]
    if any(c["kind"] == "multi" for cells in grids.values() for c in cells):
        lines += [f"## Several keys ({size.n_keys}, one asked, the others distractors)", "",
                  ranking_table(grids, size.train_len, kind="multi"), ""]
    plot_overview(grids, size.train_len, out / "grid.png")
    for name, cells in grids.items():
        plot_heatmap(cells, name, size.train_len, out / f"heatmap-{name}.png")
        lines += [f"## {name}", "", f"![{name}](heatmap-{name}.png)", "", cells_table(cells), ""]
    write_text(out / "grid.md", "\n".join(lines))


def write_comparison(out: Path, size: Size, rows: Sequence[Row], command: str, baseline_file: Path) -> None:
    """comparison.json and comparison.md: every row, the moved ones first in the markdown."""
    from ..io import write_json, write_text

    write_json(out / "comparison.json", {
        "benchmark_version": BENCHMARK_VERSION, "size": size.name, "baseline": str(baseline_file),
        "command": command, "status": exit_status(rows), "summary": summary_line(rows), "counts": tally(rows),
        "rows": [row.as_dict() for row in rows],
    })
    text = [f"# Benchmark comparison ({size.name})", "", f"Command: `{command}`", "",
            f"Baseline: `{baseline_file}`", "", f"**{summary_line(rows)}**", ""]
    if moved(rows):
        text += ["## Figures that moved", "", rows_table(moved(rows)), ""]
    text += ["## Every figure", "", rows_table(rows), ""]
    write_text(out / "comparison.md", "\n".join(text))


# --- the command -----------------------------------------------------------------------


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser(
        "bench",
        help="the needle benchmark as a regression suite, and the passkey grid",
        description=textwrap.fill(
            "Train one small GPT-2 per position encoding from scratch on passkey retrieval in real filler "
            "text (fixed seeds, data and configuration), measure perplexity, attention entropy, retrieval "
            "accuracy and attention on the needle, and compare every figure with a baseline file. Exit "
            "status: 0 all figures hold, 1 a regression (or a figure that moved without a better direction, "
            "or one that is missing), 2 bad input. Writes to --out: figures.json, comparison.json, "
            "comparison.md, grid.json, grid.md (ranking of encodings), grid.png and heatmap-<encoding>.png.", width=79,
        ),
        epilog="sizes:\n" + "\n".join(f"  {name:<6} {text}" for name, text in SIZES_HELP.items()) + (
            "\n\nverdicts:\n"
            "  ok          within tolerance\n"
            "  REGRESSION  worse than tolerance (fails)\n"
            "  CHANGED     moved beyond tolerance, no better direction: entropy (fails)\n"
            "  missing     in the baseline, not measured (fails)\n"
            "  improved    better than tolerance: the baseline is stale (passes)\n"
            "  new         measured, not in the baseline (passes)\n"
            "\nexamples:\n"
            "  mempos bench                                  # smoke suite against the shipped baseline\n"
            "  mempos bench --encodings rope,si_rope         # only these encodings' figures\n"
            "  mempos bench --update-baseline                # accept the current figures\n"
            "  mempos bench --size tiny --grid-only          # the full passkey grid, no comparison\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", default="smoke", choices=list(SIZES), help="benchmark size (default smoke)")
    p.add_argument("--baseline", metavar="PATH",
                   help="baseline file (default: the package's baselines/<size>.json; smoke ships with it)")
    p.add_argument("--update-baseline", action="store_true",
                   help="write the figures measured now as the new baseline (atomically) and show what changed; "
                        "with --encodings only those encodings' figures are replaced")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="with --update-baseline: also rerun the suite N more times perturbed (first with 2 "
                        "torch threads, which sets each kind's tolerance to "
                        f"{CALIBRATION_MULTIPLIER:g} x the largest move it causes; then training seeds 1, 2, ..., "
                        "recorded for information); with --figures that run is the reference")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/bench-<size>); files in it are replaced")
    p.add_argument("--encodings", metavar="A,B",
                   help="comma-separated encodings (default all); only their figures are compared")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="worker processes, one encoding each at a time (default: the usable CPU cores); "
                        "figures do not depend on it")
    p.add_argument("--figures", metavar="PATH",
                   help="compare (or --update-baseline from) the figures.json of an earlier run instead of running")
    p.add_argument("--grid-only", action="store_true",
                   help="train and run only the passkey grid (no perplexity, no entropy, no comparison); "
                        "--lengths, --depths and --per-cell then change the grid")
    p.add_argument("--lengths", metavar="A,B", help="grid-only: haystack lengths in tokens (default: the size's)")
    p.add_argument("--depths", metavar="A,B", help="grid-only: needle depths in [0, 1] (default: the size's)")
    p.add_argument("--per-cell", type=int, metavar="N", help="grid-only: haystacks per (length, depth) cell")
    p.set_defaults(run=run_bench_command)


def _names(text: str | None) -> list[str]:
    from ..encodings import ENCODINGS

    if text is None or text.strip().lower() == "all":
        return list(ENCODINGS)
    names = parts(text, "--encodings")
    unknown = [name for name in names if name not in ENCODINGS]
    if unknown:
        raise UsageError(f"unknown encoding {unknown[0]!r}; choose from {', '.join(ENCODINGS)}")
    if not names:
        raise UsageError("--encodings is empty")
    if len(set(names)) != len(names):
        raise UsageError("--encodings names an encoding twice")
    return names


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_bench_command(args) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    size = get_size(args.size)
    encodings = _names(args.encodings)
    command = shlex.join(["mempos", *getattr(args, "argv", [])])
    grid_options = [name for name in ("lengths", "depths", "per_cell") if getattr(args, name) is not None]
    if grid_options and not args.grid_only:
        raise UsageError(f"--{grid_options[0].replace('_', '-')} changes the grid, so the figures would not match "
                         "the baseline: use it with --grid-only")
    if args.grid_only and (args.update_baseline or args.figures or args.baseline):
        raise UsageError("--grid-only runs no comparison: drop --baseline, --update-baseline and --figures")
    if args.calibrate and not args.update_baseline:
        raise UsageError("--calibrate sets tolerances for a new baseline: use it with --update-baseline")
    if args.calibrate < 0 or (args.jobs is not None and args.jobs < 1):
        raise UsageError("--calibrate must be >= 0 and --jobs >= 1")
    if args.out is not None and not args.out.strip():
        raise UsageError("--out must not be empty")
    out = Path(args.out or f"runs/bench-{size.name}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    jobs = args.jobs or default_jobs()

    if args.grid_only:
        lengths = number_list(args.lengths, "--lengths") if args.lengths is not None else size.lengths
        depths = number_list(args.depths, "--depths", float) if args.depths is not None else list(size.depths)
        if not lengths or not depths:
            raise UsageError("--lengths and --depths must not be empty")
        per_cell = args.per_cell if args.per_cell is not None else size.per_cell
        if (min(lengths) < size.train_len // 2 or max(lengths) > 2**16 or any(not 0 <= d <= 1 for d in depths)
                or not 1 <= per_cell <= 10_000):
            raise UsageError(f"--lengths must be {size.train_len // 2} to 65536 tokens, --depths in [0, 1], "
                             "--per-cell 1 to 10000")
        with deterministic():
            data = build_data(size, lengths, depths, per_cell, progress=_say)
        suite = run_suite(size, encodings, jobs=jobs, data=data, text=False, progress=_say)
        write_outputs(out, size, suite, command)
        from .passkey import ranking_table

        grids = {name: result["cells"] for name, result in suite["encodings"].items()}
        print(ranking_table(grids, size.train_len))
        _say(f"wrote {out}: grid.md, grid.json, grid.png, figures.json and {len(encodings)} heatmaps")
        return

    baseline_file = Path(args.baseline) if args.baseline else baseline_path(size.name)
    old = None
    if args.update_baseline:
        try:
            old = load_baseline(baseline_file, size.name)
        except BaselineError as e:
            if baseline_file.exists():
                refuse_to_replace(baseline_file, size.name)
                _say(f"the old baseline is not usable ({e}); writing a new one")
    else:
        old = load_baseline(baseline_file, size.name)  # bad input surfaces before any training
    if args.figures:
        suite = _load_figures(Path(args.figures), size.name, encodings)
    else:
        suite = run_suite(size, encodings, jobs=jobs, progress=_say)
    rows = compare(old, suite["figures"], encodings) if old is not None else None
    if suite["encodings"]:
        write_outputs(out, size, suite, command)
    if rows is not None:
        write_comparison(out, size, rows, command, baseline_file)

    if args.update_baseline:
        if args.calibrate:
            rule, note = calibrate(size, encodings, suite["figures"], args.calibrate, jobs, out)
        else:
            rule = (old or {}).get("tolerances", {}).get("rule") or TOLERANCE_RULES[size.name]
            note = (old or {}).get("tolerances") or {**TOLERANCE_NOTES[size.name], "rule": rule}
        baseline = new_baseline(suite["figures"], size.name, rule, note, old=old,
                                encodings=None if args.encodings is None else encodings,
                                extra={"command": command, "config": dataclasses.asdict(size)})
        from ..io import write_json

        write_json(baseline_file, baseline)
        if rows is not None:
            changed = moved(rows)
            print(rows_table(changed) if changed else "no figure moved beyond its tolerance")
        _say(f"wrote baseline {baseline_file} ({len(baseline['figures'])} figures)")
        return

    changed = moved(rows)
    if changed:
        print(rows_table(changed))
    print(summary_line(rows))
    _say(f"full table: {out / 'comparison.md'}")
    status = exit_status(rows)
    if status:
        raise SystemExit(status)


def refuse_to_replace(path: Path, size: str) -> None:
    """--update-baseline over a file that is not a `size` baseline of mempos bench (another size, another
    program's JSON, any other file, a folder) would destroy it: refuse. An older benchmark version, or
    a damaged figure entry, is what updating is for."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    ours = (isinstance(obj, dict) and isinstance(obj.get("benchmark_version"), int)
            and isinstance(obj.get("figures"), dict))
    if not ours:
        raise UsageError(f"--baseline {path} exists and is not a mempos bench baseline; refusing to overwrite it "
                         "(remove it or choose another path)")
    if obj.get("size") != size:
        raise UsageError(f"--baseline {path} is the {obj.get('size')!r} baseline; refusing to overwrite it with "
                         f"{size!r} figures (pass --size {obj.get('size')} or another path)")


def _load_figures(path: Path, size: str, encodings: Sequence[str]) -> dict:
    """The figures of an earlier run's figures.json, as run_suite returns them (without details)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no figures file at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read figures file {path}: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("figures"), dict):
        raise UsageError(f"{path} is not a figures.json written by mempos bench")
    if obj.get("benchmark_version") != BENCHMARK_VERSION or obj.get("size") != size:
        raise UsageError(f"{path} holds figures of benchmark version {obj.get('benchmark_version')} size "
                         f"{obj.get('size')!r}, not version {BENCHMARK_VERSION} size {size!r}")
    wanted = set(encodings)
    figures = {name: (math.nan if value is None else value) for name, value in obj["figures"].items()
               if figure_encoding(name) in wanted}
    for name, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{path}: figure {name!r} is {value!r}, not a number (or null)")
    return {"figures": figures, "encodings": {}}


def calibrate(size: Size, encodings: Sequence[str], reference: Mapping[str, float], n: int, jobs: int,
              out: Path | None = None):
    """Rerun the suite `n` times perturbed; derive each kind's tolerance from the first run's spread
    around `reference` and record the others'; all runs go to calibration.json.

    Run 1 (the tolerances): two torch threads instead of one, the same
    computation with other floating-point rounding, as another CPU or library
    build gives. Training amplifies that rounding (for some encodings into
    percent-level moves), so this is the spread a baseline must survive on
    another machine. Runs 2..n (recorded only): training seeds 1, 2, ...
    (other initial weights and data order; same data and haystacks). At the
    smoke scale a seed moves figures about as much as a broken encoding does,
    so tolerances wide enough for a seed change would hide regressions.
    """
    with deterministic():
        data = build_data(size)
    runs, perturbations = [], []
    for index in range(n):
        if index == 0:  # one process, so the threads never outnumber the cores
            perturbation, kwargs = "2 torch threads", {"threads": 2, "jobs": 1}
        else:
            perturbation, kwargs = f"seed {size.seed + index}", {"seed": size.seed + index, "jobs": jobs}
        _say(f"calibration run {index + 1}/{n}: {perturbation}")
        runs.append(run_suite(size, encodings, data=data, progress=_say, **kwargs)["figures"])
        perturbations.append(perturbation)
    if out is not None:
        from ..io import write_json

        write_json(out / "calibration.json", {
            "reference": {k: clean(v) for k, v in reference.items()},
            "runs": [{"perturbation": p, "figures": {k: clean(v) for k, v in run.items()}}
                     for p, run in zip(perturbations, runs)],
        })
    return calibration_note(size, reference, runs, perturbations)


def calibration_note(size: Size, reference: Mapping[str, float], runs: Sequence[Mapping[str, float]],
                     perturbations: Sequence[str]) -> tuple[dict, dict]:
    """The rule (from the first run) and the note a baseline records about how it was set."""
    floors = tolerance_floors(size)
    rule, stats = calibrated_rule(reference, runs[:1], floors)
    note = {
        "method": (f"{CALIBRATION_MULTIPLIER:g} x the largest |run - reference| per kind of figure (over every "
                   f"encoding and length; relative for perplexity) when the suite is rerun with "
                   f"{perturbations[0]} instead of one (other floating-point rounding, as on another machine), "
                   "rounded up to 2 significant digits, floored at two haystacks of exact-match accuracy "
                   "and small fixed amounts for the continuous figures; seed reruns are recorded, not used"),
        "multiplier": CALIBRATION_MULTIPLIER, "floors": floors, "perturbations": list(perturbations),
        "spread": {p: calibrated_rule(reference, [run], floors)[1] for p, run in zip(perturbations, runs)},
        "rule": rule,
    }
    return rule, note
