"""The continual-learning loop: episodes in, updates and memory writes out.

`Agent` does one episode at a time (`train_episode`):

1. embed its exemplars (the first ``exemplars_per_episode`` examples, all by
   default: the ones memory will keep): the model's last hidden states,
   mean-pooled over each example's prompt tokens (each example alone, no
   gradient); the episode embedding is the mean of theirs;
2. route it: ``bank.route`` picks (or opens) a module;
3. fingerprint it: example i gets slot ``bank.n_slots + i`` (for an exemplar
   the id it will get when written; the others are not stored, and their ids
   are used again by the next episode, which is harmless: ids act only by
   their differences inside one context, where the current examples' ids are
   distinct from each other and from every stored one) and the episode's
   module; every token its program step;
4. ``strategy.compose_batch`` adds what the strategy wants (replay: exemplars
   sampled from memory, with their stored fingerprints); the items are
   shuffled and packed into contexts of at most ``context_len`` tokens;
5. train ``steps_per_episode`` AdamW steps on the packed contexts (next-token
   loss on targets, plus ``strategy.penalty``, gradient norm clipped);
6. write the episode's exemplars into memory (keys: their embeddings; values:
   their token ids; meta: task, episode, step (optimizer steps before this
   episode), pc (the answer's program step) and the module), then
   ``strategy.after_episode``.

`ContinualRun` drives an Agent over a `TaskStream`: the untrained model's
scores b_j before the first episode; ``before_task`` / ``after_task`` around
each task; at every task boundary it evaluates every task seen so far and
the next unseen one (row i of the score matrices R for exact match and NLL)
and writes a checkpoint; every ``interference_every`` episodes it measures
gradient interference with earlier tasks (`mempos.agent.checkpoints`
restores a run from its last boundary with exactly the numbers an
uninterrupted run would give).

Evaluation reads memory: each evaluated example is packed after the
``context_examples`` exemplars nearest to its prompt embedding (nearest
last, right before it; the farthest are dropped when they would not fit in
``context_len``), with their stored fingerprints; the example itself gets
the next free slot id and the module whose centroid is nearest. Exact match: greedy
decoding (with the KV cache and these positions) of at most
``max_answer_chars + 1`` tokens, cut at the first eos, compared by the
task's scorer. NLL: mean negative log-likelihood per target token (the
answer and its eos; for language-modelling tasks every token but the
first), in nats.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from mempos.errors import UsageError
from mempos.generation import greedy_decode
from mempos.memory import MemoryBank

from .fingerprints import DEFAULT_STRIDE, Fingerprints, auto_strides
from .items import Encoder, ExemplarTable, Item
from .metrics import cosine_summary, gradient_cosine
from .packing import IGNORE, one_per_row, pack
from .strategies import Strategy


@dataclass
class AgentConfig:
    """How the agent trains, remembers and evaluates (the experiment presets fill it)."""

    context_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps_per_episode: int = 1
    fingerprints: tuple[str, ...] = ()  # fingerprint axes switched on: any of slot, module, pc
    fingerprint_stride: float | None = DEFAULT_STRIDE  # None: per axis, 1 / its fastest frequency
    memory: bool = True  # embed, route and write episodes; False: none of it (no replay, no fingerprints)
    exemplars_per_episode: int | None = None  # examples of each episode written to memory (None: all)
    index: str = "flat"  # faiss index of the memory bank: flat, ivf or hnsw
    route_threshold: float = 0.2  # cosine distance beyond which an episode opens a new module
    context_examples: int = 2  # exemplars retrieved from memory in front of each evaluated example
    eval_batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        self.fingerprints = tuple(self.fingerprints)
        for name in ("context_len", "steps_per_episode", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.exemplars_per_episode is not None and self.exemplars_per_episode < 1:
            raise UsageError(f"exemplars-per-episode must be at least 1, got {self.exemplars_per_episode}")
        if self.context_examples < 0:
            raise UsageError(f"context-examples must be >= 0, got {self.context_examples}")
        if self.fingerprint_stride is not None and not self.fingerprint_stride > 0:
            raise UsageError(f"fingerprint stride must be positive, got {self.fingerprint_stride}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise UsageError("lr and grad-clip must be positive")
        if self.fingerprints and not self.memory:
            raise UsageError("fingerprints come from memory: they need the memory bank (memory=True)")


@dataclass
class Probe:
    """Held-out examples of one earlier task, for interference."""

    task: int
    items: list[Item]


@dataclass
class EpisodeRecord:
    step: int
    task: int
    loss: float
    module: int | None
    replayed: int
    interference: dict | None = None
    seconds: float = field(default=0.0, repr=False)


class Agent:
    """A model, its optimizer, its memory and a strategy; one `train_episode` per episode."""

    def __init__(self, model, tokenizer, strategy: Strategy, config: AgentConfig, task_kinds: Sequence[str]):
        if strategy.needs_memory and not config.memory:
            raise UsageError(f"strategy {strategy.name!r} reads memory: it needs the memory bank")
        self.model = model
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.config = config
        self.kinds = list(task_kinds)
        self.encoder = Encoder(tokenizer)
        self.eos = self.encoder.eos
        stride = auto_strides(model) if config.fingerprint_stride is None else config.fingerprint_stride
        self.fingerprints = Fingerprints(config.fingerprints, stride)
        self.bank = (MemoryBank(model.config.n_embd, config.index, threshold=config.route_threshold)
                     if config.memory else None)
        self.exemplars = ExemplarTable()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.rng = np.random.default_rng(config.seed)  # replay draws and packing order
        self.updates = 0  # optimizer steps so far

    # -- examples -------------------------------------------------------------------------

    def items(self, examples, task_ids: Sequence[int]) -> list[Item]:
        return [self.encoder.item(ex, self.kinds[t] == "lm", t) for ex, t in zip(examples, task_ids)]

    def episode_items(self, episode) -> list[Item]:
        task_ids = episode.example_task_ids or (episode.task_id,) * len(episode.examples)
        return self.items(episode.examples, task_ids)

    # -- memory ---------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, items: Sequence[Item]) -> np.ndarray:
        """(n, n_embd) float32: last hidden states mean-pooled over each item's prompt, each item alone."""
        prompts = [item.prompt() for item in items]
        batch = one_per_row(prompts, self.fingerprints, self.eos)
        self.model.eval()
        hidden = self.model.transformer(batch.ids, token_positions=batch.positions).last_hidden_state
        lengths = torch.tensor([len(p) for p in prompts])
        mask = (torch.arange(batch.ids.shape[1])[None] < lengths[:, None]).to(hidden.dtype)
        pooled = (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
        return pooled.float().numpy()

    def replay(self, n: int, exclude_task=None, balance: str = "uniform") -> list[Item]:
        """Up to n stored exemplars (not of `exclude_task`), drawn with the agent's generator."""
        if self.bank is None:
            raise UsageError("replay needs the memory bank")
        if n <= 0 or self.bank.n_slots == 0:
            return []
        slots = self.bank.sample(n, self.rng, exclude_task=exclude_task, balance=balance)
        return self.exemplars.items(self.bank, slots)

    def recall(self, items: Sequence[Item], k: int) -> tuple[list[list[Item]], list[int]]:
        """For each item: the k stored exemplars nearest its prompt embedding (farthest first), and the
        module whose centroid is nearest (0 while there is none). Reads only: routing a single example
        would move the module centroids, and the router's threshold is set for episode means, which
        single examples scatter around."""
        if self.bank is None or not items:
            return [[] for _ in items], [0] * len(items)
        queries = self.embed(items)
        modules = [self.bank.router.nearest(q)[0] or 0 for q in queries]
        if k == 0 or self.bank.n_slots == 0:
            return [[] for _ in items], modules
        _, ids = self.bank.read(queries, min(k, self.bank.n_slots))
        contexts = [self.exemplars.items(self.bank, row[row >= 0][::-1]) for row in ids]
        return contexts, modules

    # -- training ---------------------------------------------------------------------------

    def loss(self, batch) -> torch.Tensor:
        return self.model(batch.ids, token_positions=batch.positions, labels=batch.labels).loss

    def gradient(self, items: Sequence[Item]) -> list[torch.Tensor]:
        """Gradient of the mean target loss of `items` (each alone in its row); leaves .grad alone."""
        return self.loss_and_gradient(items)[1]

    def loss_and_gradient(self, items: Sequence[Item]) -> tuple[float, list[torch.Tensor]]:
        self.model.train()
        loss = self.loss(one_per_row(items, self.fingerprints, self.eos))
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.item(), [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    @torch.no_grad()
    def heldout_loss(self, items: Sequence[Item]) -> float:
        self.model.eval()
        return self.loss(one_per_row(items, self.fingerprints, self.eos)).item()

    def train_episode(self, episode, probes: Sequence[Probe] = ()) -> EpisodeRecord:
        """One episode: embed, route, fingerprint, compose, train, write (see the module docstring)."""
        start, clock = time.perf_counter(), self.updates
        items = self.episode_items(episode)
        module = None
        if self.bank is not None:
            stored = len(items) if self.config.exemplars_per_episode is None \
                else min(self.config.exemplars_per_episode, len(items))
            keys = self.embed(items[:stored])
            tasks = sorted({item.task for item in items})
            steps = sorted({int(pc) for item in items for pc in np.unique(item.pcs)})
            module = self.bank.route(keys.mean(0), task=tasks, pc=steps)
            first = self.bank.n_slots
            items = [item.at(first + i, module) for i, item in enumerate(items)]
        composed = self.strategy.compose_batch(self, episode, items)
        order = self.rng.permutation(len(composed))
        batch = pack([composed[i] for i in order], self.fingerprints, self.eos, self.config.context_len)
        losses, interference = [], None
        for s in range(self.config.steps_per_episode):
            loss, probed = self._update(batch, probes if s == 0 else ())
            losses.append(loss)
            interference = interference or probed
        if self.bank is not None:
            exemplars = items[:stored]
            meta = {"task": [item.task for item in exemplars], "episode": episode.step, "step": clock,
                    "pc": [item.answer_pc for item in exemplars]}
            _, slots = self.bank.write(None, keys, [item.tokens for item in exemplars], meta, module=module)
            assert slots[0] == first, "memory slots were not the ones announced to the fingerprints"
            self.exemplars.add(exemplars)
        self.strategy.after_episode(self, episode, items)
        return EpisodeRecord(episode.step, episode.task_id, float(np.mean(losses)), module,
                             len(composed) - len(items), interference, time.perf_counter() - start)

    def _update(self, batch, probes: Sequence[Probe]) -> tuple[float, dict | None]:
        before = {p.task: self.loss_and_gradient(p.items) for p in probes}
        self.model.train()
        loss = self.loss(batch)
        penalty = self.strategy.penalty(self.model)
        total = loss if penalty is None else loss + penalty
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        current = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params] \
            if probes else None
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if not probes:
            return loss.item(), None
        cosines = {str(t): gradient_cosine(current, grads) for t, (_, grads) in before.items()}
        change = {str(p.task): self.heldout_loss(p.items) - before[p.task][0] for p in probes}
        record = {"cosines": cosines, **cosine_summary(cosines.values()), "loss_change": change,
                  "mean_loss_change": float(np.mean(list(change.values())))}
        return loss.item(), record

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, task, task_id: int, examples: Sequence) -> dict:
        """{"em": exact-match rate (None for lm tasks), "nll": nats per target token, "n": examples}."""
        items = self.items(examples, [task_id] * len(examples))
        contexts, modules = self.recall(items, self.config.context_examples)
        slot = self.bank.n_slots if self.bank is not None else 0
        items = [item.at(slot, module) for item, module in zip(items, modules)]
        contexts = [self._fit(context, item) for context, item in zip(contexts, items)]
        self.model.eval()
        nll = self._nll(items, contexts)
        em = None
        if task.kind != "lm":
            em = self._exact_match(task, examples, items, contexts)
        return {"em": em, "nll": nll, "n": len(items)}

    def _fit(self, context: list[Item], item: Item) -> list[Item]:
        """Drop the farthest exemplars until context + item fit in `context_len` (the training length)."""
        context = list(context)
        while context and sum(len(c) for c in context) + len(item) > self.config.context_len:
            context.pop(0)
        return context

    def _case(self, context: list[Item], item: Item) -> tuple[list[Item], list[bool]]:
        return context + [item], [False] * len(context) + [True]

    def _nll(self, items, contexts) -> float:
        total, count = 0.0, 0
        size = self.config.eval_batch_size
        for lo in range(0, len(items), size):
            cases = [self._case(c, i) for c, i in zip(contexts[lo:lo + size], items[lo:lo + size])]
            flat = [it for case, _ in cases for it in case]
            flags = [f for _, fl in cases for f in fl]
            rows, at = [], 0
            for case, _ in cases:
                rows.append(list(range(at, at + len(case))))
                at += len(case)
            batch = pack(flat, self.fingerprints, self.eos, rows=rows, targets=flags)
            logits = self.model(batch.ids, token_positions=batch.positions).logits[:, :-1].float()
            labels = batch.labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                                    reduction="sum")
            total += nll.item()
            count += int((labels != IGNORE).sum())
        return total / count if count else math.nan

    def _exact_match(self, task, examples, items, contexts) -> float:
        budget = int(task.max_answer_chars) + 1  # answer tokens (at most one per character) + eos
        prompts = [c + [i.prompt()] for c, i in zip(contexts, items)]
        lengths = [sum(len(x) for x in p) for p in prompts]
        by_length: dict[int, list[int]] = {}
        for index, length in enumerate(lengths):
            by_length.setdefault(length, []).append(index)
        correct = 0
        for length in sorted(by_length):  # equal lengths decode together, with no padding
            group = by_length[length]
            for lo in range(0, len(group), self.config.eval_batch_size):
                chunk = group[lo:lo + self.config.eval_batch_size]
                flat = [it for i in chunk for it in prompts[i]]
                rows, at = [], 0
                for i in chunk:
                    rows.append(list(range(at, at + len(prompts[i]))))
                    at += len(prompts[i])
                batch = pack(flat, self.fingerprints, self.eos, rows=rows)
                out = greedy_decode(self.model, batch.ids, budget, positions=batch.positions,
                                    step=self.fingerprints.next_position)
                for i, row in zip(chunk, out[:, length:].tolist()):
                    answer = row[: row.index(self.eos)] if self.eos in row else row
                    correct += bool(task.score(self.encoder.decode(answer), examples[i].answer))
        return correct / len(items)


