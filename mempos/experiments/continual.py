"""`mempos continual`: stream tasks through a small GPT-2 agent and measure forgetting and interference.

Every variant (a strategy and the fingerprint axes it switches on) of every
seed starts from the same weights, sees the same stream (same examples, same
order) and is evaluated on the same held-out examples. One folder holds the
resolved config, metrics.json, the R heatmaps, forgetting and interference
plots, report.md, each run's module graph and its checkpoints.

Variants. ``--compare`` takes variants separated by ``,`` or ``;``. A variant
is ``STRATEGY[:key=value...][+AXIS...]``: a registered strategy, its options,
and the fingerprint axes it switches on (``+slot``, ``+module``, ``+pc``, or
``+fp`` for all three; none by default). ``--strategy S --fingerprints A`` is
the single variant ``S+A``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import platform
import random
import re
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..agent.checkpoints import Checkpoints, plain  # noqa: E402
from ..agent.fingerprints import (  # noqa: E402
    DEFAULT_LAYOUT, DEFAULT_STRIDE, apply_fingerprint_encoding, fingerprint_label,
    parse_fingerprints,
)
from ..agent.items import Encoder  # noqa: E402
from ..agent.loop import Agent, AgentConfig, ContinualRun  # noqa: E402
from ..agent.results import LABELS, summarise  # noqa: E402
from ..agent.strategies import STRATEGIES, make_strategy  # noqa: E402
from ..errors import UsageError  # noqa: E402
from ..io import atomic_path, write_json, write_text  # noqa: E402
from ..models import small_gpt2, tokenizer_from_json, tokenizer_to_json, train_tokenizer  # noqa: E402
from .options import check_seeds, number_list  # noqa: E402
from .workers import (  # noqa: E402
    default_jobs, results_as_completed, terminate_as_interrupt, torch_threads, worker_pool,
)
from .report import fmt, mean_spread, table  # noqa: E402

FORMAT = "mempos-continual/1"


# -- configuration --------------------------------------------------------------------------------


@dataclass
class ContinualConfig:
    preset: str = "tiny"
    out: str | None = None  # default runs/continual-<preset>
    tasks: str = "copy,reverse,kv"
    variants: list[str] = field(default_factory=lambda: ["naive", "replay", "replay+fp"])
    seed: int = 0
    seeds: list[int] | None = None
    # the stream
    episodes_per_task: int = 60
    batch_size: int = 8
    eval_size: int = 64
    # the agent
    context_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps_per_episode: int = 1
    exemplars_per_episode: int = 4  # examples of each episode written to memory
    replay_ratio: float = 1.0
    ewc_lambda: float = 100.0
    fingerprint_stride: float | None = DEFAULT_STRIDE  # None: per axis, 1 / the fastest frequency it owns
    layout: str = DEFAULT_LAYOUT
    index: str = "flat"
    route_threshold: float = 0.2  # tasks' episodes sit ~0.1 from their centroid, next tasks 0.15-0.5
    context_examples: int = 2
    eval_batch_size: int = 32
    interference_every: int = 10
    interference_examples: int = 8
    # the small GPT-2 trained from scratch, and its tokenizer
    vocab_size: int = 512
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    tokenizer_examples: int = 300  # training examples per task in the tokenizer's text
    tokenizer_corpus_chars: int = 100_000  # plus this much of the embedded corpus

    def replace(self, **changes) -> ContinualConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ContinualConfig] = {
    # Seconds per strategy, for tests: a 2-layer width-64 model, a digit task and a short language-modelling
    # domain, 20 episodes each. The domain shift makes forgetting large and clear even this early.
    "smoke": ContinualConfig(
        preset="smoke", tasks="copy,lm_embedded:window_chars=100", variants=["naive", "replay"],
        episodes_per_task=20, batch_size=8, eval_size=12, lr=1e-2, interference_every=5,
        interference_examples=4, tokenizer_examples=200, tokenizer_corpus_chars=50_000,
    ),
    # The embedded default: minutes per strategy on 2 CPU cores. Three digit-string tasks in one
    # format ("<verb> 4821 =") that differ only in what the answer does, so they interfere directly;
    # 2-4 digits and lr 1e-3 so that each is learnt (exact match well above 0) within 1000 steps
    # (at 3e-3, or with 4-8 digits, copying had not emerged after 1500).
    "tiny": ContinualConfig(
        preset="tiny", tasks=",".join(f"{t}:min_digits=2:max_digits=4" for t in ("copy", "reverse", "sort")),
        episodes_per_task=1000, batch_size=16, eval_size=64, lr=1e-3, n_layer=4, n_head=4, n_embd=128,
        interference_every=10,
    ),
}

PRESET_HELP = {
    "smoke": "seconds per strategy, for tests: 2-layer width-64 GPT-2, copy then 100-character "
             "language modelling, 20 episodes of 8 examples each; naive vs replay",
    "tiny": "the default, minutes per run on 2 CPU cores: 4-layer width-128 GPT-2, copy, reverse "
            "and sort of 2-4 digits, 1000 episodes of 16 examples each; naive vs replay vs replay+fp",
}


@dataclass(frozen=True)
class Variant:
    label: str  # canonical spec, e.g. "replay:ratio=0.5+fp"
    strategy: str
    options: dict
    fingerprints: tuple[str, ...]

    @property
    def slug(self) -> str:
        """The label as a file-name part."""
        return re.sub(r"[^A-Za-z0-9+._-]", "-", self.label)


def parse_variant(spec: str, cfg: ContinualConfig) -> Variant:
    """``STRATEGY[:key=value...][+AXIS...]`` (see the module docstring)."""
    head, *axes = [part.strip() for part in spec.strip().split("+")]
    name, *opts = head.split(":")
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy {name!r} in variant {spec!r}: choose from {', '.join(STRATEGIES)}")
    given = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise UsageError(f"bad strategy option {opt!r} in variant {spec!r}: write {name}:key=value")
        if key in given:
            raise UsageError(f"option {key!r} is given twice in variant {spec!r}")
        given[key] = value
    if any(not axis for axis in axes):
        raise UsageError(f"empty fingerprint axis in variant {spec!r}: write e.g. {name}+slot+pc or {name}+fp")
    fingerprints = parse_fingerprints(axes)
    options = dict(given)
    if name == "replay":
        options.setdefault("ratio", cfg.replay_ratio)
    if name == "ewc":
        options.setdefault("lambda", cfg.ewc_lambda)
    strategy = make_strategy(name, **options)  # validates the options
    shown = "".join(f":{k}={strategy.options[k]}" for k in given)
    return Variant(name + shown + fingerprint_label(fingerprints), name, dict(strategy.options), fingerprints)


def parse_variants(text: str, cfg: ContinualConfig) -> list[str]:
    specs = [s.strip() for s in re.split(r"[;,]", text)]
    if not text.strip() or any(not s for s in specs):
        raise UsageError(f"--compare needs variants separated by ',' or ';', e.g. \"naive;replay;replay+fp\"; "
                         f"got {text!r}")
    return specs


def resolve_variants(cfg: ContinualConfig) -> list[Variant]:
    variants = [parse_variant(spec, cfg) for spec in cfg.variants]
    labels = [v.label for v in variants]
    for label in labels:
        if labels.count(label) > 1:
            raise UsageError(f"variant {label!r} is listed twice")
    settings = [(v.strategy, sorted(v.options.items()), v.fingerprints) for v in variants]
    for i, setting in enumerate(settings):
        if setting in settings[:i]:
            first = variants[settings.index(setting)].label
            raise UsageError(f"variants {first!r} and {variants[i].label!r} are the same run (same options)")
    slugs = [v.slug for v in variants]
    if len(set(slugs)) != len(slugs):
        raise UsageError("two variants would share a file name; make their labels differ in letters or digits")
    return variants


# (lowest, highest) accepted value of each numeric setting: beyond these a run would not fit in memory
# or time on any machine, or the arithmetic overflows (float32 weights, int64 positions)
LIMITS = {
    "episodes_per_task": (1, 10**7), "batch_size": (1, 2**16), "eval_size": (1, 10**6),
    "exemplars_per_episode": (1, 2**16), "context_len": (1, 2**17), "steps_per_episode": (1, 10**4),
    "eval_batch_size": (1, 2**16), "interference_examples": (1, 2**16), "n_layer": (1, 256),
    "n_head": (1, 256), "n_embd": (1, 2**16), "interference_every": (0, 10**7), "context_examples": (0, 2**10),
    "lr": (0, 10.0), "grad_clip": (0, 1e6), "fingerprint_stride": (0, 1e6), "route_threshold": (0, 1e6),
    "replay_ratio": (0, 100.0), "ewc_lambda": (0, 1e12), "vocab_size": (2, 2**20),
    "tokenizer_examples": (1, 10**6), "tokenizer_corpus_chars": (0, 10**9),
}


def validate(cfg: ContinualConfig) -> tuple[list, list[Variant]]:
    """Check every setting and build the tasks and variants; nothing is written."""
    from ..agent.tasks import parse_tasks

    for name, (low, high) in LIMITS.items():
        value = getattr(cfg, name)
        if value is None and name == "fingerprint_stride":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise UsageError(f"--{name.replace('_', '-')} must be between {low:g} and {high:g}, got {value!r}")
    if cfg.lr == 0 or cfg.grad_clip == 0 or cfg.fingerprint_stride == 0:
        raise UsageError("--lr, --grad-clip and --fingerprint-stride must be positive")
    check_seeds(cfg.seed, cfg.seeds)
    if cfg.out is not None and not str(cfg.out).strip():
        raise UsageError("--out must not be empty")
    if cfg.layout not in ("sections", "interleaved"):
        raise UsageError(f"--layout must be sections or interleaved, got {cfg.layout!r}")
    if cfg.index not in ("flat", "ivf", "hnsw"):
        raise UsageError(f"--index must be flat, ivf or hnsw, got {cfg.index!r}")
    if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
        raise UsageError(f"n_embd ({cfg.n_embd}) must split into {cfg.n_head} heads of even width")
    if not cfg.variants:
        raise UsageError("no variants to run: give --strategy or --compare")
    variants = resolve_variants(cfg)
    tasks = parse_tasks(cfg.tasks)
    return tasks, variants


# -- building the model and data ------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def corpus_slice(chars: int) -> str:
    from ..data import load_text

    return load_text(None).train[:chars]


def tokenizer_text(tasks, cfg: ContinualConfig) -> str:
    """The tasks' training text (a fixed seed, the same for every run seed) and a slice of the
    embedded corpus: a small byte-level BPE trained on it keeps digits as single tokens."""
    lines = [ex.text for task in tasks for ex in task.examples("train", cfg.tokenizer_examples, 0)]
    return "\n".join(lines) + "\n" + corpus_slice(cfg.tokenizer_corpus_chars)


def make_stream(tasks, cfg: ContinualConfig, seed: int):
    from ..agent.stream import TaskStream

    return TaskStream(tasks, cfg.episodes_per_task, cfg.batch_size, seed, cfg.eval_size)


def check_lengths(tasks, cfg: ContinualConfig, seeds, tokenizer) -> None:
    """Refuse, before anything is written, a stream with an example longer than the context."""
    encoder = Encoder(tokenizer)
    for seed in seeds:
        stream = make_stream(tasks, cfg, seed)
        sets = stream.baseline_eval_sets()
        for j, task in enumerate(tasks):
            lm = task.kind == "lm"
            examples = list(sets[j]) + [ex for ep in stream for ex in ep.examples if ep.task_id == j]
            longest = max(len(encoder.item(ex, lm, j)) for ex in examples)
            if longest > cfg.context_len:
                raise UsageError(
                    f"task {task.name!r} has an example of {longest} tokens (with its eos), longer than "
                    f"--context-len {cfg.context_len}: raise --context-len or shorten the task"
                )


def base_model(cfg: ContinualConfig, tokenizer, seed: int):
    model = small_gpt2(len(tokenizer), n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                       n_positions=max(1024, cfg.context_len), seed=seed,
                       eos_token_id=tokenizer.eos_token_id)
    return apply_fingerprint_encoding(model, cfg.layout)


def agent_config(cfg: ContinualConfig, variant: Variant, seed: int) -> AgentConfig:
    return AgentConfig(
        context_len=cfg.context_len, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        steps_per_episode=cfg.steps_per_episode, fingerprints=variant.fingerprints,
        fingerprint_stride=cfg.fingerprint_stride, memory=True, index=cfg.index,
        exemplars_per_episode=cfg.exemplars_per_episode,
        route_threshold=cfg.route_threshold, context_examples=cfg.context_examples,
        eval_batch_size=cfg.eval_batch_size, seed=seed,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the run --------------------------------------------------------------------------------------


def output_folder(cfg: ContinualConfig, overwrite: bool) -> Path:
    out = Path(cfg.out or f"runs/continual-{cfg.preset}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} already holds files; choose another folder, pass --overwrite, "
                         "or --resume it")
    return out


def read_run_folder(folder) -> tuple[ContinualConfig, dict]:
    """The config of an existing run folder (for --resume); UsageError when it is not one."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise UsageError(f"--resume {folder}: no such folder")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"--resume {folder}: not a mempos continual run (no readable config.json)") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise UsageError(f"--resume {folder}: config.json is not from `mempos continual` ({FORMAT})")
    names = {f.name for f in dataclasses.fields(ContinualConfig)}
    try:
        cfg = ContinualConfig(**{k: v for k, v in saved["config"].items() if k in names})
        if not isinstance(cfg.tasks, str) or not isinstance(cfg.variants, list) or not all(
                isinstance(v, str) for v in cfg.variants):
            raise TypeError("tasks or variants of the wrong type")
        if cfg.seeds is not None and not (isinstance(cfg.seeds, list) and all(
                isinstance(s, int) and not isinstance(s, bool) for s in cfg.seeds)):
            raise TypeError("seeds is not a list of whole numbers")
        validate(cfg)
    except UsageError as exc:
        raise UsageError(f"--resume {folder}: config.json holds a setting no run accepts: {exc}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise UsageError(f"--resume {folder}: config.json is damaged ({exc.__class__.__name__}: {exc})") from None
    return cfg.replace(out=str(folder)), saved


def run_continual(cfg: ContinualConfig, command: str = "", overwrite: bool = False, resume: bool = False,
                  stop_after_task: int | None = None, progress: bool | str | None = None, jobs: int = 1) -> dict | None:
    """Run every variant for every seed; write the folder; return metrics.json's content.

    `resume`: continue the run folder `cfg.out` (finished runs are read back,
    the interrupted ones continue from their last task boundary). `stop_after_task`
    stops the first run after that task's checkpoint, as if killed, and returns None.
    `jobs` > 1 runs that many (variant, seed) runs at a time in worker processes of one
    thread each (progress: a line per task boundary); each run is seeded on its own, so the
    metrics equal those of `jobs` = 1 (where every run also computes on one thread).
    """
    tasks, variants = validate(cfg)
    seeds = cfg.seeds or [cfg.seed]
    cfg = cfg.replace(seed=seeds[0], seeds=seeds)
    out = Path(cfg.out) if resume else output_folder(cfg, overwrite)
    if resume:
        tokenizer = read_tokenizer(out)
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        command = saved.get("command", command)
    else:
        tokenizer = train_tokenizer(tokenizer_text(tasks, cfg), cfg.vocab_size)
    check_lengths(tasks, cfg, seeds, tokenizer)
    # every user error has surfaced; from here on we write
    resolved = dataclasses.asdict(cfg) | {"out": str(out)}
    if not resume:
        if overwrite:
            clear_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"format": FORMAT, "command": command, "config": resolved})
        write_text(out / "tokenizer.json", tokenizer_to_json(tokenizer))
    results: dict[str, dict[int, dict]] = {v.label: {} for v in variants}
    timing: dict[str, dict] = {}
    pending = []
    for seed in seeds:
        for variant in variants:
            name = f"{variant.slug}-seed{seed}"
            record = out / "runs" / f"{name}.json"
            if record.is_file():  # finished before a resume
                try:
                    saved = json.loads(record.read_text(encoding="utf-8"))
                    results[variant.label][seed], timing[name] = dict(saved["metrics"]), dict(saved["timing"])
                    if not {"R", "baseline", "finished"} <= set(saved["metrics"]):
                        raise KeyError("R")
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise UsageError(f"--resume {out}: {record} is damaged ({exc.__class__.__name__}); delete it "
                                     "to run that variant and seed again") from None
            else:
                pending.append((variant, seed))
    jobs = max(1, min(jobs, len(pending)))
    if jobs > 1 and stop_after_task is None:
        done = run_in_workers(cfg, tokenizer, pending, out, resume, jobs)
    else:
        done = []
        for variant, seed in pending:
            with torch_threads(1):  # as in a worker: the metrics must not depend on --jobs
                outcome = run_one(cfg, tasks, tokenizer, variant, seed, out, resume, progress, stop_after_task)
            if outcome is None:  # stopped on purpose, as a killed run would be
                return None
            done.append((variant, seed, *outcome))
    for variant, seed, run_metrics, run_timing in done:
        results[variant.label][seed], timing[f"{variant.slug}-seed{seed}"] = run_metrics, run_timing
    metrics = aggregate(cfg.replace(out=str(out)), command, tasks, variants, results, timing)
    write_json(out / "metrics.json", metrics)
    write_plots(metrics, out)
    write_report(metrics, out / "report.md")
    print(f"wrote {out}: report.md, metrics.json, {len(variants)} R heatmaps, forgetting.png, interference.png")
    return metrics


