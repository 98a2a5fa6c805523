"""Examples as the model sees them, and what memory must keep to replay them.

An `Item` is one example in token ids: its prompt segments (each encoded on
its own, so segment and answer boundaries are token boundaries and every
token has one program-counter value), its answer, and a closing eos. It also
carries the fingerprint values it will be packed with: its memory slot, its
module and its task.

Which tokens are targets of the loss: for a "qa" example the answer tokens
and the closing eos (so greedy decoding learns to stop); for an "lm" example
every token but the first.

The memory bank stores token ids and one integer per field (task, episode,
step, pc, module) per slot. Replaying an example needs its per-token program
counters and where its prompt ends; `ExemplarTable` keeps exactly that, slot
by slot, beside the bank (the agent saves it with the bank).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mempos.errors import UsageError
from mempos.io import atomic_path
from mempos.models import encode


@dataclass(frozen=True)
class Item:
    tokens: np.ndarray  # int64: prompt segments, answer, eos (a prompt-only item stops after the prompt)
    pcs: np.ndarray  # int64 program counter of each token
    n_prompt: int  # number of prompt tokens
    lm: bool  # True: every token but the first is a target; False: the answer and its eos are
    task: int = -1
    slot: int = 0
    module: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def targets(self) -> np.ndarray:
        """Bool per token: is it a target of the loss (predicted from the token before it)?"""
        mask = np.zeros(len(self.tokens), bool)
        if self.lm:
            mask[1:] = True
        else:
            mask[self.n_prompt:] = True
        return mask

    @property
    def answer_pc(self) -> int:
        """The program step of the answer (the last segment's)."""
        return int(self.pcs[self.n_prompt - 1]) if self.n_prompt else 0

    def prompt(self) -> Item:
        """The same item cut after its prompt (what the model sees before answering)."""
        return replace(self, tokens=self.tokens[: self.n_prompt], pcs=self.pcs[: self.n_prompt])

    def at(self, slot: int, module: int) -> Item:
        return replace(self, slot=int(slot), module=int(module))


class Encoder:
    """Examples -> Items with one tokenizer, memoising the (short, repeated) strings it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = int(tokenizer.eos_token_id)
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = encode(self.tokenizer, text) if text else []
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def item(self, example, lm: bool, task: int = -1) -> Item:
        """Segments, answer and eos as one Item; tokens of segment s get pc s, the answer the last pc."""
        tokens: list[int] = []
        pcs: list[int] = []
        for pc, segment in enumerate(example.segments):
            ids = self.ids(segment)
            tokens += ids
            pcs += [pc] * len(ids)
        if not tokens:
            raise UsageError(f"an example of task {task} has an empty prompt: {example!r}")
        n_prompt = len(tokens)
        last = len(example.segments) - 1
        answer = self.ids(example.answer)
        tokens += answer + [self.eos]
        pcs += [last] * (len(answer) + 1)
        return Item(np.asarray(tokens, np.int64), np.asarray(pcs, np.int64), n_prompt, bool(lm), int(task))

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class ExemplarTable:
    """Per memory slot: program counters of its tokens, prompt length and kind (slot id = row)."""

    FILE = "exemplars.npz"

    def __init__(self):
        self._pcs: list[np.ndarray] = []
        self._n_prompt: list[int] = []
        self._lm: list[bool] = []

    def __len__(self) -> int:
        return len(self._pcs)

    def add(self, items: list[Item]) -> None:
        for item in items:
            self._pcs.append(np.asarray(item.pcs, np.int64))
            self._n_prompt.append(int(item.n_prompt))
            self._lm.append(bool(item.lm))

    def items(self, bank, slot_ids) -> list[Item]:
        """Stored examples as Items with their stored fingerprints (slot id, module, task)."""
        ids = np.asarray(slot_ids, np.int64).reshape(-1)
        if not len(ids):
            return []
        fingerprints = bank.fingerprints(ids)  # slot and module per slot (its pc is the answer's step)
        tasks = bank.store.meta(ids)["task"]
        out = []
        for k, (slot, tokens) in enumerate(zip(ids, bank.tokens(ids))):
            out.append(Item(tokens, self._pcs[slot], self._n_prompt[slot], self._lm[slot],
                            int(tasks[k]), int(fingerprints["slot"][k]), int(fingerprints["module"][k])))
        return out

    def save(self, folder) -> None:
        lengths = np.array([len(p) for p in self._pcs], np.int64)
        flat = np.concatenate(self._pcs) if self._pcs else np.zeros(0, np.int64)
        with atomic_path(Path(folder) / self.FILE) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, pcs=flat, lengths=lengths, n_prompt=np.array(self._n_prompt, np.int64),
                         lm=np.array(self._lm, bool))

    @classmethod
    def load(cls, folder, n_slots: int) -> ExemplarTable:
        path = Path(folder) / cls.FILE
        try:
            with np.load(path) as data:
                flat, lengths, n_prompt, lm = data["pcs"], data["lengths"], data["n_prompt"], data["lm"]
        except (OSError, KeyError, ValueError) as exc:
            raise UsageError(f"{path}: unreadable exemplar table ({exc.__class__.__name__})") from None
        if not (len(lengths) == len(n_prompt) == len(lm) == n_slots) or lengths.sum() != len(flat):
            raise UsageError(f"{path}: exemplar table does not match the memory bank's {n_slots} slots")
        table = cls()
        table._pcs = np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1]) if n_slots else []
        table._n_prompt = [int(n) for n in n_prompt]
        table._lm = [bool(x) for x in lm]
        return table
