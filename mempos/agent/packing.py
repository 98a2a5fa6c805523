"""Packing Items into contexts: token ids, four-axis positions and loss labels.

Items are laid one after another (each already ends with eos, which
separates them) into rows of at most `context_len` tokens, first fit in the
order given; a row is closed when the next item does not fit. Rows are
right-padded with eos to the longest row; padding is never a target and,
sitting after every real token, is never attended to under the causal mask.
No attention mask separates the examples of a row: they see each other, and
their fingerprints (slot, module, pc axes) are what tells them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mempos.errors import UsageError

from .fingerprints import Fingerprints
from .items import Item

IGNORE = -100  # label of a token that is not a target (transformers' ignore_index)


@dataclass
class Batch:
    ids: torch.Tensor  # (R, L) long
    positions: torch.Tensor  # (R, L, 4) float32
    labels: torch.Tensor  # (R, L) long, IGNORE where not a target
    spans: list[tuple[int, int, int]]  # per item, in input order: (row, start, end)

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


def rows_of(items: Sequence[Item], context_len: int) -> list[list[int]]:
    """Item indices per row, first fit in order."""
    rows: list[list[int]] = []
    used = context_len + 1
    for index, item in enumerate(items):
        n = len(item)
        if n > context_len:
            raise UsageError(
                f"an example of task {item.task} is {n} tokens long, longer than the context "
                f"({context_len} tokens): raise --context-len"
            )
        if used + n > context_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += n
    return rows


def pack(items: Sequence[Item], fingerprints: Fingerprints, eos: int, context_len: int | None = None,
         rows: list[list[int]] | None = None, targets: Sequence[bool] | None = None) -> Batch:
    """Pack `items` into rows (first fit within `context_len`, or the given `rows` of item indices).

    `targets[i]` False makes item i context only (none of its tokens is a
    target), e.g. retrieved exemplars in front of an evaluated example.
    """
    if rows is None:
        rows = rows_of(items, context_len)
    lengths = [sum(len(items[i]) for i in row) for row in rows]
    width = max(lengths)
    ids = np.full((len(rows), width), eos, np.int64)
    labels = np.full((len(rows), width), IGNORE, np.int64)
    positions = np.zeros((len(rows), width, 4), np.float64)
    spans: list[tuple[int, int, int] | None] = [None] * len(items)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            item = items[i]
            end = at + len(item)
            ids[r, at:end] = item.tokens
            positions[r, at:end] = fingerprints.positions(item.pcs, item.slot, item.module, start=at)
            if targets is None or targets[i]:
                mask = item.targets
                labels[r, at:end][mask] = item.tokens[mask]
            spans[i] = (r, at, end)
            at = end
        positions[r, at:, 0] = np.arange(at, width)  # padding: local positions run on, fingerprints 0
    return Batch(torch.from_numpy(ids), torch.from_numpy(positions).float(), torch.from_numpy(labels), spans)


def one_per_row(items: Sequence[Item], fingerprints: Fingerprints, eos: int) -> Batch:
    """Every item alone in its own row (no other example in its context)."""
    return pack(items, fingerprints, eos, rows=[[i] for i in range(len(items))])
