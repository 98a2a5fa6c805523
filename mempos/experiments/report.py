"""The needle experiment's plot and report.md, written from measured numbers only.

Every sentence of the interpretation is computed from the metrics it sits
next to, so a rerun with different numbers cannot leave a stale verdict.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..encodings import ENCODINGS  # noqa: E402
from ..io import atomic_path, write_text  # noqa: E402
from .evaluate import REPETITION_NGRAM  # noqa: E402

BAND = (10, 90)  # percentiles across the layer x head curves drawn as the shaded band
LEGEND_COLUMNS = 6
TOLERANCE = 0.01  # relative changes (and differences of rates) smaller than this are reported as "about equal"

PANELS = (
    ("raw", "raw attention entropy (bits)", "evaluation text"),
    ("normalised", "entropy / log2(visible keys)", "evaluation text, normalised"),
    ("generated_normalised", "entropy / log2(visible keys)", "own greedy generations, normalised"),
)

LOG_WARP_NOTE = (
    "si_rope rotates dimension pair k of queries and keys by omega_k * log(1 + i), so the score "
    "between a query at i and a key at j depends on log(1 + j) - log(1 + i), that is on the ratio "
    "(1+j)/(1+i), not on the distance j - i: it is ratio-invariant, not shift-invariant. The log is "
    "not homogeneous, f(a·i) ≠ a·f(i); what holds is f(a·i) ≈ f(i) + log a for large i, so scaling "
    "all positions by a leaves far-apart angle differences nearly unchanged rather than scaling them."
)


def variant_colour(index: int):
    """By variant order, so colours agree across panels and plots: tab20's ten strong hues
    first, then their light partners (tab20 pairs each hue with a lighter one)."""
    return plt.get_cmap("tab20")((2 * index + (index // 10) % 2) % 20)


def layer_head_curves(curve) -> np.ndarray:
    """(layers, heads, T) -> (layers * heads, T): one row per attention head."""
    values = np.asarray(curve, dtype=np.float64)
    return values.reshape(-1, values.shape[-1])


def draw_panel(ax, curves_by_variant: dict[str, dict], key: str, train_len: int) -> None:
    """Mean over heads as a line, the 10th-90th percentile over heads as a band, per variant."""
    for index, (name, curves) in enumerate(curves_by_variant.items()):
        if key not in curves:
            continue
        colour = variant_colour(index)
        rows = layer_head_curves(curves[key])
        start = 0 if key == "raw" else 1  # normalised entropy is undefined at position 0
        x = np.arange(start, rows.shape[1])
        rows = rows[:, start:]
        low, high = np.nanpercentile(rows, BAND, axis=0)
        ax.plot(x, np.nanmean(rows, axis=0), color=colour, lw=1.5, label=name)
        ax.fill_between(x, low, high, color=colour, alpha=0.15, lw=0)
    length = max(layer_head_curves(c[key]).shape[1] for c in curves_by_variant.values() if key in c)
    if key == "raw":
        x = np.arange(length)
        ax.plot(x, np.log2(x + 1), color="grey", ls=":", lw=1, label="uniform: log2(i + 1)")
    else:
        ax.axhline(1.0, color="grey", ls=":", lw=1, label="uniform over visible keys")
    ax.axvline(train_len, color="black", ls="--", lw=1, label="train length")
    ax.annotate("train length", (train_len, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=8)
    ax.set_xlabel("query position i")


def shared_legend(fig, axes) -> None:
    """One legend under all panels (variants and reference lines once each), so none hides data."""
    labelled = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    fig.legend(labelled.values(), labelled.keys(), loc="lower center", ncol=min(len(labelled), LEGEND_COLUMNS),
               frameon=False)


def plot_entropy(curves_by_variant: dict[str, dict], train_len: int, path) -> None:
    """entropy_vs_position.png: raw and normalised attention entropy against query position.

    One colour per variant; the line is the mean over all layer x head
    curves and the band spans their 10th-90th percentiles; nothing is
    smoothed. A third panel shows normalised entropy on the model's own
    greedy generations when any variant has it.
    """
    panels = [p for p in PANELS if any(p[0] in curves for curves in curves_by_variant.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, ylabel, title) in zip(axes[0], panels):
        draw_panel(ax, curves_by_variant, key, train_len)
        ax.set_ylabel(ylabel)
        if key != "raw":
            ax.set_ylim(0, 1.05)  # the full possible range, so small differences are not blown up
        ax.set_title(title)
        ax.grid(alpha=0.3)
    shared_legend(fig, axes[0])
    low, high = BAND
    fig.suptitle(
        "Attention entropy vs query position "
        f"(line: mean over layers × heads; band: {low}th–{high}th percentile over heads; unsmoothed)"
    )
    rows = -(-(len(curves_by_variant) + 3) // LEGEND_COLUMNS)  # variants plus the reference lines
    fig.tight_layout(rect=(0, 0.03 + 0.05 * rows, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def fmt(value) -> str:
    """A table cell: 4 significant digits (whole numbers from 10000 up); n/a for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table; numbers go through `fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def number(scalars: dict, key: str) -> float:
    """A scalar as a float, NaN when it is missing."""
    value = scalars.get(key)
    return math.nan if value is None else float(value)


def ratio(top: float, bottom: float) -> float:
    """top / bottom, NaN instead of a division by zero or by a missing number."""
    return top / bottom if bottom and not math.isnan(bottom) else math.nan


def known(*values: float) -> bool:
    """True when none of the numbers is missing (NaN), so a sentence about them can be made."""
    return all(not math.isnan(v) for v in values)


def ppl_ratio(scalars: dict) -> float:
    """Perplexity at the evaluation length over perplexity at the training length."""
    return ratio(number(scalars, "ppl_eval_len"), number(scalars, "ppl_train_len"))


def perplexity_sentences(variants: dict[str, dict], train_len: int, eval_len: int) -> list[str]:
    """Which variant extrapolates best, judged by the perplexity ratio."""
    ratios = {name: ppl_ratio(s) for name, s in variants.items() if known(ppl_ratio(s))}
    if not ratios:
        return ["Perplexity was not measured at both lengths, so extrapolation cannot be compared."]
    ranked = sorted(ratios, key=ratios.get)
    if len(ranked) == 1:
        name = ranked[0]
        short, long = number(variants[name], "ppl_train_len"), number(variants[name], "ppl_eval_len")
        return [f"{name}: perplexity {change(short, long)} from {short:.4g} at {train_len} tokens "
                f"to {long:.4g} at {eval_len} (ratio {ratios[name]:.3f})."]
    order = ", ".join(f"{name} ({ratios[name]:.3f})" for name in ranked)
    best = [name for name in ranked if ratios[name] <= ratios[ranked[0]] * (1 + TOLERANCE)]
    if len(best) == len(ranked):
        verdict = f"all variants extrapolate about equally (ratios within {TOLERANCE:.0%} of each other)"
    elif len(best) > 1:
        verdict = (f"{' and '.join(best)} extrapolate best (ratios within {TOLERANCE:.0%} of each other) "
                   f"and {ranked[-1]} worst")
    else:
        verdict = f"{ranked[0]} extrapolates best and {ranked[-1]} worst"
    sentences = [
        f"By the ratio of perplexity at {eval_len} tokens to perplexity at {train_len} tokens, "
        f"{verdict}; best to worst: {order}."
    ]
    lowest = min(ratios, key=lambda name: number(variants[name], "ppl_eval_len"))
    if lowest != ranked[0]:
        sentences.append(
            f"The lowest perplexity at {eval_len} tokens is nevertheless {lowest}'s "
            f"({number(variants[lowest], 'ppl_eval_len'):.4g}): it starts lower at {train_len} tokens "
            f"than {ranked[0]}."
        )
    return sentences


def change(before: float, after: float) -> str:
    """'rises by 0.0123 (+4.5%)', 'falls by ...', or 'changes by less than 1%' within TOLERANCE."""
    delta = after - before
    relative = ratio(delta, before)
    if abs(relative) < TOLERANCE:
        return f"changes by less than {TOLERANCE:.0%} ({relative:+.2%})"
    verb = "rises" if delta > 0 else "falls"
    return f"{verb} by {abs(delta):.4g} ({relative:+.1%})"


def entropy_sentences(variants: dict[str, dict], train_len: int) -> list[str]:
    """Does normalised entropy beyond the window rise or fall relative to inside it, and by how much?"""
    sentences = []
    for name, s in variants.items():
        inside, beyond = number(s, "entropy_norm_inside"), number(s, "entropy_norm_beyond")
        if not known(inside, beyond):
            sentences.append(f"{name}: no normalised entropy beyond position {train_len} was measured.")
            continue
        relative = ratio(beyond - inside, inside)
        meaning = (
            "attention keeps about the same relative spread past the training length"
            if abs(relative) < TOLERANCE else
            "attention spreads more evenly over the visible keys past the training length"
            if beyond > inside else
            "attention concentrates on relatively fewer keys past the training length"
        )
        sentences.append(
            f"{name}: normalised attention entropy {change(inside, beyond)} from {inside:.4g} "
            f"inside the training window to {beyond:.4g} beyond it: {meaning}."
        )
        gen_inside, gen_beyond = number(s, "generated_entropy_norm_inside"), number(s, "generated_entropy_norm_beyond")
        if known(gen_inside, gen_beyond):
            sentences.append(
                f"On its own greedy generations it {change(gen_inside, gen_beyond)} "
                f"({gen_inside:.4g} inside, {gen_beyond:.4g} beyond)."
            )
    return sentences


def against_uniform(mass: float, uniform: float) -> str:
    """'0.0284, 2.31× the uniform baseline 0.0123 (above it)'; within TOLERANCE it is 'about at it'."""
    factor = ratio(mass, uniform)
    side = "about at" if abs(factor - 1) < TOLERANCE else "above" if factor > 1 else "below"
    return f"{mass:.4g}, {factor:.3g}× the uniform baseline {uniform:.4g} ({side} it)"


def needle_sentences(variants: dict[str, dict]) -> list[str]:
    """Is attention to the needle above what content-blind attention would give, and by what factor?"""
    sentences = []
    for name, s in variants.items():
        mass, uniform = number(s, "needle_mass"), number(s, "needle_mass_uniform")
        if not known(mass, uniform):
            sentences.append(f"{name}: needle attention mass was not measured.")
            continue
        sentence = f"{name}: mean attention mass on the needle is {against_uniform(mass, uniform)}"
        beyond, uniform_beyond = number(s, "needle_mass_beyond"), number(s, "needle_mass_uniform_beyond")
        if known(beyond, uniform_beyond):
            sentence += f"; from queries beyond the training length it is {against_uniform(beyond, uniform_beyond)}"
        sentences.append(sentence + ".")
    return sentences


def generation_sentences(variants: dict[str, dict]) -> list[str]:
    """Do greedy generations loop more than the real text over the same span?"""
    sentences = []
    for name, s in variants.items():
        generated, reference = number(s, "repetition_generated"), number(s, "repetition_reference")
        if not known(generated, reference):
            continue
        verdict = (
            "repeat about as much as" if abs(generated - reference) < TOLERANCE else
            "loop more than" if generated > reference else "loop less than"
        )
        sentences.append(
            f"{name}: {generated:.1%} of the {REPETITION_NGRAM}-grams in its greedy continuations repeat an "
            f"earlier one, against {reference:.1%} in the held-out text over the same span: its generations "
            f"{verdict} the reference."
        )
    return sentences


def encoding_lines(names: Iterable[str]) -> list[str]:
    """One line per variant from the encoding registry, plus the log-warp facts when si_rope ran."""
    names = list(names)
    lines = [f"- **{name}**: {ENCODINGS[name].summary if name in ENCODINGS else 'not a registered encoding'}"
             for name in names]
    if "si_rope" in names:
        lines += ["", LOG_WARP_NOTE]
    return lines


def variant_tables(variants: dict[str, dict], train_len: int, eval_len: int) -> list[str]:
    """The four result tables and the training table, as markdown blocks."""
    v = variants
    return [
        "## Perplexity",
        table(["variant", f"ppl @ {train_len}", f"ppl @ {eval_len}", f"ratio {eval_len}/{train_len}"],
              [[n, number(s, "ppl_train_len"), number(s, "ppl_eval_len"), ppl_ratio(s)] for n, s in v.items()]),
        "## Attention entropy (mean over layers, heads and queries)",
        "Inside: query positions below the training length; beyond: from it on. Normalised entropy divides "
        "by log2 of the number of visible keys (1 = uniform over them), so its growth with position is "
        "not mistaken for a change.",
        table(["variant", "raw inside (bits)", "raw beyond (bits)", "normalised inside", "normalised beyond",
               "generated normalised inside", "generated normalised beyond"],
              [[n] + [number(s, k) for k in ("entropy_raw_inside", "entropy_raw_beyond", "entropy_norm_inside",
                                             "entropy_norm_beyond", "generated_entropy_norm_inside",
                                             "generated_entropy_norm_beyond")] for n, s in v.items()]),
        "## Needle attention mass",
        "Sum of attention on the needle's tokens from every query after it, against uniform attention "
        "over the visible keys for the same queries.",
        table(["variant", "mass", "uniform", "mass / uniform", "mass inside", "uniform inside",
               "mass beyond", "uniform beyond"],
              [[n, number(s, "needle_mass"), number(s, "needle_mass_uniform"),
                ratio(number(s, "needle_mass"), number(s, "needle_mass_uniform"))]
               + [number(s, f"needle_mass{part}{split}") for split in ("_inside", "_beyond") for part in ("", "_uniform")]
               for n, s in v.items()]),
        "## Greedy generation",
        f"Share of {REPETITION_NGRAM}-grams that repeat an earlier {REPETITION_NGRAM}-gram of the same "
        "sequence, in the generated continuation and in the real held-out text over the same span.",
        table(["variant", "repetition (generated)", "repetition (reference)"],
              [[n, number(s, "repetition_generated"), number(s, "repetition_reference")] for n, s in v.items()]),
        "## Training",
        table(["variant", "final loss", "seconds", "steps"],
              [[n] + [s.get("train", {}).get(k) for k in ("final_loss", "seconds", "steps")] for n, s in v.items()]),
    ]


def config_table(config: dict) -> str:
    """The resolved config as a two-column table; lists are shown comma-separated."""
    return table(["setting", "value"], [[key, value if not isinstance(value, (list, tuple)) else ", ".join(map(str, value))]
                                        for key, value in config.items()])


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def plus_minus(values: Sequence[float]) -> str:
    mean, spread = mean_spread(values)
    return f"{fmt(mean)} ± {fmt(spread)}" if len(values) > 1 else fmt(mean)


def plot_sweep(sweep: dict, train_len: int, path) -> None:
    """length_sweep.png: perplexity and normalised entropy against evaluation length, every encoding
    on one figure; points are means over seeds, error bars one standard deviation."""
    lengths = sweep["lengths"]
    panels = (("ppl", "perplexity (log scale)"), ("entropy_norm", "mean normalised attention entropy"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, (key, label) in zip(axes, panels):
        for index, (name, results) in enumerate(sweep["results"].items()):
            stats = [mean_spread(results[str(length)][key]) for length in lengths]
            ax.errorbar(lengths, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", ms=3,
                        lw=1.3, capsize=2, color=variant_colour(index), label=name)
        ax.axvline(train_len, color="black", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(length) for length in lengths])
        ax.set_xlabel("evaluation length (tokens); dashed: training length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    finite = [v for results in sweep["results"].values() for length in lengths
              for v in results[str(length)]["ppl"] if math.isfinite(v) and v > 0]
    if finite:  # a diverged run has no finite perplexity to put on a log axis
        axes[0].set_yscale("log")
    axes[1].set_ylim(0, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), frameon=False)
    seeds = sweep["seeds"]
    fig.suptitle(f"Length sweep: mean over {len(seeds)} seed{'s' if len(seeds) > 1 else ''} (error bars: ±1 sd)")
    fig.tight_layout(rect=(0, 0.1 + 0.04 * (len(labels) // 8), 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def sweep_blocks(sweep: dict, train_len: int) -> list[str]:
    """Tables of the length sweep (mean ± sd over seeds) and a ranking at the longest length."""
    lengths, results, seeds = sweep["lengths"], sweep["results"], sweep["seeds"]
    if not lengths or not results:
        return []
    header = ["encoding"] + [str(length) for length in lengths]
    longest = lengths[-1]
    ranked = sorted(results, key=lambda name: mean_spread(results[name][str(longest)]["ppl"])[0])
    best = ranked[0]
    shown = {name: fmt(mean_spread(results[name][str(longest)]["ppl"])[0]) for name in ranked}
    tied = [name for name in ranked if shown[name] == shown[best]]
    over = (f"mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
            else f"one seed ({seeds[0]}), so no spread")
    leader = (f"the lowest mean perplexity is {best}'s ({shown[best]}); ranked: {', '.join(ranked)}."
              if len(tied) == 1 else
              f"{' and '.join(tied)} share the lowest mean perplexity ({shown[best]} to the digits shown); "
              f"ranked: {', '.join(ranked)}.")
    return [
        "## Length sweep",
        f"Every encoding trained at {train_len} tokens and evaluated on the same held-out tokens cut to each "
        f"length; {over}.",
        "![perplexity and entropy against evaluation length](length_sweep.png)",
        "### Perplexity",
        table(header, [[name] + [plus_minus(results[name][str(length)]["ppl"]) for length in lengths] for name in results]),
        "### Mean normalised attention entropy (all query positions)",
        table(header, [[name] + [plus_minus(results[name][str(length)]["entropy_norm"]) for length in lengths]
                       for name in results]),
        f"At {longest} tokens {leader}" + gap_sentence(results, ranked, str(longest), len(seeds)),
    ]


def gap_sentence(results: dict, ranked: list[str], length: str, n_seeds: int) -> str:
    """Whether the best encoding's lead over the next is larger than the spread over seeds."""
    if len(ranked) < 2:
        return ""
    (best, best_sd), (second, second_sd) = (mean_spread(results[name][length]["ppl"]) for name in ranked[:2])
    if n_seeds < 2:
        return " With one seed there is no spread to judge these gaps against."
    spread = max(best_sd, second_sd)
    verdict = "larger" if second - best > spread else "not larger"
    return f" The lead over {ranked[1]} ({fmt(second - best)}) is {verdict} than the spread over seeds (sd up to {fmt(spread)})."


def drift_sentences(variants: dict[str, dict]) -> list[str]:
    """PaTH's transform drift against its falsifier threshold."""
    sentences = []
    for name, s in variants.items():
        if "path_drift" in s:
            drift, limit = float(s["path_drift"]), float(s["path_drift_falsifier"])
            verdict = "above" if drift > limit else "at or below"
            sentences.append(
                f"{name}: angular variance of the accumulated transforms beyond the training length against "
                f"their direction at it is {fmt(drift)} rad², {verdict} the falsifier threshold {fmt(limit)}."
            )
    return sentences


def write_report(metrics: dict, path, plot_name: str = "entropy_vs_position.png") -> None:
    """report.md: command, config, result tables, the plot and a computed interpretation."""
    config, variants = metrics["config"], metrics["variants"]
    train_len, eval_len = config["train_len"], config["eval_len"]
    interpretation = (
        perplexity_sentences(variants, train_len, eval_len) + entropy_sentences(variants, train_len)
        + needle_sentences(variants) + generation_sentences(variants) + drift_sentences(variants)
    )
    blocks = [
        "# Needle experiment: length extrapolation and attention entropy",
        f"Trained at {train_len} tokens, evaluated at {eval_len}. Made by:",
        f"```\n{metrics['command']}\n```",
        "## Encodings",
        "\n".join(encoding_lines(variants)),
        "## Configuration",
        config_table(config),
        *variant_tables(variants, train_len, eval_len),
        "## Entropy against position",
        f"![attention entropy against query position]({plot_name})",
        f"Lines are means over all layer × head curves, bands their {BAND[0]}th–{BAND[1]}th percentiles; "
        "the dashed line marks the training length. Nothing is smoothed.",
        *sweep_blocks(metrics.get("sweep") or {"lengths": [], "results": {}, "seeds": []}, train_len),
        "## Interpretation",
        "Computed from the numbers above.",
        "\n".join(f"- {sentence}" for sentence in interpretation),
    ]
    write_text(path, "\n\n".join(blocks) + "\n")
