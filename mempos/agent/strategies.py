"""Continual-learning strategies: the loop calls their hooks; none copies the loop.

The loop (`mempos.agent.loop`) does, per episode: embed, route, fingerprint,
``compose_batch``, train (loss + ``penalty``), write to memory,
``after_episode``; around each task it calls ``before_task`` and
``after_task``; ``episodes`` chooses what it iterates. A strategy overrides
only the hooks it needs (Avalanche's plugin style):

=================  =========================================================
hook               default
=================  =========================================================
episodes(stream,   ``stream.resume_from(start)``: the tasks one after another
start)
evaluates_tasks    True: evaluate at every task boundary (row i of R)
before_task        nothing
compose_batch      the current examples alone
penalty(model)     None (no extra loss term)
after_episode      nothing
after_task         nothing
state_dict /       {} (what must survive a resume, e.g. EWC's Fisher)
load_state_dict
=================  =========================================================

Adding one::

    @register_strategy("mine")
    class Mine(Strategy):
        defaults = {"ratio": 0.5}           # options, typed by their defaults

        def compose_batch(self, agent, episode, items):
            return items + agent.replay(round(self.ratio * len(items)), exclude_task=episode.task_id)

and run it with ``--strategy mine`` or ``--compare "naive,mine:ratio=0.25"``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch

from mempos.errors import UsageError

STRATEGIES: dict[str, type] = {}


def register_strategy(name: str):
    def add(cls):
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return add


class Strategy:
    """Base class: the plain loop (fine-tuning); see the module docstring for the hooks."""

    name = "base"
    summary = ""
    defaults: dict = {}
    needs_memory = False  # True: refuses to run without the memory bank
    evaluates_tasks = True

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(self.defaults) or "none"
            raise UsageError(f"strategy {self.name!r} has no option {unknown[0]!r} (options: {known})")
        for key, default in self.defaults.items():
            value = options.get(key, default)
            if isinstance(default, numbers.Real) and not isinstance(default, bool):
                if isinstance(value, str):  # from a variant spec such as replay:ratio=0.5
                    try:
                        value = float(value)
                    except ValueError:
                        pass
                if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                    raise UsageError(f"strategy {self.name!r}: option {key} must be a finite number, got {value!r}")
                if isinstance(default, int) and value != int(value):
                    raise UsageError(f"strategy {self.name!r}: option {key} must be a whole number, got {value!r}")
                value = type(default)(value)
            setattr(self, key, value)
        self.options = {key: getattr(self, key) for key in self.defaults}
        self.validate()

    def validate(self) -> None:
        """Check option values (raise UsageError)."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    # -- hooks ---------------------------------------------------------------------------

    def episodes(self, stream, start: int = 0) -> Iterator:
        return stream.resume_from(start)

    def before_task(self, agent, task_id: int) -> None:
        pass

    def compose_batch(self, agent, episode, items: list) -> list:
        return items

    def penalty(self, model) -> torch.Tensor | None:
        return None

    def after_episode(self, agent, episode, items: list) -> None:
        pass

    def after_task(self, agent, task_id: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register_strategy("naive")
class Naive(Strategy):
    summary = "fine-tune on each task in turn (the lower bound)"


@register_strategy("replay")
class Replay(Strategy):
    summary = ("experience replay: pack ratio x (current examples) exemplars of earlier tasks, sampled "
               "from memory, into the same contexts (balance: uniform over slots, or equal per module)")
    defaults = {"ratio": 1.0, "balance": "uniform"}
    needs_memory = True

    def validate(self) -> None:
        if not 0 <= self.ratio <= 100:
            raise UsageError(f"replay ratio must be between 0 and 100, got {self.ratio}")
        if self.balance not in ("uniform", "module"):
            raise UsageError(f"replay balance must be uniform or module, got {self.balance!r}")

    def compose_batch(self, agent, episode, items):
        return items + agent.replay(round(self.ratio * len(items)), exclude_task=episode.task_id,
                                    balance=self.balance)


@register_strategy("ewc")
class EWC(Strategy):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): after each task, the diagonal
    empirical Fisher F_t = mean over the task's last `samples` examples of (d loss / d theta)^2,
    each example alone; the loss then adds lambda/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2."""

    summary = "elastic weight consolidation: diagonal Fisher per finished task, penalty lambda/2 F (theta - theta*)^2"
    defaults = {"lambda": 100.0, "samples": 32}

    def validate(self) -> None:
        self.lam = getattr(self, "lambda")  # `lambda` is the option's name, but a Python keyword
        if not 0 <= self.lam <= 1e12 or not 1 <= self.samples <= 10**5:
            raise UsageError(f"ewc needs 0 <= lambda <= 1e12 and 1 <= samples <= 100000, got {self.lam} and {self.samples}")
        self.tasks: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (fisher, anchor) per task
        self._seen: list = []

    def before_task(self, agent, task_id):
        self._seen = []

    def after_episode(self, agent, episode, items):
        self._seen = (self._seen + list(items))[-self.samples:]

    def after_task(self, agent, task_id):
        if not self._seen:
            return
        params = [p for p in agent.model.parameters() if p.requires_grad]
        fisher = [torch.zeros_like(p) for p in params]
        for item in self._seen:
            grads = agent.gradient([item])
            for f, g in zip(fisher, grads):
                f += g * g
        fisher = [f / len(self._seen) for f in fisher]
        self.tasks.append((fisher, [p.detach().clone() for p in params]))
        self._seen = []

    def penalty(self, model):
        if not self.tasks:
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        total = params[0].new_zeros(())
        for fisher, anchor in self.tasks:
            for p, f, a in zip(params, fisher, anchor):
                total = total + (f * (p - a) ** 2).sum()
        return self.lam / 2 * total

    def state_dict(self):
        return {"tasks": [{"fisher": f, "anchor": a} for f, a in self.tasks]}

    def load_state_dict(self, state):
        self.tasks = [(t["fisher"], t["anchor"]) for t in state.get("tasks", [])]


@register_strategy("joint")
class Joint(Strategy):
    summary = ("all tasks' training examples shuffled together, evaluated once at the end "
               "(the upper-bound reference R* for intransigence)")
    evaluates_tasks = False

    def episodes(self, stream, start=0):
        return stream.joint(start)


def make_strategy(name: str, **options) -> Strategy:
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**options)
