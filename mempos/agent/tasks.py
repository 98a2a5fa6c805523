"""The continual-learning task suite: small tasks generated offline from a seed.

Every task hands out `Example`s (a prompt cut into program steps, and the
answer span scored by exact match) for a "train" or an "eval" split. Lists
are deterministic per (task, split, seed), and the two splits never share an
example. Two kinds of task exist:

- ``"qa"``: the model is scored by exact match of its greedy answer (after
  stripping whitespace) and by the NLL of the answer tokens;
- ``"lm"``: language modelling, scored by the NLL of all tokens (answer "").

Registered tasks (``TASKS``, looked up by `get_task`/`parse_tasks`):
``kv``, ``copy``, ``reverse``, ``sort``, ``add``, ``program``,
``lm_embedded``, ``lm_wikitext``, ``lm_shakespeare`` and ``lm`` (any text
source, ``lm:source=PATH``), plus ``jsonl:PATH`` for a file of
``{"prompt": ..., "answer": ...}`` lines.

Adding a task
-------------
Write one small class: subclass `Task`, set ``name``, ``kind`` and
``max_answer_chars``, and implement ``sample(rng)`` returning one random
`Example`. The base class turns that into seeded, split-disjoint lists (an
example belongs to the eval split when a hash of its text falls in the
lowest 20%, so train and eval are disjoint whatever the seeds). Register it
with ``@register_task("name")`` to make it reachable from ``--tasks``::

    @register_task("mul")
    class Multiply(Task):
        kind, max_answer_chars = "qa", 3

        def sample(self, rng):
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            return Example((f"{a}*{b}=",), f" {a * b}")

A task whose examples come from elsewhere overrides ``examples`` itself
(see `JsonlTask` and `TextWindowTask`). Options of a registered factory are
given on the command line as ``name:key=value[:key=value]``, e.g.
``lm_shakespeare:path=/data/input.txt.gz``.
"""

from __future__ import annotations

import bisect
import hashlib
import inspect
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mempos.data import Corpus, load_text
from mempos.errors import UsageError

SPLITS = ("train", "eval")
EVAL_FRACTION = 0.2
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt.gz"


