"""The needle attention-entropy experiment.

Every variant starts from the same weights, trains on the same contexts in
the same order, and is evaluated on the same held-out text at `eval_len`
(4x the training length by default). One folder per run holds the resolved
config, metrics.json, curves.npz, the entropy plot, report.md, the tokenizer
and one checkpoint per variant.
"""

from __future__ import annotations

import copy
import math
import os
import importlib.metadata
import importlib.util
import json
import dataclasses
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate.utils import set_seed

from ..checkpoint import save_checkpoint
from ..data import chunk_tokens, inject_needles, load_text
from ..encodings import ENCODINGS, apply_encoding
from ..encodings.registry import length_options
from ..encodings.path import DRIFT_FALSIFIER, path_encodings, transform_drift
from ..errors import UsageError
from ..io import atomic_path, write_json
from ..models import encode, load_pretrained, small_gpt2, train_tokenizer
from .options import check_seeds
from .evaluate import evaluate_variant, length_sweep
from .report import plot_entropy, plot_sweep, write_report
from .train import make_accelerator, train_lm


@dataclass
class NeedleData:
    """Token data every variant shares."""

    train_chunks: torch.Tensor  # (N, train_len), needles injected
    train_needles: list
    eval_ids: torch.Tensor  # held-out text, whole eval_len sequences
    needle_chunks: torch.Tensor  # (M, eval_len) held-out sequences, one needle each
    needle_records: list


MAX_TOKENS = 2**17  # longest sequence (and largest batch) accepted: beyond it no CPU or GPU holds the attention


def validate(cfg) -> None:
    """Refuse bad settings before anything is read or written."""
    unknown = [name for name in cfg.encodings if name not in ENCODINGS]
    if unknown:
        raise UsageError(f"unknown encoding {unknown[0]!r}; choose from {', '.join(ENCODINGS)}")
    if not cfg.encodings:
        raise UsageError("--encodings is empty; name at least one of " + ", ".join(ENCODINGS))
    if len(set(cfg.encodings)) != len(cfg.encodings):
        raise UsageError("--encodings names an encoding twice")
    for name in ("train_len", "eval_len", "batch_size", "eval_batch_size", "needle_every"):
        if not 1 <= getattr(cfg, name) <= MAX_TOKENS:
            raise UsageError(f"--{name.replace('_', '-')} must be between 1 and {MAX_TOKENS}, got {getattr(cfg, name)}")
    if cfg.eval_len <= (cfg.prompt_len or cfg.train_len):
        raise UsageError(
            f"--eval-len ({cfg.eval_len}) must be longer than --train-len ({cfg.train_len}): "
            "continuations start from a training-length prompt"
        )
    for name, high in (("epochs", 10_000.0), ("lr", 10.0)):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and 0 < value <= high):
            raise UsageError(f"--{name} must be a positive number of at most {high:g}, got {value}")
    if cfg.max_train_chunks is not None and cfg.max_train_chunks < 0:
        raise UsageError(f"--max-train-chunks must be 0 (all) or more, got {cfg.max_train_chunks}")
    check_seeds(cfg.seed, cfg.seeds)
    if cfg.out is not None and not str(cfg.out).strip():
        raise UsageError("--out must not be empty")
    if not cfg.needle.strip():
        raise UsageError("--needle must not be empty")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise UsageError("--wandb needs the wandb package: pip install 'mempos[wandb]'")
    if any(not 2 <= length <= MAX_TOKENS for length in cfg.sweep_lens) or len(set(cfg.sweep_lens)) != len(cfg.sweep_lens):
        raise UsageError(f"--sweep-lens must be distinct lengths of 2 to {MAX_TOKENS} tokens")
    if cfg.prompt_len is not None and not 1 <= cfg.prompt_len < cfg.eval_len:
        raise UsageError(f"--prompt-len must be between 1 and eval length - 1 ({cfg.eval_len - 1})")


def output_folder(cfg, overwrite: bool) -> Path:
    """The run folder, checked before any work: it must be new, empty (or --overwrite) and writable."""
    out = Path(cfg.out or f"runs/needle-{cfg.preset}")
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise UsageError(f"--out {out} already holds files; choose another folder or pass --overwrite")
        existing = next(parent for parent in [out, *out.absolute().parents] if parent.exists())
    except OSError as err:  # a name too long, a component that is a file, ...
        raise UsageError(f"--out {out} is not usable: {err.strerror or err}") from None
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} cannot be created: {existing} is not a writable folder")
    return out