def run_one(cfg, tasks, tokenizer, variant: Variant, seed: int, out: Path, resume: bool,
            progress: bool | str | None = None, stop_after_task: int | None = None) -> tuple[dict, dict] | None:
    """One variant and seed in the run folder `out`: (metrics, timing), also saved as runs/<name>.json
    with the module graph in modules/; None when stopped on purpose by `stop_after_task`."""
    name = f"{variant.slug}-seed{seed}"
    run = build_run(cfg, tasks, tokenizer, variant, seed, out / "checkpoints" / name, progress)
    if resume and run.checkpoints.restore(run):
        print(f"resuming {name} at episode {run.next_step} of {len(run.stream)}", flush=True)
    metrics = run.run(stop_after_task=stop_after_task)
    if not metrics["finished"]:
        return None
    run.agent.bank.export_graph(out / "modules" / f"{name}.json")
    timing = timing_summary(run)
    write_json(out / "runs" / f"{name}.json", {"metrics": plain(metrics), "timing": timing})
    return plain(metrics), timing


# imported once by the fork server, so every worker starts with them loaded
WORKER_PRELOAD = ["torch", "transformers", "faiss", "networkx", "mempos.encodings", "mempos.models",
                  "mempos.memory", "mempos.agent.loop", __name__]


def run_in_workers(cfg, tokenizer, pending, out: Path, resume: bool, jobs: int) -> list[tuple]:
    """`pending` (variant, seed) runs in `jobs` worker processes; [(variant, seed, metrics, timing)]."""
    print(f"running {len(pending)} runs in {jobs} worker processes (one thread each)", flush=True)
    tokenizer_json = tokenizer_to_json(tokenizer)
    calls = [(cfg, tokenizer_json, variant, seed, out, resume) for variant, seed in pending]
    with terminate_as_interrupt():
        done = dict(results_as_completed(worker_pool(jobs, WORKER_PRELOAD), _worker, calls))
    return [(*pending[index], *done[index]) for index in range(len(pending))]


