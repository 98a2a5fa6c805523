"""A stream of task episodes that never shows the agent a future task.

`TaskStream` draws, once and deterministically from its seed, each task's
training examples (``episodes_per_task * batch_size`` of them, cut into
episodes of ``batch_size``) and its held-out evaluation set. Iterating
yields task 0's episodes, then task 1's, and so on; ``eval_set(j)`` is
allowed only for tasks already seen and the next unseen one (for forward
transfer). ``joint()`` yields the very same training examples of all tasks
shuffled together: the upper-bound reference. ``resume_from(step)``
continues a killed run with exactly the episodes it would have had.

Every task draws with the stream's seed; the task's name is part of its
generator's seed, so tasks differ from one another and a task's examples do
not depend on its place in the order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from mempos.agent.tasks import Example, Task
from mempos.errors import UsageError


@dataclass(frozen=True)
class Episode:
    """A batch of examples from one task (task_id -1 and name "joint" for the joint reference)."""

    task_id: int
    task_name: str
    step: int  # global episode counter, 0-based
    examples: tuple[Example, ...]
    example_task_ids: tuple[int, ...] = ()  # the task of each example (all task_id, except in joint episodes)


class TaskStream:
    """Tasks one after another, as episodes of `batch_size` examples; see the module docstring."""

    def __init__(self, tasks: list[Task], episodes_per_task: int, batch_size: int, seed: int, eval_size: int = 64):
        tasks = list(tasks)
        if not tasks:
            raise UsageError("the task stream needs at least one task")
        for name, value in (("episodes per task", episodes_per_task), ("batch size", batch_size),
                            ("eval size", eval_size)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a whole number >= 1, got {value!r}")
        names = [t.name for t in tasks]
        for name in names:
            if names.count(name) > 1:
                raise UsageError(f"task {name!r} appears twice in the stream")
        self.tasks = tasks
        self.task_names = tuple(names)
        self.n_tasks = len(tasks)
        self.episodes_per_task = episodes_per_task
        self.batch_size = batch_size
        self.seed = seed
        self.eval_size = eval_size
        self._current_task = -1
        self._episodes: list[Episode] = []
        self._eval_sets: list[tuple[Example, ...]] = []
        n_train = episodes_per_task * batch_size
        for task_id, task in enumerate(tasks):
            train = task.examples("train", n_train, seed)
            if len(train) != n_train:
                raise UsageError(f"task {task.name!r} gave {len(train)} training examples, {n_train} were asked for")
            eval_ = task.examples("eval", eval_size, seed)
            if not eval_:
                raise UsageError(f"task {task.name!r} has no evaluation examples")
            self._eval_sets.append(tuple(eval_))
            for index in range(episodes_per_task):
                batch = tuple(train[index * batch_size:(index + 1) * batch_size])
                step = task_id * episodes_per_task + index
                self._episodes.append(Episode(task_id, task.name, step, batch, (task_id,) * batch_size))

    # --- the sequential stream ---------------------------------------------------------------

    def __len__(self) -> int:
        """Number of episodes in the whole stream (n_tasks * episodes_per_task)."""
        return len(self._episodes)

    def __iter__(self) -> Iterator[Episode]:
        """Task 0's episodes, then task 1's, ...; the same for the same seed."""
        return self.resume_from(0)

    def resume_from(self, step: int) -> Iterator[Episode]:
        """The episodes from global step `step` on, as an uninterrupted run would have them.

        `current_task` is set at once to the task of episode ``step - 1``
        (-1 for step 0), so a resumed run may evaluate what it had seen.
        """
        if not isinstance(step, int) or not 0 <= step <= len(self._episodes):
            raise ValueError(f"resume step must be in 0..{len(self._episodes)}, got {step!r}")
        self._current_task = self.task_of_step(step - 1) if step > 0 else -1
        return self._yield(self._episodes[step:])

    def _yield(self, episodes: list[Episode]) -> Iterator[Episode]:
        for episode in episodes:
            self._current_task = episode.task_id
            yield episode

    @property
    def current_task(self) -> int:
        """The task of the last yielded episode (-1 before the first; n_tasks - 1 once `joint` has begun)."""
        return self._current_task

    def task_of_step(self, step: int) -> int:
        """The task that global step `step` belongs to."""
        if not 0 <= step < len(self._episodes):
            raise IndexError(f"step {step} is outside the stream (0..{len(self._episodes) - 1})")
        return step // self.episodes_per_task

    def is_task_end(self, step: int) -> bool:
        """True for the last episode of a task (where the loop evaluates)."""
        self.task_of_step(step)  # range check
        return (step + 1) % self.episodes_per_task == 0

    # --- evaluation ---------------------------------------------------------------------------

    def eval_set(self, task_id: int) -> list[Example]:
        """Held-out examples of a seen task or of the next unseen one; PermissionError beyond that."""
        self._check_task_id(task_id)
        if task_id > self._current_task + 1:
            raise PermissionError(
                f"task {task_id} ({self.task_names[task_id]}) is in the future: the stream is at task "
                f"{self._current_task}, so only tasks 0..{self._current_task + 1} may be evaluated"
            )
        return list(self._eval_sets[task_id])

    def baseline_eval_sets(self) -> list[list[Example]]:
        """Every task's held-out set, for the untrained model's scores b_j (FWT).

        Allowed only before the first episode: the model has learnt nothing yet,
        so scoring it on all tasks leaks nothing about them into training.
        """
        if self._current_task != -1:
            raise PermissionError(
                "baseline evaluation sets are only available before the first episode "
                f"(the stream is at task {self._current_task})"
            )
        return [list(examples) for examples in self._eval_sets]

    def _check_task_id(self, task_id: int) -> None:
        if not isinstance(task_id, int) or not 0 <= task_id < self.n_tasks:
            raise IndexError(f"task id must be in 0..{self.n_tasks - 1}, got {task_id!r}")

    # --- the joint reference ------------------------------------------------------------------

    def joint(self, start: int = 0) -> Iterator[Episode]:
        """All tasks' training examples shuffled together into episodes (task_id -1).

        Same examples and number of episodes as the sequential stream; `start`
        skips the first `start` episodes (for resuming). Every task counts as
        seen once the first joint episode is yielded.
        """
        pool = [(ep.task_id, ex) for ep in self._episodes for ex in ep.examples]
        random.Random(f"joint\x1f{self.seed}").shuffle(pool)
        episodes = []
        for step in range(len(self._episodes)):
            batch = pool[step * self.batch_size:(step + 1) * self.batch_size]
            episodes.append(Episode(-1, "joint", step, tuple(ex for _, ex in batch), tuple(t for t, _ in batch)))
        if not isinstance(start, int) or not 0 <= start <= len(episodes):
            raise ValueError(f"joint start step must be in 0..{len(episodes)}, got {start!r}")
        if start > 0:  # a resumed joint run has seen every task
            self._current_task = self.n_tasks - 1
        return self._yield_joint(episodes[start:])

    def _yield_joint(self, episodes: list[Episode]) -> Iterator[Episode]:
        for episode in episodes:
            self._current_task = self.n_tasks - 1
            yield episode