def clear_outputs(out: Path) -> None:
    """--overwrite: remove an earlier run's outputs, so the folder holds one run only."""
    for path in out.iterdir():
        if path.is_dir() and path.name in ("tokenizer", "wandb"):
            shutil.rmtree(path)
        elif path.suffix in (".pt", ".png", ".npz") or path.name in ("metrics.json", "config.json", "report.md"):
            path.unlink()


def load_model(cfg, corpus):
    """The initial weights every variant starts from, and the tokenizer."""
    if cfg.model:
        model, tokenizer = load_pretrained(cfg.model)
    else:
        tokenizer = train_tokenizer(corpus.train, cfg.vocab_size)
        model = fresh_model(cfg, tokenizer, cfg.seed)
    longest = max([cfg.eval_len, *cfg.sweep_lens])
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {model.config.vocab_size}")
    if "learned" in cfg.encodings and longest > model.config.n_positions:
        raise UsageError(
            f"the learned control has {model.config.n_positions} positions; "
            f"evaluating at {longest} tokens needs a rotary encoding"
        )
    return model, tokenizer


def build_data(cfg, corpus, tokenizer) -> NeedleData:
    """Training contexts with a needle every `needle_every`; held-out sequences for evaluation."""
    needle_ids = encode(tokenizer, " " + cfg.needle.strip())
    if len(needle_ids) >= cfg.train_len:
        raise UsageError(f"the needle is {len(needle_ids)} tokens long, too long for --train-len {cfg.train_len}")
    train_chunks = chunk_tokens(encode(tokenizer, corpus.train), cfg.train_len)[: cfg.max_train_chunks or None]
    train_chunks, train_needles = inject_needles(train_chunks, needle_ids, every=cfg.needle_every, seed=cfg.seed)
    eval_ids = torch.as_tensor(encode(tokenizer, corpus.eval), dtype=torch.long)
    held_out = chunk_tokens(eval_ids, cfg.eval_len)
    # needle sequences come from the end of the held-out text, the others from its start
    needle_chunks, needle_records = inject_needles(
        held_out[-cfg.needle_sequences:], needle_ids, every=1, seed=cfg.seed + 1
    )
    eval_ids = eval_ids[: min(cfg.eval_sequences, len(held_out)) * cfg.eval_len]
    return NeedleData(train_chunks, train_needles, eval_ids, needle_chunks, needle_records)