def _worker(cfg, tokenizer_json: str, variant: Variant, seed: int, out: Path, resume: bool) -> tuple[dict, dict]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tasks, _ = validate(cfg)
    with torch_threads(1):
        return run_one(cfg, tasks, tokenizer_from_json(tokenizer_json), variant, seed, out, resume, progress="lines")


def build_run(cfg, tasks, tokenizer, variant: Variant, seed: int, checkpoint_dir=None,
              progress: bool | None = None) -> ContinualRun:
    """One variant and seed, ready to `run()`: fresh weights of `seed`, its stream, an agent."""
    seed_everything(seed)
    strategy = make_strategy(variant.strategy, **variant.options)
    agent = Agent(base_model(cfg, tokenizer, seed), tokenizer, strategy, agent_config(cfg, variant, seed),
                  [t.kind for t in tasks])
    return ContinualRun(agent, make_stream(tasks, cfg, seed), interference_every=cfg.interference_every,
                        interference_examples=cfg.interference_examples,
                        checkpoints=None if checkpoint_dir is None else Checkpoints(checkpoint_dir),
                        label=f"{variant.label} seed {seed}", progress=progress)


def read_tokenizer(out: Path):
    try:
        return tokenizer_from_json((out / "tokenizer.json").read_text(encoding="utf-8"))
    except OSError:
        raise UsageError(f"--resume {out}: tokenizer.json is missing") from None


