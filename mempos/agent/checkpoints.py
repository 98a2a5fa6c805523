"""Task-boundary checkpoints of a continual run, and resuming from them exactly.

A run's checkpoint folder holds one sub-folder per task boundary and a small
``latest.json`` naming the newest complete one::

    task-000/   model.pt (mempos.checkpoint: weights, encoding, tokenizer)
                optimizer.pt, strategy.pt (e.g. EWC's Fisher and anchors)
                memory/ (MemoryBank.save), exemplars.npz (per-slot program counters)
                rng.json (python, numpy, torch and the agent's generator), rng_torch.pt
                state.json (next global step, the metrics so far)
    latest.json {"boundary": "task-000", "next_step": ..., "task": ...}

A boundary folder is written under a temporary name and renamed whole;
``latest.json`` is replaced atomically after it. A run killed at any moment
therefore resumes from the last boundary that was written completely, and
everything it then does is a function of what was saved: the same episodes
(the stream resumes at the saved step), the same replay draws and packing
order (the agent's generator state), the same weights and optimizer moments,
the same memory (a reloaded faiss flat index returns identical results).
"""

from __future__ import annotations

import json
import re
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mempos.checkpoint import load_checkpoint, save_checkpoint
from mempos.errors import UsageError
from mempos.io import write_json
from mempos.memory import MemoryBank

from .items import ExemplarTable

LATEST = "latest.json"


def plain(value):
    """JSON-ready: NaN -> None, numpy/tuples -> lists, recursively."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def unplain_matrix(rows) -> list[list[float]]:
    return [[math.nan if v is None else float(v) for v in row] for row in rows]


def rng_state(agent) -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "agent": agent.rng.bit_generator.state,
    }


def set_rng_state(agent, state: dict, torch_state: torch.Tensor) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)
    agent.rng.bit_generator.state = state["agent"]


class Checkpoints:
    """The checkpoint folder of one run (see the module docstring)."""

    def __init__(self, root):
        self.root = Path(root)

    def latest(self) -> Path | None:
        """The newest complete boundary folder, or None when the run has none yet."""
        path = self.root / LATEST
        if not path.is_file():
            return None
        try:
            name = json.loads(path.read_text(encoding="utf-8"))["boundary"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"{path} is unreadable: the checkpoint folder is damaged") from None
        if not isinstance(name, str) or not re.fullmatch(r"task-\d+", name):  # a boundary inside this folder
            raise UsageError(f"{path} names {name!r}, not a boundary of this run: the checkpoint folder is damaged")
        folder = self.root / name
        if not (folder / "state.json").is_file():
            raise UsageError(f"{path} names {name}, which is missing or incomplete")
        return folder

    def save(self, run, task: int) -> Path:
        agent = run.agent
        name = f"task-{task:03d}"
        tmp = self.root / f".{name}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_checkpoint(tmp / "model.pt", agent.model, agent.tokenizer, task=task, next_step=run.next_step)
        torch.save(agent.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(agent.strategy.state_dict(), tmp / "strategy.pt")
        if agent.bank is not None:
            agent.bank.save(tmp / "memory")
            agent.exemplars.save(tmp)
        write_json(tmp / "rng.json", rng_state(agent))
        torch.save(torch.get_rng_state(), tmp / "rng_torch.pt")
        write_json(tmp / "state.json", {"next_step": run.next_step, "task": task, "updates": agent.updates,
                                        "metrics": plain(run.metrics), "timing": run.timing})
        final = self.root / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_json(self.root / LATEST, {"boundary": name, "next_step": run.next_step, "task": task})
        return final

    def restore(self, run) -> bool:
        """Load the newest boundary into `run` (built as for a fresh start); False when there is none."""
        folder = self.latest()
        if folder is None:
            return False
        agent = run.agent
        try:
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            model, _, _ = load_checkpoint(folder / "model.pt")
            agent.model.load_state_dict(model.state_dict())
            agent.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
            agent.strategy.load_state_dict(torch.load(folder / "strategy.pt", weights_only=True))
            if agent.bank is not None:
                agent.bank = MemoryBank.load(folder / "memory", dim=agent.bank.dim)
                agent.exemplars = ExemplarTable.load(folder, agent.bank.n_slots)
            rng = json.loads((folder / "rng.json").read_text(encoding="utf-8"))
            set_rng_state(agent, rng, torch.load(folder / "rng_torch.pt", weights_only=True))
            agent.updates = int(state["updates"])
            metrics = state["metrics"]
            for key in ("em", "nll"):
                metrics["R"][key] = unplain_matrix(metrics["R"][key])
                metrics["baseline"][key] = [math.nan if v is None else float(v) for v in metrics["baseline"][key]]
            next_step = int(state["next_step"])
            if not 0 <= next_step <= len(run.stream) or next_step % run.stream.episodes_per_task:
                raise ValueError(f"next_step {next_step} is not a task boundary of this stream")
            timing = state.get("timing", run.timing)
        except UsageError:
            raise
        except Exception as exc:  # a damaged or foreign file: any of torch's, numpy's or json's errors
            why = " ".join(str(exc).split())[:200]
            raise UsageError(f"cannot resume from {folder}: {exc.__class__.__name__}: {why}") from None
        run.metrics, run.timing, run.next_step = metrics, timing, next_step
        return True