# -- the run over a stream ------------------------------------------------------------------------


def empty_matrix(n: int) -> list[list[float]]:
    return [[math.nan] * n for _ in range(n)]


class ContinualRun:
    """An Agent over a TaskStream, with evaluation, interference and checkpoints at task boundaries.

    `metrics` holds everything the run measures: R ("em", "nll"; row i after
    task i, NaN where not evaluated), the untrained baselines b_j, the
    per-episode training log and the interference series. Wall-clock times
    are kept apart in `timing` (they are the only numbers a resumed run does
    not reproduce).
    """

    def __init__(self, agent: Agent, stream, *, interference_every: int = 0, interference_examples: int = 8,
                 checkpoints=None, label: str = "", progress: bool | None = None):
        self.agent, self.stream = agent, stream
        self.interference_every = int(interference_every)
        self.interference_examples = int(interference_examples)
        self.checkpoints = checkpoints  # a Checkpoints folder, or None
        self.label = label
        self.progress = progress
        T = stream.n_tasks
        self.metrics = {
            "tasks": list(stream.task_names),
            "kinds": [t.kind for t in stream.tasks],
            "strategy": agent.strategy.name,
            "strategy_options": dict(agent.strategy.options),
            "fingerprints": list(agent.config.fingerprints),
            "agent": asdict(agent.config) | {"fingerprints": list(agent.config.fingerprints)},
            "R": {"em": empty_matrix(T), "nll": empty_matrix(T)},
            "baseline": {"em": [math.nan] * T, "nll": [math.nan] * T},
            "episodes": [],
            "interference": [],
            "memory": {},
            "finished": False,
        }
        self.timing = {"episode_seconds": [], "eval_seconds": 0.0}
        self.next_step = 0
        self._probes: dict[int, Probe] = {}

    # -- pieces -------------------------------------------------------------------------------

    def evaluate_tasks(self, task_ids, examples_of) -> dict[int, dict]:
        start = time.perf_counter()
        out = {j: self.agent.evaluate(self.stream.tasks[j], j, examples_of(j)) for j in task_ids}
        self.timing["eval_seconds"] += time.perf_counter() - start
        return out

    def baseline(self) -> None:
        """b_j: the untrained model (empty memory) on every task, before the first episode."""
        sets = self.stream.baseline_eval_sets()
        for j, scores in self.evaluate_tasks(range(self.stream.n_tasks), lambda j: sets[j]).items():
            self.metrics["baseline"]["em"][j] = _num(scores["em"])
            self.metrics["baseline"]["nll"][j] = scores["nll"]

    def evaluate_row(self, row: int) -> None:
        """Row `row` of R: every task seen so far and the next unseen one."""
        last = min(row + 1, self.stream.n_tasks - 1)
        for j, scores in self.evaluate_tasks(range(last + 1), self.stream.eval_set).items():
            self.metrics["R"]["em"][row][j] = _num(scores["em"])
            self.metrics["R"]["nll"][row][j] = scores["nll"]

    def probes(self, task: int) -> list[Probe]:
        """Held-out batches of every task before `task` (the first examples of its eval set)."""
        out = []
        for j in range(task):
            if j not in self._probes:
                examples = self.stream.eval_set(j)[: self.interference_examples]
                self._probes[j] = Probe(j, self.agent.items(examples, [j] * len(examples)))
            out.append(self._probes[j])
        return out

    # -- the loop -----------------------------------------------------------------------------

    def run(self, stop_after_task: int | None = None) -> dict:
        """Train through the stream (from `next_step`); returns `metrics`. `stop_after_task=i`
        stops after task i's boundary checkpoint, as a killed run would (for tests)."""
        agent, stream, strategy = self.agent, self.stream, self.agent.strategy
        E, total = stream.episodes_per_task, len(stream)
        if self.next_step == 0 and not self.metrics["episodes"]:
            self.baseline()
        disable = {True: False, False: True, "lines": True}.get(self.progress)  # None: only on a terminal
        # Off a terminal (a log file, CI) or in a worker process, bars would be noise: a line per task instead.
        lines = self.progress == "lines" or (self.progress is None and not sys.stderr.isatty())
        started = time.perf_counter()
        name = self.label or strategy.name
        tasks_bar = tqdm(total=stream.n_tasks, initial=self.next_step // E, desc=name, unit="task",
                         disable=disable, dynamic_ncols=True, position=0)
        bar = None
        for episode in strategy.episodes(stream, self.next_step):
            task = episode.step // E
            if episode.step % E == 0 or bar is None:
                if episode.step % E == 0:
                    strategy.before_task(agent, task)
                what = stream.task_names[task] if strategy.evaluates_tasks else "joint"
                bar = tqdm(total=E, initial=episode.step % E, desc=f"  task {task + 1} ({what})", unit="episode",
                           disable=disable, dynamic_ncols=True, position=1, leave=False)
            due = (self.interference_every > 0 and strategy.evaluates_tasks and task > 0
                   and episode.step % self.interference_every == 0)
            record = agent.train_episode(episode, self.probes(task) if due else ())
            self.timing["episode_seconds"].append(record.seconds)
            entry = {"step": record.step, "task": task, "loss": record.loss, "module": record.module,
                     "replayed": record.replayed}
            self.metrics["episodes"].append(entry)
            if record.interference is not None:
                self.metrics["interference"].append({"step": record.step, "task": task, **record.interference})
            self.next_step = episode.step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.3f}")
            if self.next_step % E == 0:
                bar.set_postfix(loss=f"{record.loss:.3f}", status="evaluating")
                strategy.after_task(agent, task)
                if strategy.evaluates_tasks or self.next_step == total:
                    self.evaluate_row(task)
                self.metrics["finished"] = self.next_step == total
                self._memory_summary()
                if self.checkpoints is not None:
                    self.checkpoints.save(self, task)
                bar.close()
                bar = None
                tasks_bar.update(1)
                if lines:
                    row = self.metrics["R"]["nll"][task] if strategy.evaluates_tasks or self.next_step == total else []
                    seen = ", ".join(f"{n} {v:.3f}" for n, v in zip(stream.task_names, row) if not math.isnan(v))
                    print(f"{name}: task {task + 1}/{stream.n_tasks} ({stream.task_names[task]}) done after "
                          f"{time.perf_counter() - started:.0f} s; last loss {record.loss:.3f}"
                          + (f"; NLL {seen}" if seen else ""), file=sys.stderr, flush=True)
                if stop_after_task is not None and task >= stop_after_task and self.next_step < total:
                    break
        if bar is not None:
            bar.close()
        tasks_bar.close()
        return self.metrics

    def _memory_summary(self) -> None:
        bank = self.agent.bank
        self.metrics["memory"] = {} if bank is None else {
            "slots": bank.n_slots, "modules": bank.n_modules,
            "modules_per_task": _modules_per_task(bank),
        }


def _num(value) -> float:
    return math.nan if value is None else float(value)


def _modules_per_task(bank) -> dict[str, list[int]]:
    meta = bank.store.meta(np.arange(bank.n_slots))
    out: dict[str, list[int]] = {}
    for task in np.unique(meta["task"]):
        out[str(int(task))] = sorted({int(m) for m in np.unique(meta["module"][meta["task"] == task])})
    return out