def clear_outputs(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote here (only our own names)."""
    for sub in ("checkpoints", "runs", "modules"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for pattern in ("R_*.png", "forgetting.png", "interference.png", "metrics.json", "report.md",
                    "config.json", "tokenizer.json"):
        for path in out.glob(pattern):
            path.unlink()


def timing_summary(run: ContinualRun) -> dict:
    seconds = run.timing["episode_seconds"]
    return {"episodes_timed": len(seconds), "median_episode_seconds": float(np.median(seconds)) if seconds else None,
            "train_seconds": float(np.sum(seconds)), "eval_seconds": run.timing["eval_seconds"]}


# -- aggregation ----------------------------------------------------------------------------------


def joint_reference(variant: Variant, variants: list[Variant], runs: dict, seed: int) -> dict | None:
    """The joint run of the same seed (same fingerprints if there is one) as the intransigence reference."""
    joints = [v for v in variants if v.strategy == "joint"]
    if not joints or variant.strategy == "joint":
        return None
    same = [v for v in joints if v.fingerprints == variant.fingerprints]
    reference = (same or joints)[0]
    metrics = runs[reference.label].get(seed)
    if metrics is None:
        return None
    return {score: metrics["R"][score][-1] for score in ("em", "nll")} | {"variant": reference.label}


def spread(values) -> dict:
    values = [math.nan if v is None else float(v) for v in values]
    defined = [v for v in values if not math.isnan(v)]
    mean, sd = mean_spread(defined) if defined else (math.nan, math.nan)
    return {"mean": mean, "sd": sd, "values": values}


def aggregate(cfg, command, tasks, variants, results, timing) -> dict:
    seeds = cfg.seeds
    out_variants = {}
    for variant in variants:
        runs = {}
        for seed in seeds:
            run = results[variant.label][seed]
            joint = joint_reference(variant, variants, results, seed)
            summary = summarise(run, None if joint is None else {k: joint[k] for k in ("em", "nll")})
            if joint is not None:
                summary["intransigence_reference"] = joint["variant"]
            runs[str(seed)] = run | {"summary": summary}
        summary = {}
        for score in ("em", "nll"):
            keys = sorted({k for r in runs.values() for k in r["summary"].get(score, {}) if k != "per_task"})
            if keys:
                summary[score] = {k: spread([r["summary"].get(score, {}).get(k) for r in runs.values()])
                                  for k in keys}
        summary["interference"] = {k: spread([r["summary"]["interference"][k] for r in runs.values()])
                                   for k in ("mean_cosine", "negative_share", "mean_loss_change")}
        out_variants[variant.label] = {
            "strategy": variant.strategy, "options": variant.options, "fingerprints": list(variant.fingerprints),
            "summary": summary, "runs": runs,
        }
    return plain({
        "command": command,
        "config": dataclasses.asdict(cfg),
        "tasks": [{"name": t.name, "kind": t.kind} for t in tasks],
        "seeds": seeds,
        "variants": out_variants,
        "definitions": LABELS | {
            "R": "R[i][j]: score on task j after training task i (rows: boundaries; NaN: not evaluated)",
            "em": "exact match of the greedy answer (qa tasks only)",
            "nll": "mean negative log-likelihood per target token, nats (lower is better; metrics use -NLL "
                   "so that forgetting > 0 means the NLL went up)",
            "interference": "cosine between the update's gradient and the gradient on held-out examples of each "
                            "earlier task (negative: the update raises that task's loss to first order), and the "
                            "change of that held-out loss across the update",
        },
        "timing": timing,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads_per_run": 1},
    })


# -- plots ----------------------------------------------------------------------------------------


def colour(index: int):
    return plt.get_cmap("tab10")(index % 10)


def quiet_nanmean(values, axis=None):
    """nanmean without the empty-slice warning (an all-NaN slice stays NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def mean_matrix(runs: dict, score: str) -> np.ndarray:
    stack = np.array([np.asarray(r["R"][score], dtype=np.float64) for r in runs.values()])
    return quiet_nanmean(stack, axis=0)


def save_figure(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write_plots(metrics: dict, out: Path) -> None:
    names = [t["name"] for t in metrics["tasks"]]
    for label, variant in metrics["variants"].items():
        plot_R(label, variant["runs"], names, out / f"R_{re.sub(r'[^A-Za-z0-9+._-]', '-', label)}.png")
    plot_forgetting(metrics, out / "forgetting.png")
    plot_interference(metrics, out / "interference.png")


def plot_R(label: str, runs: dict, names: list[str], path) -> None:
    scores = [s for s in ("em", "nll") if not np.isnan(mean_matrix(runs, s)).all()]
    fig, axes = plt.subplots(1, len(scores), figsize=(4.6 * len(scores) + 0.8, 0.6 * len(names) + 2.6), squeeze=False)
    for ax, score in zip(axes[0], scores):
        R = mean_matrix(runs, score)
        cmap = "viridis" if score == "em" else "viridis_r"
        image = ax.imshow(np.ma.masked_invalid(R), cmap=cmap, vmin=0 if score == "em" else None,
                          vmax=1 if score == "em" else None)
        for i in range(len(names)):
            for j in range(len(names)):
                if not np.isnan(R[i, j]):
                    r, g, b, _ = image.cmap(image.norm(R[i, j]))
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=8, color=ink)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), [f"after {n}" for n in names], fontsize=8)
        ax.set_xlabel("evaluated task j")
        ax.set_title("exact match (higher is better)" if score == "em" else "NLL, nats/token (lower is better)",
                     fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"R[i][j] for {label} (mean over {len(runs)} seed{'s' * (len(runs) > 1)}; blank: not evaluated)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_forgetting(metrics: dict, path) -> None:
    """Per-task score at each stage (untrained, then after each task), one panel per variant and score."""
    names = [t["name"] for t in metrics["tasks"]]
    variants = {k: v for k, v in metrics["variants"].items() if v["strategy"] != "joint"} or metrics["variants"]
    scores = [s for s in ("em", "nll") if any(not np.isnan(mean_matrix(v["runs"], s)).all() for v in variants.values())]
    fig, axes = plt.subplots(len(scores), len(variants), figsize=(4.2 * len(variants), 3.2 * len(scores)),
                             squeeze=False, sharey="row")
    stages = ["untrained"] + [f"after {n}" for n in names]
    for col, (label, variant) in enumerate(variants.items()):
        for row, score in enumerate(scores):
            ax = axes[row][col]
            for j, name in enumerate(names):
                curves = np.array([[np.nan if r["baseline"][score][j] is None else r["baseline"][score][j]]
                                   + [np.nan if v is None else v for v in np.asarray(r["R"][score], dtype=object)[:, j]]
                                   for r in variant["runs"].values()], dtype=np.float64)
                if np.isnan(curves).all():
                    continue
                mean = quiet_nanmean(curves, axis=0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    sd = np.nanstd(curves, axis=0) if len(curves) > 1 else None
                x = np.arange(len(stages))
                ok = ~np.isnan(mean)
                ax.errorbar(x[ok], mean[ok], yerr=None if sd is None else sd[ok], marker="o", ms=3, lw=1.3,
                            capsize=2, color=colour(j), label=name)
                ax.axvspan(j, j + 1, color=colour(j), alpha=0.07, lw=0)
            ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right", fontsize=7)
            ax.set_title(f"{label}: {'exact match' if score == 'em' else 'NLL (nats/token)'}", fontsize=9)
            ax.grid(alpha=0.3)
    legend = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(len(legend), 6), frameon=False,
               fontsize=8)
    fig.suptitle("Score on each task over training (shaded: while that task is trained; mean ± sd over seeds)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path)


def plot_interference(metrics: dict, path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = False
    for index, (label, variant) in enumerate(metrics["variants"].items()):
        by_step: dict[int, list[tuple[float, float]]] = {}
        for run in variant["runs"].values():
            for entry in run["interference"]:
                cos = entry["mean_cosine"]
                by_step.setdefault(entry["step"], []).append(
                    (math.nan if cos is None else cos, entry["mean_loss_change"]))
        if not by_step:
            continue
        drawn = True
        steps = sorted(by_step)
        for ax, k in zip(axes, (0, 1)):
            ax.plot(steps, [quiet_nanmean([v[k] for v in by_step[s]]) for s in steps], marker="o", ms=2.5,
                    lw=1.2, color=colour(index), label=label)
    E = metrics["config"]["episodes_per_task"]
    for ax, title in zip(axes, ("mean cosine(update gradient, earlier task's gradient)",
                                "change of earlier tasks' held-out loss per update (nats)")):
        ax.axhline(0, color="grey", lw=0.8)
        for boundary in range(E, E * len(metrics["tasks"]), E):
            ax.axvline(boundary, color="black", ls=":", lw=0.8)
        ax.set_xlabel("episode (dotted: task boundaries)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no interference measured (--interference-every 0, or one task)",
                    transform=ax.transAxes, ha="center", fontsize=8)
    if drawn:
        axes[0].legend(fontsize=8)
    fig.suptitle("Gradient interference with earlier tasks (mean over seeds)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# -- report ---------------------------------------------------------------------------------------


def cell(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    mean, sd = stats["mean"], stats["sd"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    n = sum(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in stats["values"])
    return f"{fmt(mean)} ± {fmt(sd)}" if n > 1 else fmt(mean)


def comparison_rows(metrics: dict, score: str, keys) -> list[list]:
    rows = []
    for label, variant in metrics["variants"].items():
        stats = variant["summary"].get(score, {})
        rows.append([label] + [cell(stats.get(k)) for k in keys])
    return rows


def matrix_table(R, names) -> str:
    return table(["after \\ on"] + names, [[f"after {names[i]}"] + [
        "" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row] for i, row in enumerate(R)])


LABEL_WORDS = {"acc": "ACC", "forgetting_max": "forgetting (max)"}


def sentences(metrics: dict) -> list[str]:
    """Verdicts computed from the numbers: forgetting and interference against naive."""
    out = []
    variants = metrics["variants"]
    naive = next((label for label, v in variants.items() if v["strategy"] == "naive"), None)
    for score, unit in (("nll", "nats/token"), ("em", "exact-match points")):
        if naive is None or score not in variants[naive]["summary"]:
            continue
        base = variants[naive]["summary"][score]["forgetting_max"]["mean"]
        if base is None:
            continue
        for label, variant in variants.items():
            stats = variant["summary"].get(score, {}).get("forgetting_max")
            if label == naive or not stats or stats["mean"] is None:
                continue
            diff = stats["mean"] - base
            if diff == 0:
                out.append(f"{label} and {naive} forget the same on {score.upper()} "
                           f"(max-based forgetting {fmt(base)}).")
                continue
            verb = "less" if diff < 0 else "more"
            out.append(f"{label} forgets {fmt(abs(diff))} {unit} {verb} than {naive} on {score.upper()} "
                       f"(max-based forgetting {fmt(stats['mean'])} vs {fmt(base)}).")
    for label, variant in variants.items():  # fingerprint ablations: X+axes against X
        if not variant["fingerprints"]:
            continue
        base = next((b for b, v in variants.items() if not v["fingerprints"] and v["strategy"] == variant["strategy"]
                     and v["options"] == variant["options"]), None)
        if base is None:
            continue
        for score, key, better in (("nll", "acc", "lower"), ("nll", "forgetting_max", "lower"),
                                   ("em", "acc", "higher")):
            a = variant["summary"].get(score, {}).get(key)
            b = variants[base]["summary"].get(score, {}).get(key)
            if not a or not b or a["mean"] is None or b["mean"] is None:
                continue
            diff = a["mean"] - b["mean"]
            noise = max(a["sd"] or 0.0, b["sd"] or 0.0)
            size = ("within the spread over seeds" if abs(diff) <= noise
                    else f"{fmt(abs(diff) / noise)} times the larger sd over seeds" if noise else "one seed only")
            out.append(f"{label} vs {base}: {score.upper()} {LABEL_WORDS[key]} {fmt(a['mean'])} vs {fmt(b['mean'])} "
                       f"(difference {fmt(diff)}, {size}; {better} is better).")
    for label, variant in variants.items():
        share = variant["summary"]["interference"]["negative_share"]["mean"]
        if share is not None:
            out.append(f"{label}: {fmt(100 * share)}% of update gradients point against an earlier task's "
                       f"gradient (mean cosine {fmt(variant['summary']['interference']['mean_cosine']['mean'])}).")
    return out


def memory_line(memory: dict, names: list[str]) -> str:
    """'Memory (first seed): 12000 slots in 14 modules; copy 8 modules, reverse 6 (3 also hold an earlier task's
    episodes), ...' from a run's memory summary."""
    seen: set[int] = set()
    parts = []
    for task, name in enumerate(names):
        modules = set(memory["modules_per_task"].get(str(task), []))
        if modules:
            shared = len(modules & seen)
            parts.append(f"{name} {len(modules)} module{'s' * (len(modules) != 1)}"
                         + (f" ({shared} also hold{'s' * (shared == 1)} an earlier task's episodes)" if shared else ""))
        seen |= modules
    return (f"Memory (first seed): {memory['slots']} slots in {memory['modules']} modules; "
            + ", ".join(parts) + ".")


def write_report(metrics: dict, path) -> None:
    names = [t["name"] for t in metrics["tasks"]]
    config, seeds = metrics["config"], metrics["seeds"]
    keys = ["acc", "bwt", "fwt", "forgetting_max", "forgetting_first_last", "intransigence"]
    header = ["variant", "ACC", "BWT", "FWT", "forgetting (max)", "forgetting (first-last)", "intransigence"]
    qa = [t["name"] for t in metrics["tasks"] if t["kind"] != "lm"]
    blocks = [
        "# Continual learning: forgetting and interference",
        f"Tasks in order: {', '.join(f'`{n}`' for n in names)}; {config['episodes_per_task']} episodes of "
        f"{config['batch_size']} examples per task; seeds {', '.join(map(str, seeds))} (cells: mean ± sample sd "
        "over seeds). Made by:",
        f"```\n{metrics['command']}\n```",
        "## Comparison",
        "### Exact match (qa tasks: " + (", ".join(qa) or "none") + ")",
        table(header, comparison_rows(metrics, "em", keys)) if qa else "No qa task in this run.",
        "### NLL (nats per target token; BWT, FWT, forgetting and intransigence on -NLL, so > 0 forgetting means "
        "the NLL rose)",
        table(header, comparison_rows(metrics, "nll", keys)),
        "### Interference",
        table(["variant", "mean cosine", "share negative", "held-out loss change per update (nats)"],
              [[label] + [cell(v["summary"]["interference"][k]) for k in
                          ("mean_cosine", "negative_share", "mean_loss_change")]
               for label, v in metrics["variants"].items()]),
        "### Time",
        table(["run", "median s / episode", "training s", "evaluation s"],
              [[name, t["median_episode_seconds"], t["train_seconds"], t["eval_seconds"]]
               for name, t in metrics["timing"].items()]),
        "## Interpretation",
        "Computed from the numbers above.",
        "\n".join(f"- {s}" for s in sentences(metrics)) or "- (nothing to compare)",
        "## Score over time",
        "![per-task score after each task](forgetting.png)",
        "![interference](interference.png)",
        "## Score matrices (mean over seeds)",
    ]
    for label, variant in metrics["variants"].items():
        slug = re.sub(r"[^A-Za-z0-9+._-]", "-", label)
        blocks.append(f"### {label}")
        blocks.append(f"![R for {label}](R_{slug}.png)")
        for score in ("em", "nll"):
            R = mean_matrix(variant["runs"], score)
            if not np.isnan(R).all():
                blocks.append(("Exact match" if score == "em" else "NLL") + ":\n\n" + matrix_table(R.tolist(), names))
        memory = [r.get("memory", {}) for r in variant["runs"].values()]
        if memory and memory[0]:
            blocks.append(memory_line(memory[0], names))
    blocks += [
        "## Definitions",
        "\n".join(f"- **{k}**: {v}" for k, v in metrics["definitions"].items()),
        "## Configuration",
        table(["setting", "value"], [[k, ", ".join(map(str, v)) if isinstance(v, list) else v]
                                     for k, v in config.items()]),
    ]
    write_text(path, "\n\n".join(blocks) + "\n")


# -- command line ---------------------------------------------------------------------------------

OPTIONS = {  # option -> (type, help)
    "episodes_per_task": (int, "episodes per task"),
    "batch_size": (int, "examples per episode"),
    "eval_size": (int, "held-out examples per task"),
    "context_len": (int, "tokens per packed training context (default 128)"),
    "lr": (float, "AdamW learning rate"),
    "steps_per_episode": (int, "optimizer steps per episode"),
    "exemplars_per_episode": (int, "examples of each episode written to memory (default 4)"),
    "replay_ratio": (float, "replayed exemplars per current example (replay; default 1.0)"),
    "ewc_lambda": (float, "EWC penalty weight lambda (ewc; default 100)"),
    "context_examples": (int, "exemplars retrieved from memory in front of each evaluated example (default 2)"),
    "interference_every": (int, "measure gradient interference every N episodes (0: never)"),
    "route_threshold": (float, "cosine distance beyond which an episode opens a new memory module (default 0.2)"),
    "fingerprint_stride": (float, "multiplier of slot/module/pc values before rotation (default: per axis, "
                                  "1 / the fastest frequency the axis owns)"),
}


def add_parser(sub) -> None:
    from ..agent.tasks import TASKS

    p = sub.add_parser(
        "continual",
        help="stream tasks through a small GPT-2 agent with memory; measure forgetting and interference",
        description=(
            "Train a small GPT-2 (4-axis rotary positions: local, memory slot, module, program step) on tasks "
            "one after another as a continual-learning agent with a faiss memory, and compare strategies and "
            "fingerprint ablations on identical streams and seeds. Writes one folder: config.json, "
            "metrics.json (R matrices for exact match and NLL, ACC, BWT, FWT, forgetting, intransigence, "
            "interference), R_<variant>.png, forgetting.png, interference.png, report.md, modules/ (module "
            "graphs) and checkpoints/ (every task boundary; --resume continues a killed run)."
        ),
        epilog=(
            "variants (--compare):\n"
            "  STRATEGY[:key=value...][+AXIS...], separated by ',' or ';', e.g.\n"
            "    --compare naive,replay,replay+fp\n"
            "    --compare \"naive;replay:ratio=0.5;replay:ratio=0.5+slot+pc;ewc:lambda=1000;joint\"\n"
            "  +slot, +module, +pc switch fingerprint axes on (+fp: all three); without them the\n"
            "  axes carry 0. joint in the same compare is the reference for intransigence.\n\n"
            "strategies:\n" + "\n".join(f"  {name:<7} {cls.summary} (options: "
                                         f"{', '.join(f'{k}={v}' for k, v in cls.defaults.items()) or 'none'})"
                                         for name, cls in STRATEGIES.items())
            + "\n\ntasks (--tasks, comma-separated, in order):\n  " + ", ".join(sorted(TASKS))
            + ", jsonl:PATH (one {\"prompt\": ..., \"answer\": ...} object a line);\n"
              "  options as name:key=value, e.g. lm_embedded:window_chars=100\n\n"
            "presets:\n" + "\n".join(f"  {name:<6} {text}" for name, text in PRESET_HELP.items())
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                   help="starting configuration: smoke or tiny (default); options below override it")
    p.add_argument("--tasks", metavar="A,B", help="tasks in training order (default: the preset's)")
    p.add_argument("--strategy", metavar="NAME", help="run one strategy: " + ", ".join(STRATEGIES))
    p.add_argument("--fingerprints", metavar="AXES",
                   help="with --strategy: fingerprint axes to switch on, slot,module,pc (or fp for all), "
                        "or none (default)")
    p.add_argument("--compare", metavar="VARIANTS",
                   help="several variants on identical streams and seeds, e.g. \"naive;replay;replay+fp\" "
                        "(default: the preset's)")
    p.add_argument("--seed", type=int, metavar="N", help="seed of weights, stream and replay (default 0)")
    p.add_argument("--seeds", metavar="A,B", help="run every variant once per seed (e.g. 0,1,2); "
                   "tables show mean ± sd")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/continual-<preset>); must be empty or new")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    p.add_argument("--resume", metavar="DIR", help="continue the killed run in DIR (takes no other option but --jobs)")
    for name, (kind, text) in OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, metavar="N" if kind is int else "X", help=text)
    p.add_argument("--index", choices=["flat", "ivf", "hnsw"], help="memory index (default flat: exact)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="runs (variant x seed) at a time, in worker processes of one thread each (default: "
                        "the number of cores; 1: in this process, with progress bars); the metrics do not "
                        "depend on it")
    p.set_defaults(run=run_command)


def run_command(args) -> None:
    from transformers.utils import logging as hf_logging


    hf_logging.set_verbosity_error()
    command = shlex.join(["mempos", *args.argv])
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    jobs = args.jobs or default_jobs()
    if args.resume is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("preset", "tasks", "strategy", "fingerprints", "compare",
                                                       "seed", "seeds", "out", "index", *OPTIONS)
                 if getattr(args, k) is not None]
        if given or args.overwrite:
            raise UsageError(f"--resume takes no other option (the run's config.json decides); got "
                             f"{', '.join(given or ['--overwrite'])}")
        cfg, _ = read_run_folder(args.resume)
        with resume_hint(cfg.out):
            run_continual(cfg, command, resume=True, jobs=jobs)
        return
    cfg = PRESETS[args.preset or "tiny"]
    changes = {k: getattr(args, k) for k in ("tasks", "seed", "out", "index", *OPTIONS) if getattr(args, k) is not None}
    if args.seeds is not None:
        changes["seeds"] = number_list(args.seeds, "--seeds")
    if args.strategy is not None and args.compare is not None:
        raise UsageError("give --strategy (one variant) or --compare (several), not both")
    if args.fingerprints is not None and args.strategy is None:
        raise UsageError("--fingerprints goes with --strategy; in --compare write the axes into each variant, "
                         "e.g. replay+slot+pc")
    if args.strategy is not None:
        axes = parse_fingerprints(args.fingerprints)
        changes["variants"] = [args.strategy + fingerprint_label(axes)]
    elif args.compare is not None:
        changes["variants"] = parse_variants(args.compare, cfg)
    cfg = cfg.replace(**changes)
    with resume_hint(cfg.out or f"runs/continual-{cfg.preset}"):
        run_continual(cfg, command, overwrite=args.overwrite, jobs=jobs)


@contextlib.contextmanager
def resume_hint(out):
    """On Ctrl-C, say how to continue (the checkpoints of every finished task boundary are kept)."""
    try:
        yield
    except KeyboardInterrupt:
        if (Path(out) / "config.json").is_file():
            print(f"continue with: mempos continual --resume {shlex.quote(str(out))}", file=sys.stderr)
        raise

