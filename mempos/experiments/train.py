"""Causal-LM training through accelerate, so `accelerate launch` runs it unchanged.

The data order is a seeded permutation per epoch, the same for every
variant; accelerate splits each batch across processes.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_scheduler


def make_accelerator(mixed_precision: str = "auto", log_with: str | None = None, project_dir=None) -> Accelerator:
    """An Accelerator for this machine. Without a GPU we ask for CPU explicitly: that is what makes
    `accelerate launch --multi_gpu --num_processes N` run N gloo processes on a CPU-only host."""
    cpu = not torch.cuda.is_available()
    if mixed_precision == "auto":
        if torch.cuda.is_available():
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mixed_precision = "no"  # CPU autocast is slower than float32 here
    # split_batches: --batch-size is the global batch, so N processes follow the same
    # optimisation path as one (each gets batch_size / N examples per step)
    return Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def epoch_order(n: int, epochs: float, seed: int) -> torch.Tensor:
    """Indices of the training contexts in the order they are seen: one permutation per epoch."""
    generator = torch.Generator().manual_seed(seed)
    whole = math.ceil(epochs)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(whole)])
    return order[: round(n * epochs)]


def optimizer_groups(model, weight_decay: float):
    """Decay matrices, not biases or layer norms (as GPT-2 and nanoGPT do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def train_lm(model, chunks: torch.Tensor, cfg, accelerator: Accelerator, label: str = "") -> dict:
    """Train `model` on the (N, L) token contexts `chunks`; returns a summary with the loss curve."""
    order = epoch_order(len(chunks), cfg.epochs, cfg.seed)
    loader = DataLoader(TensorDataset(chunks[order]), batch_size=cfg.batch_size, shuffle=False)
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps = len(loader)
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    losses, start = [], time.perf_counter()
    bar = tqdm(loader, desc=f"train {label}", disable=not accelerator.is_local_main_process, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s, not a flood
    for step, (ids,) in enumerate(bar):
        loss = model(ids, labels=ids).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = accelerator.reduce(loss.detach(), reduction="mean").item()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}")
        accelerator.log({f"{label}/train_loss": value, f"{label}/lr": scheduler.get_last_lr()[0], f"{label}/step": step})
    model = accelerator.unwrap_model(model)
    model.eval()
    accelerator.free_memory()
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "losses": losses,
        "processes": accelerator.num_processes,
    }