# --- examples ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One prompt, cut into program steps, and the answer span that follows it.

    Tokens of segment ``s`` get program-counter value ``s`` (0-based); tasks
    that are not programs have a single segment. ``answer`` is "" for
    language-modelling examples. A plain string given as ``segments`` is
    taken as a single segment.
    """

    segments: tuple[str, ...]
    answer: str

    def __post_init__(self):
        segments = (self.segments,) if isinstance(self.segments, str) else tuple(self.segments)
        if not segments or not all(isinstance(s, str) for s in segments):
            raise TypeError(f"Example.segments must be a non-empty sequence of strings, got {self.segments!r}")
        if not isinstance(self.answer, str):
            raise TypeError(f"Example.answer must be a string, got {self.answer!r}")
        object.__setattr__(self, "segments", segments)

    @property
    def prompt(self) -> str:
        return "".join(self.segments)

    @property
    def text(self) -> str:
        """Prompt followed by answer: what a model is trained on."""
        return self.prompt + self.answer

    @property
    def segment_starts(self) -> tuple[int, ...]:
        """Character offset in `prompt` where each segment begins."""
        starts, at = [], 0
        for segment in self.segments:
            starts.append(at)
            at += len(segment)
        return tuple(starts)

    def pc_of_char(self, index: int) -> int:
        """Program counter of the character at `index` of `text`.

        Characters past the prompt (the answer) belong to the last step.
        """
        if index < 0:
            raise IndexError(f"character index must be >= 0, got {index}")
        return max(bisect.bisect_right(self.segment_starts, index) - 1, 0)

    def token_pcs(self, offsets: Sequence[tuple[int, int]]) -> list[int]:
        """Program counters of tokens, given their (start, end) character offsets in `text`.

        Use a fast tokenizer's ``return_offsets_mapping=True`` output on
        ``example.text`` (or ``example.prompt``).
        """
        return [self.pc_of_char(start) for start, _ in offsets]


# --- the base class and the registry ----------------------------------------------------------


class Task:
    """A task of the continual-learning suite; subclass it to add one.

    Either implement ``sample(rng)`` (one random example; the base class
    makes seeded, split-disjoint lists of them) or override ``examples``.
    """

    name: str = ""
    kind: str = "qa"  # "qa": exact match + NLL of the answer tokens; "lm": NLL of all tokens
    max_answer_chars: int = 16  # greedy decoding budget hint for qa tasks (longest answer, with its space)
    eval_fraction: float = EVAL_FRACTION

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` examples of `split` ("train" or "eval"), the same list for the same seed.

        An example is in the eval split when a hash of its text falls in the
        lowest `eval_fraction`, so no example is ever in both splits.
        """
        _check_request(self, split, n)
        rng = _rng(self.name, split, seed)
        want_eval = split == "eval"
        out: list[Example] = []
        budget = 200 * n + 1000
        while len(out) < n:
            if budget == 0:
                raise UsageError(
                    f"task {self.name!r}: could not draw {n} {split} examples (its example space is too "
                    "small for the train/eval split)"
                )
            budget -= 1
            example = self.sample(rng)
            if (_unit_hash(self.name, example.prompt, example.answer) < self.eval_fraction) == want_eval:
                out.append(example)
        return out

    def sample(self, rng: random.Random) -> Example:
        """One random example; implement this, or override `examples`."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample(rng) or examples(split, n, seed)")

    def score(self, predicted: str, answer: str) -> bool:
        """Exact match after stripping surrounding whitespace."""
        return predicted.strip() == answer.strip()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str):
    """Class or factory decorator: make the task reachable as `name` in `get_task`/`--tasks`.

    A registered class without a name of its own gets `name`.
    """

    def decorate(factory):
        if name in TASKS and TASKS[name] is not factory:
            raise ValueError(f"task name {name!r} is already registered")
        if not re.fullmatch(r"[A-Za-z_][\w\-]*", name) or name == "jsonl":
            raise ValueError(f"bad task name {name!r}")
        if inspect.isclass(factory) and not factory.__dict__.get("name"):
            factory.name = name
        TASKS[name] = factory
        return factory

    return decorate


def get_task(spec: str) -> Task:
    """A task from a spec: a registered name, ``name:key=value[:key=value]``, or ``jsonl:PATH``."""
    spec = spec.strip()
    if spec.startswith("jsonl:"):
        path = spec[len("jsonl:"):]
        if not path:
            raise UsageError("task 'jsonl:' needs a path: jsonl:PATH")
        return JsonlTask(path, name=spec)
    name, colon, rest = spec.partition(":")
    if colon and not rest:
        raise UsageError(f"task {spec!r} ends in ':' with no option after it; write {name} or {name}:key=value")
    if name not in TASKS:
        raise UsageError(
            f"unknown task {name!r}: choose from {', '.join(sorted(TASKS))}, or jsonl:PATH for a file of "
            '{"prompt": ..., "answer": ...} lines'
        )
    factory = TASKS[name]
    options = _parse_options(name, factory, rest) if rest else {}
    task = factory(**options)
    if not task.name:
        task.name = name
    return task


def parse_tasks(text: str) -> list[Task]:
    """Comma-separated task specs, in order: e.g. ``copy,reverse,kv,jsonl:my.jsonl``."""
    specs = [s.strip() for s in text.split(",")]
    if not text.strip():
        raise UsageError("no tasks given: pass comma-separated task names, e.g. copy,reverse,kv")
    if any(not s for s in specs):
        raise UsageError(f"empty task name in {text!r} (two commas in a row, or a trailing comma?)")
    seen: set[str] = set()
    for spec in specs:
        if spec in seen:
            raise UsageError(f"task {spec!r} is listed twice in {text!r}")
        seen.add(spec)
    tasks = [get_task(spec) for spec in specs]
    names = [t.name for t in tasks]
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"two of the tasks in {text!r} are both named {name!r}")
    return tasks


def _parse_options(name: str, factory: Callable[..., Task], text: str) -> dict[str, object]:
    """``key=value[:key=value]`` into keyword arguments, typed like the factory's defaults."""
    params = {
        p.name: p for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    }
    accepted = ", ".join(params) or "none"
    options: dict[str, object] = {}
    for item in re.split(r":(?=[A-Za-z_]\w*=)", text):
        key, eq, value = item.partition("=")
        if not eq or key not in params:
            raise UsageError(f"task {name!r}: bad option {item!r} (options: {accepted}; write {name}:key=value)")
        if key in options:
            raise UsageError(f"task {name!r}: option {key} is given twice")
        default = params[key].default
        try:
            if isinstance(default, bool):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                options[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(default, (int, float)):
                options[key] = type(default)(value)
            else:
                options[key] = value
        except ValueError:
            kind = {bool: "true or false", int: "whole number", float: "number"}[type(default)]
            raise UsageError(f"task {name!r}: option {key} takes a {kind}, got {value!r}") from None
    return options


def _check_request(task: Task, split: str, n: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"number of examples must be a whole number >= 0, got {n!r}")


def _rng(*parts: object) -> random.Random:
    """A generator seeded from the parts' text (the same on every machine and run)."""
    return random.Random("\x1f".join(map(str, parts)))


def _unit_hash(*parts: object) -> float:
    """A stable hash of the parts, as a number in [0, 1)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# --- generated tasks ----------------------------------------------------------------------------


@register_task("kv")
class KeyValueTask(Task):
    """Key-value (passkey) retrieval: ``"ab=381 cq=027 zt=552 ? cq ="`` -> ``" 027"``."""

    kind, max_answer_chars = "qa", 4

    def __init__(self, min_pairs: int = 3, max_pairs: int = 5):
        if not 1 <= min_pairs <= max_pairs <= 20:
            raise UsageError(f"kv: need 1 <= min_pairs <= max_pairs <= 20, got {min_pairs} and {max_pairs}")
        self.min_pairs, self.max_pairs = min_pairs, max_pairs

    def sample(self, rng: random.Random) -> Example:
        letters = "abcdefghijklmnopqrstuvwxyz"
        n_pairs = rng.randint(self.min_pairs, self.max_pairs)
        keys: list[str] = []
        while len(keys) < n_pairs:
            key = rng.choice(letters) + rng.choice(letters)
            if key not in keys:
                keys.append(key)
        values = [f"{rng.randrange(1000):03d}" for _ in keys]
        asked = rng.randrange(len(keys))
        pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        return Example((f"{pairs} ? {keys[asked]} =",), f" {values[asked]}")


class DigitStringTask(Task):
    """``"<verb> 4821 ="`` -> ``" <transform(4821)>"`` on random digit strings of `min_digits` to
    `max_digits` digits (default 4-8)."""

    kind = "qa"
    verb = ""

    def __init__(self, min_digits: int = 4, max_digits: int = 8):
        if not 1 <= min_digits <= max_digits <= 32:
            raise UsageError(f"{self.verb}: need 1 <= min_digits <= max_digits <= 32, got {min_digits} and {max_digits}")
        self.min_digits, self.max_digits = min_digits, max_digits
        self.max_answer_chars = max_digits + 1

    def transform(self, digits: str) -> str:
        raise NotImplementedError

    def sample(self, rng: random.Random) -> Example:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(self.min_digits, self.max_digits)))
        return Example((f"{self.verb} {digits} =",), f" {self.transform(digits)}")


@register_task("copy")
class CopyTask(DigitStringTask):
    verb = "copy"

    def transform(self, digits: str) -> str:
        return digits


@register_task("reverse")
class ReverseTask(DigitStringTask):
    verb = "reverse"

    def transform(self, digits: str) -> str:
        return digits[::-1]


@register_task("sort")
class SortTask(DigitStringTask):
    verb = "sort"

    def transform(self, digits: str) -> str:
        return "".join(sorted(digits))


@register_task("add")
class AddTask(Task):
    """Two-digit addition: ``"37+58="`` -> ``" 95"``."""

    kind, max_answer_chars = "qa", 4

    def sample(self, rng: random.Random) -> Example:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Example((f"{a}+{b}=",), f" {a + b}")


@register_task("program")
class ProgramTask(Task):
    """A straight-line program, one segment per step (the program counter):

    ``("x=3;", " x+=4;", " x*=2;", " print x =")`` -> ``" 14"``. 3 to 5 steps
    (an assignment, 1-3 updates, the print); every value stays in 0..99.
    """

    kind, max_answer_chars = "qa", 3
    max_value = 99

    def __init__(self, min_steps: int = 3, max_steps: int = 5):
        if not 3 <= min_steps <= max_steps <= 12:
            raise UsageError(f"program: need 3 <= min_steps <= max_steps <= 12, got {min_steps} and {max_steps}")
        self.min_steps, self.max_steps = min_steps, max_steps

    def sample(self, rng: random.Random) -> Example:
        x = rng.randint(1, 9)
        segments = [f"x={x};"]
        for _ in range(rng.randint(self.min_steps, self.max_steps) - 2):
            while True:
                op = rng.choice(("+=", "-=", "*="))
                operand = rng.randint(2, 3) if op == "*=" else rng.randint(1, 9)
                value = x + operand if op == "+=" else x - operand if op == "-=" else x * operand
                if 0 <= value <= self.max_value:
                    break
            x = value
            segments.append(f" x{op}{operand};")
        segments.append(" print x =")
        return Example(tuple(segments), f" {x}")


# --- language-modelling domains ------------------------------------------------------------------


class TextWindowTask(Task):
    """Language modelling on windows of about `window_chars` characters of a corpus.

    Windows start and end at word boundaries; train windows come from the
    corpus's train part, eval windows from its eval part (so they are
    disjoint as the corpus split is). The corpus is read on first use.
    """

    kind, max_answer_chars = "lm", 0

    def __init__(self, source: str, name: str = "", window_chars: int = 200):
        if window_chars < 20:
            raise UsageError(f"{name or 'lm'}: window_chars must be >= 20, got {window_chars}")
        self.source, self.window_chars = source, window_chars
        if name:
            self.name = name
        self._corpus: Corpus | None = None

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            try:
                self._corpus = load_text(self.source)
            except UsageError as e:
                why = str(e).split(": pass --data")[0]  # that hint is for other commands
                raise UsageError(
                    f"task {self.name or 'lm'}: {why}; use lm:source=PATH to read a local copy, or another task"
                ) from e
        return self._corpus

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        _check_request(self, split, n)
        text = self.corpus.train if split == "train" else self.corpus.eval
        rng = _rng(self.name, split, seed)
        return [Example((self._window(text, rng),), "") for _ in range(n)]

    def _window(self, text: str, rng: random.Random) -> str:
        size = self.window_chars
        if len(text) <= size + 1:
            return text.strip()
        for _ in range(100):
            start = rng.randrange(len(text) - size)
            # move to the start of the next word unless already at one
            if start > 0 and not (text[start - 1].isspace() and not text[start].isspace()):
                found = re.compile(r"\s\S").search(text, start, start + size)
                if found is None:
                    continue
                start = found.start() + 1
            end = start + size
            # cut at the last whitespace that ends a word, unless the window already ends one
            if end < len(text) and not text[end].isspace():
                end = max(text.rfind(" ", start, end), text.rfind("\n", start, end), text.rfind("\t", start, end))
            window = text[start:end].rstrip()
            if len(window) >= size // 2:
                return window
        raise UsageError(f"{self.name}: no window of about {size} characters with word boundaries in the corpus")


@register_task("lm")
def lm_task(source: str = "embedded", window_chars: int = 200) -> Task:
    """Language modelling on any `load_text` source: ``lm:source=PATH``."""
    return TextWindowTask(source, name="lm" if source == "embedded" else f"lm:{source}", window_chars=window_chars)


@register_task("lm_embedded")
def lm_embedded(window_chars: int = 200) -> Task:
    """Language modelling on the embedded corpus (Python's own documentation)."""
    return TextWindowTask("embedded", name="lm_embedded", window_chars=window_chars)


@register_task("lm_wikitext")
def lm_wikitext(window_chars: int = 200) -> Task:
    """Language modelling on WikiText-2 (raw) through `datasets`; a UsageError offline when not cached."""
    return TextWindowTask("wikitext", name="lm_wikitext", window_chars=window_chars)


@register_task("lm_shakespeare")
def lm_shakespeare(path: str = "", window_chars: int = 200) -> Task:
    """Language modelling on tiny Shakespeare from a local file (``lm_shakespeare:path=FILE``).

    Without `path`, ``../shared/data/tinyshakespeare/input.txt.gz`` next to
    the checkout is used when it exists.
    """
    if not path:
        if not DEFAULT_SHAKESPEARE.is_file():
            raise UsageError(
                "lm_shakespeare needs the tiny Shakespeare text: pass its path as the task option path, "
                "e.g. --tasks lm_shakespeare:path=input.txt (plain or .gz)"
            )
        path = str(DEFAULT_SHAKESPEARE)
    elif not Path(path).expanduser().is_file():
        raise UsageError(f"lm_shakespeare: option path={path} is not a file")
    return TextWindowTask(path, name="lm_shakespeare", window_chars=window_chars)


# --- a JSON-lines file of prompt/answer pairs ----------------------------------------------------


class JsonlTask(Task):
    """Examples from a JSON-lines file, one ``{"prompt": ..., "answer": ...}`` object a line.

    ``"segments": [...]`` may replace ``"prompt"`` to give program steps.
    Blank lines are skipped. Each line goes to the eval split when a hash of
    its line number (with `split_seed`) falls in the lowest `eval_fraction`,
    else to train; both splits get at least one line. The task is "lm" when
    every answer is empty, else "qa" (and then no answer may be empty).
    Train lists cycle through the train lines in seeded orders; eval lists
    hold distinct lines (at most as many as the eval split has).
    """

    def __init__(self, path: str | Path, name: str = "", eval_fraction: float = EVAL_FRACTION, split_seed: int = 0):
        self.path = Path(path).expanduser()
        self.name = name or f"jsonl:{path}"
        self.eval_fraction = eval_fraction
        rows = self._read()
        self.kind = "lm" if all(not ex.answer for _, ex in rows) else "qa"
        if self.kind == "qa":
            for lineno, ex in rows:
                if not ex.answer.strip():
                    raise UsageError(f"{self.path}:{lineno}: empty answer (every line needs one, or none may have one)")
        self.max_answer_chars = max(len(ex.answer) for _, ex in rows)
        self._train, self._eval = self._split(rows, split_seed)

    def _read(self) -> list[tuple[int, Example]]:
        if not self.path.is_file():
            raise UsageError(f"task file not found: {self.path}")
        try:
            lines = self.path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {self.path} as UTF-8 text: {e}") from e
        rows = []
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                rows.append((lineno, self._parse(line, lineno)))
        if not rows:
            raise UsageError(f'{self.path} is empty: expected one {{"prompt": ..., "answer": ...}} object a line')
        if len(rows) < 2:
            raise UsageError(f"{self.path} has 1 example: need at least 2 to split into train and eval")
        return rows

    def _parse(self, line: str, lineno: int) -> Example:
        where = f"{self.path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UsageError(f'{where}: expected an object {{"prompt": ..., "answer": ...}}, got {type(obj).__name__}')
        if "segments" in obj:
            segments = obj["segments"]
            if not isinstance(segments, list) or not segments or not all(isinstance(s, str) for s in segments):
                raise UsageError(f'{where}: "segments" must be a non-empty list of strings')
            if "prompt" in obj and obj["prompt"] != "".join(segments):
                raise UsageError(f'{where}: "prompt" differs from the joined "segments"')
        elif isinstance(obj.get("prompt"), str):
            segments = [obj["prompt"]]
        else:
            raise UsageError(f'{where}: needs a string "prompt" (or a "segments" list)')
        answer = obj.get("answer")
        if not isinstance(answer, str):
            raise UsageError(f'{where}: needs a string "answer" ("" for language modelling)')
        return Example(tuple(segments), answer)

    def _split(self, rows: list[tuple[int, Example]], split_seed: int) -> tuple[list[Example], list[Example]]:
        keyed = sorted((_unit_hash("jsonl", split_seed, lineno), lineno, ex) for lineno, ex in rows)
        n_eval = sum(h < self.eval_fraction for h, _, _ in keyed)
        n_eval = min(max(n_eval, 1), len(keyed) - 1)  # both splits non-empty
        by_line = lambda items: [ex for _, _, ex in sorted(items, key=lambda item: item[1])]  # noqa: E731
        return by_line(keyed[n_eval:]), by_line(keyed[:n_eval])

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        _check_request(self, split, n)
        rng = _rng(self.name, split, seed)
        pool = self._train if split == "train" else self._eval
        if split == "eval":
            return rng.sample(pool, min(n, len(pool)))
        out: list[Example] = []
        while len(out) < n:
            order = list(pool)
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
        return out

    @property
    def split_sizes(self) -> tuple[int, int]:
        """Number of (train, eval) lines."""
        return len(self._train), len(self._eval)
