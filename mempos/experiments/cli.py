"""`mempos`: the one command-line entry point.

User errors print one line and exit with status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from ..errors import UsageError
from .options import number_list, parts


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def encodings_help() -> str:
    from ..encodings import ENCODINGS

    width = max(map(len, ENCODINGS))
    return "\n".join(f"  {spec.name:<{width}}  {spec.summary}" for spec in ENCODINGS.values())


def add_needle(sub) -> None:
    from .presets import PRESETS

    p = sub.add_parser(
        "needle",
        help="train position-encoding variants on text with a needle, evaluate at 4x the training length",
        description=(
            "Train one GPT-2 per position encoding on the same data, seed and order, then measure "
            "perplexity at the training and evaluation length, per-head attention entropy at every "
            "position, attention on injected needles and greedy continuations. Writes one folder: "
            "config.json, metrics.json, curves.npz, entropy_vs_position.png, length_sweep.png, "
            "report.md, <encoding>.pt checkpoints and the tokenizer. Presets set their own defaults "
            "(shown for tiny below); every option overrides its preset."
        ),
        epilog="encodings:\n" + encodings_help() + "\n\npresets:\n"
        + "\n".join(f"  {name:<7} {desc}" for name, desc in PRESET_HELP.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), metavar="NAME",
                   help="starting configuration: smoke, tiny (default) or seed; any option below overrides it")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/needle-<preset>); must be empty or new")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    p.add_argument("--encodings", metavar="A,B", help="comma-separated encodings to compare (see below), or 'all'")
    p.add_argument("--model", metavar="ID|DIR",
                   help="GPT-2-family hub id (e.g. distilgpt2) or save_pretrained folder; "
                        "'scratch' for the embedded small GPT-2 trained from scratch (tiny/smoke default)")
    p.add_argument("--data", metavar="SOURCE",
                   help="'wikitext' (WikiText-2 raw via datasets), 'embedded' (Python's own documentation, "
                        "no download), a UTF-8 text file, .gz or folder, or train=PATH,eval=PATH")
    p.add_argument("--train-len", type=int, metavar="N", help="training context length in tokens (default 128)")
    p.add_argument("--eval-len", type=int, metavar="N", help="evaluation length in tokens (default 512)")
    p.add_argument("--seed", type=int, metavar="N", help="seed for weights, data order and needles (default 0)")
    p.add_argument("--seeds", metavar="A,B", help="train every encoding once per seed (e.g. 0,1,2); "
                   "the sweep reports mean and spread; detailed curves come from the first seed")
    p.add_argument("--sweep-lens", metavar="A,B", help="evaluation lengths of the sweep (default 128,256,512,1024; "
                   "'none' to skip)")
    p.add_argument("--epochs", type=float, metavar="X", help="training epochs (may be fractional)")
    p.add_argument("--lr", type=float, metavar="X", help="peak learning rate")
    p.add_argument("--batch-size", type=int, metavar="N", help="training batch size (default 8)")
    p.add_argument("--max-train-chunks", type=int, metavar="N", help="use at most N training contexts (0: all)")
    p.add_argument("--needle", metavar="TEXT", help="needle string (default 'needle needle needle')")
    p.add_argument("--needle-every", type=int, metavar="N", help="one needle every N training contexts (default 20)")
    p.add_argument("--wandb", action="store_true",
                   help="log to Weights & Biases, offline into the run folder (sync later with `wandb sync`)")
    p.set_defaults(run=run_needle_command)


PRESET_HELP = {
    "smoke": "seconds: 2-layer model, a few contexts of the embedded corpus (for tests)",
    "tiny": "the embedded default: 4-layer GPT-2 from scratch on Python's docs, minutes on 2 CPU cores",
    "seed": "the full recipe: distilgpt2 + WikiText-2, 3 epochs, batch 8, lr 5e-5 (a GPU job)",
}

OVERRIDES = ("out", "model", "data", "train_len", "eval_len", "seed", "epochs", "lr", "batch_size",
             "needle", "needle_every")


def run_needle_command(args) -> None:
    from transformers.utils import logging as hf_logging

    from .needle import run_needle
    from .presets import PRESETS

    hf_logging.set_verbosity_error()  # keep the terminal for our own progress

    changes = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    if args.encodings is not None:
        changes["encodings"] = parts(args.encodings, "--encodings")
        if changes["encodings"] == ["all"]:
            from ..encodings import ENCODINGS

            changes["encodings"] = list(ENCODINGS)
    if args.seeds is not None:
        changes["seeds"] = number_list(args.seeds, "--seeds")
    if args.sweep_lens is not None:
        changes["sweep_lens"] = [] if args.sweep_lens.strip().lower() == "none" else number_list(args.sweep_lens, "--sweep-lens")
    if args.max_train_chunks is not None:
        changes["max_train_chunks"] = args.max_train_chunks or None
    if changes.get("model") == "scratch":
        changes["model"] = None
    cfg = PRESETS[args.preset].replace(**changes, wandb=args.wandb)
    run_needle(cfg, command=shlex.join(["mempos", *args.argv]), overwrite=args.overwrite)


def build_parser() -> Parser:
    parser = Parser(prog="mempos", description="Memory-aware positional encodings for continual-learning LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    add_needle(sub)
    from .continual import add_parser as add_continual; add_continual(sub)  # noqa: E702
    from .bench import add_parser as add_bench; add_bench(sub)  # noqa: E702
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # recorded in the run folder as the command that made it
        args.run(args)
    except UsageError as err:
        print("mempos: error: " + " ".join(str(err).split()), file=sys.stderr)  # always one line
        return 2
    except OSError as err:  # the disk, not the code: full, read-only, gone
        print(f"mempos: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mempos: interrupted; files already written are complete", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
