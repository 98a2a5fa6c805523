"""Time per episode of the continual-learning agent with memory and routing on, relative to the
same training with them off, measured in one process.

    python benchmarks/agent_overhead.py                  # the tiny preset's model and stream
    python benchmarks/agent_overhead.py --preset smoke
    python benchmarks/agent_overhead.py --tasks copy,reverse,kv   # longer examples (4-8 digits, 3-5 pairs)

"On" embeds each episode (a no-grad forward over its prompts), routes it to a module, gives its
tokens slot/module/pc fingerprints and writes its examples into the faiss memory; "off" trains on
the same packed contexts with none of that. Both run the naive strategy (no replay, so the batches
are the same size), start from the same weights and see the same episodes; they alternate episode
by episode, so drift in machine speed affects both alike. The figure is the ratio of medians
(target: at most 1.15).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mempos.agent.loop import Agent
from mempos.agent.strategies import make_strategy
from mempos.experiments.continual import (
    PRESETS, Variant, agent_config, base_model, make_stream, tokenizer_text, validate,
)
from mempos.models import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--tasks", help="tasks of the stream (default: the preset's)")
    parser.add_argument("--episodes", type=int, default=60, help="episodes timed per arm (after 3 warm-up episodes)")
    args = parser.parse_args()
    cfg = PRESETS[args.preset].replace(tasks=args.tasks or PRESETS[args.preset].tasks, variants=["naive"])
    tasks, _ = validate(cfg)
    tokenizer = train_tokenizer(tokenizer_text(tasks, cfg), cfg.vocab_size)
    model = base_model(cfg, tokenizer, seed=0)
    kinds = [t.kind for t in tasks]
    arms = {}
    for name, memory, axes in (("on", True, ("slot", "module", "pc")), ("off", False, ())):
        config = agent_config(cfg, Variant("naive", "naive", {}, axes), seed=0)
        config.memory, config.fingerprints = memory, axes
        arms[name] = Agent(copy.deepcopy(model), tokenizer, make_strategy("naive"), config, kinds)
    episodes = list(make_stream(tasks, cfg.replace(episodes_per_task=max(1, (args.episodes + 3) // len(tasks) + 1)), 0))
    times = {name: [] for name in arms}
    for index, episode in enumerate(episodes[: args.episodes + 3]):
        for name, agent in arms.items():
            start = time.perf_counter()
            agent.train_episode(episode)
            if index >= 3:
                times[name].append(time.perf_counter() - start)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"agent episode time, {args.preset} preset ({cfg.n_layer} layers, width {cfg.n_embd}, batch "
          f"{cfg.batch_size}, context {cfg.context_len}), {torch.get_num_threads()} threads, "
          f"median of {len(times['on'])} episodes; tasks {cfg.tasks}")
    print(f"  memory + routing off: {1000 * off:8.2f} ms")
    print(f"  memory + routing on:  {1000 * on:8.2f} ms  ({arms['on'].bank.n_slots} slots, "
          f"{arms['on'].bank.n_modules} modules at the end)")
    print(f"  ratio on/off: {on / off:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
