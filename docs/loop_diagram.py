"""Draw docs/continual_loop.png, the continual-learning loop of `mempos continual` in one picture.

    python docs/loop_diagram.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, w, h, title, detail, colour)
    "stream": (0.2, 5.0, 2.6, 1.3, "TaskStream", "episode = (task id, step,\nexamples); no future task", "#dbe9f6"),
    "embed": (3.6, 5.0, 2.6, 1.3, "1. embed", "mean-pooled last hidden\nstates of the prompts", "#fde8c8"),
    "route": (7.0, 5.0, 2.6, 1.3, "2. route", "nearest module, or a new one\nbeyond the threshold", "#e3f1dc"),
    "fp": (10.4, 5.0, 2.8, 1.3, "3. fingerprint", "slot, module, pc ->\nrotary axes (+ local)", "#e3f1dc"),
    "compose": (10.4, 2.6, 2.8, 1.3, "4. compose_batch", "strategy hook: replay adds\nexemplars from memory", "#f3dcef"),
    "train": (7.6, 2.6, 2.4, 1.3, "5. train", "next-token loss + penalty\n(EWC), AdamW, clip", "#fde8c8"),
    "write": (3.6, 2.6, 2.6, 1.3, "6. write", "exemplars -> memory slots\n(key, tokens, task, module)", "#e3f1dc"),
    "memory": (6.6, 0.2, 6.6, 1.4, "MemoryBank", "faiss slot store (flat / IVF / HNSW), modules,\n"
               "networkx module graph; saved atomically", "#e3f1dc"),
    "boundary": (0.2, 2.6, 2.6, 1.3, "task boundary", "evaluate seen tasks + next;\nrow i of R; checkpoint", "#dbe9f6"),
    "metrics": (0.2, 0.2, 5.6, 1.4, "metrics", "R (exact match, NLL) -> ACC, BWT, FWT, forgetting,\n"
                "intransigence; gradient interference", "#dbe9f6"),
}

ARROWS = [  # (from, to, label)
    ("stream", "embed", ""), ("embed", "route", ""), ("route", "fp", ""), ("fp", "compose", ""),
    ("compose", "train", ""), ("train", "write", ""), ("write", "boundary", "end of task"),
    ("boundary", "stream", "next task"), ("boundary", "metrics", ""),
    ("memory", "compose", "replay"), ("write", "memory", ""),
]
STRAIGHT = [((7.1, 1.7), (7.1, 4.95), "centroids")]  # memory -> route, through the gap left of "train"


def centre(name: str) -> tuple[float, float]:
    x, y, w, h = BOXES[name][:4]
    return x + w / 2, y + h / 2


def edge_point(name: str, towards: tuple[float, float]) -> tuple[float, float]:
    """Where the line from the box's centre to `towards` leaves the box."""
    x, y, w, h = BOXES[name][:4]
    cx, cy = centre(name)
    dx, dy = towards[0] - cx, towards[1] - cy
    scale = min(w / 2 / abs(dx) if dx else float("inf"), h / 2 / abs(dy) if dy else float("inf"))
    return cx + dx * scale, cy + dy * scale


def main(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(13.6, 6.8))
    for x, y, w, h, title, detail, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05,rounding_size=0.15",
                                    fc=colour, ec="#555555", lw=1.2))
        ax.text(x + w / 2, y + h - 0.3, title, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x + w / 2, y + h / 2 - 0.2, detail, ha="center", va="center", fontsize=8.5)
    for a, b, label in ARROWS:
        start, end = edge_point(a, centre(b)), edge_point(b, centre(a))
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#333333",
                                     shrinkA=4, shrinkB=4))
        if label:
            ax.text((start[0] + end[0]) / 2 + 0.1, (start[1] + end[1]) / 2 + 0.1, label, fontsize=8.5,
                    style="italic", color="#333333")
    for start, end, label in STRAIGHT:
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#333333"))
        ax.text(start[0] + 0.1, (start[1] + end[1]) / 2 - 0.9, label, fontsize=8.5, style="italic", color="#333333")
    ax.text(3.2, 4.45, "one episode: steps 1-6 (Agent.train_episode); strategies change steps 4 and 5 through hooks",
            ha="center", fontsize=9, color="#333333")
    ax.set_xlim(0, 13.4)
    ax.set_ylim(0, 6.5)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main(Path(__file__).with_name("continual_loop.png"))
