"""Command-line values shared by the commands: comma-separated lists and seeds."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UsageError

MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 32 bits; every run seeds numpy


def parts(text: str, option: str) -> list[str]:
    """"a, b" -> ["a", "b"]; an empty list or an empty entry ("a,,b", "a,") is one UsageError."""
    items = [part.strip() for part in text.split(",")]
    if not text.strip():
        raise UsageError(f"{option} is empty")
    if not all(items):
        raise UsageError(f"{option} has an empty entry: {text!r}")
    return items


def number_list(text: str, option: str, kind=int) -> list:
    """"1,2,3" -> [1, 2, 3]; a part that is not a `kind` is one UsageError."""
    try:
        return [kind(part) for part in parts(text, option)]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise UsageError(f"{option} takes comma-separated {what}, got {text!r}") from None


def check_seeds(seed: int, seeds: Sequence[int] | None) -> None:
    """--seed and --seeds: every seed in 0..2**32 - 1; --seeds, when given, distinct and not empty."""
    for value in [seed, *(seeds or [])]:
        if not 0 <= value <= MAX_SEED:
            raise UsageError(f"seeds must be between 0 and 2**32 - 1, got {value}")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise UsageError("--seeds must name distinct seeds")