def run_needle(cfg, command: str = "", overwrite: bool = False) -> dict:
    validate(cfg)
    seeds = cfg.seeds or [cfg.seed]
    cfg = cfg.replace(seed=seeds[0], seeds=seeds)
    accelerator = make_accelerator(cfg.mixed_precision, log_with="wandb" if cfg.wandb else None)
    main = accelerator.is_main_process
    # only the main process writes, so only it asks whether the folder is free
    out = output_folder(cfg, overwrite or not main)
    # read data and model first: every user error surfaces before anything is written
    corpus = load_text(cfg.data)
    base_model, tokenizer = load_model(cfg, corpus)
    data = build_data(cfg, corpus, tokenizer)
    if cfg.sweep_lens and max(cfg.sweep_lens) > len(data.eval_ids):
        raise UsageError(
            f"the evaluation slice has {len(data.eval_ids)} tokens (eval_sequences x eval_len), "
            f"fewer than the longest sweep length {max(cfg.sweep_lens)}; raise --eval-len or shorten --sweep-lens"
        )
    steps = round(len(data.train_chunks) * cfg.epochs) // cfg.batch_size
    if steps < 1:
        raise UsageError(f"{len(data.train_chunks)} training contexts x {cfg.epochs} epochs make no step of {cfg.batch_size}")
    resolved = dataclasses.asdict(cfg) | {
        "out": str(out),
        "prompt_len": cfg.prompt_len or cfg.train_len,
        "model": cfg.model or "scratch",
        "data": cfg.data or "embedded",
    }
    metrics = {
        "command": command,
        "config": resolved,
        "data": {
            "corpus": corpus.name,
            "train_contexts": len(data.train_chunks),
            "train_tokens": data.train_chunks.numel(),
            "needles": [dataclasses.asdict(r) for r in data.train_needles],
            "eval_tokens": len(data.eval_ids),
        },
        "environment": {
            "mempos": code_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(accelerator.device),
            "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        },
        "variants": {},
        "sweep": {"lengths": sorted(cfg.sweep_lens), "seeds": seeds, "results": {}},
    }
    if main:
        if out.is_dir() and overwrite:
            clear_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"command": command, **resolved})
        save_tokenizer(tokenizer, out / "tokenizer")
    if cfg.wandb:
        accelerator.init_trackers(
            "mempos-needle", config=resolved, init_kwargs={"wandb": {"mode": "offline", "dir": str(out)}}
        )
    curves: dict[str, np.ndarray] = {}
    for seed in seeds:
        run_cfg = cfg.replace(seed=seed)
        if seed != seeds[0]:  # new initial weights (from scratch), data order and needle places
            base_model = base_model if cfg.model else fresh_model(cfg, tokenizer, seed)
            data = build_data(run_cfg, corpus, tokenizer)
        for name in cfg.encodings:
            set_seed(seed)
            label = name if len(seeds) == 1 else f"{name} seed {seed}"
            model = apply_encoding(copy.deepcopy(base_model), name, **length_options(name, cfg.train_len, cfg.eval_len))
            summary = train_lm(model, data.train_chunks, run_cfg, accelerator, label=label)
            model = model.to(accelerator.device)
            if main:
                say = lambda line, label=label: accelerator.print(f"[{label}] {line}")  # noqa: E731
                scalars = {}
                if seed == seeds[0]:  # the detailed evaluation, on the first seed
                    scalars, variant_curves = evaluate_variant(
                        model,
                        eval_text_ids=data.eval_ids,
                        needle_chunks=data.needle_chunks,
                        needle_records=data.needle_records,
                        train_len=cfg.train_len,
                        eval_len=cfg.eval_len,
                        batch_size=cfg.eval_batch_size,
                        n_generate=cfg.generate_sequences,
                        prompt_len=cfg.prompt_len or cfg.train_len,
                        progress=say,
                    )
                    scalars |= path_drift(model, data, cfg)
                    metrics["variants"][name] = scalars | {"train": summary}
                    curves |= {f"{name}/{key}": value for key, value in variant_curves.items()}
                    save_curves(out / "curves.npz", curves)
                if cfg.sweep_lens:
                    sweep = length_sweep(model, data.eval_ids, cfg.sweep_lens, cfg.train_len, cfg.eval_batch_size, progress=say)
                    record_sweep(metrics["sweep"]["results"].setdefault(name, {}), sweep, summary)
                stem = name if seed == seeds[0] else f"{name}-seed{seed}"
                save_checkpoint(out / f"{stem}.pt", model, tokenizer, encoding=name, seed=seed, config=resolved, metrics=scalars)
                # written after every variant, so a killed run keeps what it finished
                write_json(out / "metrics.json", metrics)
            accelerator.wait_for_everyone()
    if main:
        render(out)
    accelerator.print(f"wrote {out}: report.md, metrics.json, plots and {len(cfg.encodings) * len(seeds)} checkpoints")
    accelerator.end_training()
    return metrics


def render(out: Path) -> None:
    """Plots and report.md from a run folder's metrics.json and curves.npz (also after the fact)."""
    metrics = json.loads((out / "metrics.json").read_text())
    train_len = metrics["config"]["train_len"]
    with np.load(out / "curves.npz") as stored:
        curves = {key: stored[key] for key in stored.files}
    by_variant = {
        name: {key.split("/", 1)[1]: value for key, value in curves.items() if key.startswith(name + "/")}
        for name in metrics["variants"]
    }
    plot_entropy(by_variant, train_len, out / "entropy_vs_position.png")
    if metrics["sweep"]["lengths"]:
        plot_sweep(metrics["sweep"], train_len, out / "length_sweep.png")
    write_report(metrics, out / "report.md")


def code_version() -> str:
    """mempos's version, with the git commit when running from a checkout."""
    version = importlib.metadata.version("mempos")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def fresh_model(cfg, tokenizer, seed: int):
    return small_gpt2(
        len(tokenizer), n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        n_positions=max([1024, cfg.eval_len, *cfg.sweep_lens]), seed=seed,
    )


def path_drift(model, data: NeedleData, cfg) -> dict:
    """For PaTH: how far the accumulated transforms move beyond the training length."""
    if not path_encodings(model):
        return {}
    drift = transform_drift(model, data.needle_chunks, cfg.train_len, cfg.eval_len, batch_size=cfg.eval_batch_size)
    return {"path_drift": drift.mean, "path_drift_per_layer": drift.per_layer, "path_drift_falsifier": DRIFT_FALSIFIER}


def record_sweep(results: dict, sweep: dict, summary: dict) -> None:
    """Append one seed's figures to the per-length lists."""
    for length, figures in sweep.items():
        slot = results.setdefault(str(length), {})
        for key, value in figures.items():
            slot.setdefault(key, []).append(value)
    results.setdefault("final_loss", []).append(summary["final_loss"])


def save_curves(path: Path, curves: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **curves)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained into a temporary folder, then rename it into place."""
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
