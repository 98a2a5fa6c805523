"""Train-step time (forward + backward) of each encoding relative to GPT-2's own
learned positions with sdpa, and to plain RoPE, measured in one process.

    python benchmarks/train_step.py                   # tiny config
    python benchmarks/train_step.py --size distilgpt2 # distilgpt2-sized config

Variants run interleaved, round after round, so drift in machine speed
affects all of them alike; the ratio is of medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mempos.encodings import ENCODINGS, apply_encoding

SIZES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=4096),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768, vocab_size=50257),
}


def step_time(model, ids) -> float:
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(n_positions=max(1024, args.length), bos_token_id=0, eos_token_id=0, **SIZES[args.size])
    names = args.encodings.split(",")
    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = apply_encoding(GPT2LMHeadModel(copy.deepcopy(config)), name).train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length))
    times = {name: [] for name in names}
    for name in names:  # warm-up
        step_time(models[name], ids)
    for _ in range(args.rounds):
        for name in names:
            times[name].append(step_time(models[name], ids))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"train step, {args.size} config, batch {args.batch} x {args.length}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    width = max(map(len, names))
    print(f"{'encoding':<{width}} {'median s':>9} {'min s':>8} {'vs learned':>11} {'vs rope':>8}")
    for name in names:
        vs_learned = f"{medians[name] / medians['learned']:11.3f}" if "learned" in medians else f"{'':>11}"
        vs_rope = f"{medians[name] / medians['rope']:8.3f}" if "rope" in medians else f"{'':>8}"
        print(f"{name:<{width}} {medians[name]:9.3f} {min(times[name]):8.3f} {vs_learned} {vs_rope}")


if __name__ == "__main__":
    main()
