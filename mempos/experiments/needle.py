"""The needle attention-entropy experiment.

Every variant starts from the same weights, trains on the same contexts in
the same order, and is evaluated on the same held-out text at `eval_len`
(4x the training length by default). One folder per run holds the resolved
config, metrics.json, curves.npz, the entropy plot, report.md, the tokenizer
and one checkpoint per variant.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate.utils import set_seed

from ..checkpoint import save_checkpoint
from ..data import chunk_tokens, inject_needles, load_text
from ..encodings import ENCODINGS, apply_encoding
from ..errors import UsageError
from ..io import atomic_path, write_json
from ..models import encode, load_pretrained, small_gpt2, train_tokenizer
from .evaluate import evaluate_variant
from .report import plot_entropy, write_report
from .train import make_accelerator, train_lm


@dataclass
class NeedleData:
    """Token data every variant shares."""

    train_chunks: torch.Tensor  # (N, train_len), needles injected
    train_needles: list
    eval_ids: torch.Tensor  # held-out text, whole eval_len sequences
    needle_chunks: torch.Tensor  # (M, eval_len) held-out sequences, one needle each
    needle_records: list


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
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.eval_len < cfg.train_len:
        raise UsageError(f"--eval-len ({cfg.eval_len}) must not be shorter than --train-len ({cfg.train_len})")
    if cfg.epochs <= 0 or cfg.lr <= 0:
        raise UsageError("--epochs and --lr must be positive")
    if not cfg.needle.strip():
        raise UsageError("--needle must not be empty")
    if cfg.prompt_len is not None and not 1 <= cfg.prompt_len < cfg.eval_len:
        raise UsageError(f"--prompt-len must be between 1 and eval length - 1 ({cfg.eval_len - 1})")


def output_folder(cfg, overwrite: bool) -> Path:
    out = Path(cfg.out or f"runs/needle-{cfg.preset}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} already holds files; choose another folder or pass --overwrite")
    return out


def load_model(cfg, corpus):
    """The initial weights every variant starts from, and the tokenizer."""
    if cfg.model:
        model, tokenizer = load_pretrained(cfg.model)
    else:
        tokenizer = train_tokenizer(corpus.train, cfg.vocab_size)
        model = small_gpt2(
            len(tokenizer), n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
            n_positions=max(1024, cfg.eval_len), seed=cfg.seed,
        )
    if "learned" in cfg.encodings and cfg.eval_len > model.config.n_positions:
        raise UsageError(
            f"the learned control has {model.config.n_positions} positions; "
            f"--eval-len {cfg.eval_len} needs a rotary encoding"
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
    accelerator = make_accelerator(cfg.mixed_precision, log_with="wandb" if cfg.wandb else None)
    main = accelerator.is_main_process
    # only the main process writes, so only it asks whether the folder is free
    out = output_folder(cfg, overwrite or not main)
    set_seed(cfg.seed)
    # read data and model first: every user error surfaces before anything is written
    corpus = load_text(cfg.data)
    base_model, tokenizer = load_model(cfg, corpus)
    data = build_data(cfg, corpus, tokenizer)
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
            "train_contexts": len(data.train_chunks),
            "train_tokens": data.train_chunks.numel(),
            "needles": [dataclasses.asdict(r) for r in data.train_needles],
            "eval_tokens": len(data.eval_ids),
        },
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(accelerator.device),
            "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        },
        "variants": {},
    }
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"command": command, **resolved})
        save_tokenizer(tokenizer, out / "tokenizer")
    if cfg.wandb:
        accelerator.init_trackers(
            "mempos-needle", config=resolved, init_kwargs={"wandb": {"mode": "offline", "dir": str(out)}}
        )
    curves: dict[str, np.ndarray] = {}
    for name in cfg.encodings:
        set_seed(cfg.seed)
        model = apply_encoding(copy.deepcopy(base_model), name)
        summary = train_lm(model, data.train_chunks, cfg, accelerator, label=name)
        model = model.to(accelerator.device)
        if main:
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
                progress=lambda line, name=name: accelerator.print(f"[{name}] {line}"),
            )
            metrics["variants"][name] = scalars | {"train": summary}
            curves |= {f"{name}/{key}": value for key, value in variant_curves.items()}
            save_checkpoint(out / f"{name}.pt", model, tokenizer, encoding=name, config=resolved, metrics=scalars)
            # written after every variant, so a killed run keeps what it finished
            write_json(out / "metrics.json", metrics)
            save_curves(out / "curves.npz", curves)
        accelerator.wait_for_everyone()
    if main:
        by_variant = {name: {k.split("/", 1)[1]: v for k, v in curves.items() if k.startswith(name + "/")} for name in cfg.encodings}
        plot_entropy(by_variant, cfg.train_len, out / "entropy_vs_position.png")
        write_report(metrics, out / "report.md")
    accelerator.print(f"wrote {out}: report.md, metrics.json, entropy_vs_position.png, {len(cfg.encodings)} checkpoints")
    accelerator.end_training()
    return metrics


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
