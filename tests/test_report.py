"""The plot is a real PNG; the report carries the numbers and says what they say."""

from __future__ import annotations

import copy

import numpy as np

from mempos.experiments.report import plot_entropy, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_curves(collapse: float, length: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Heads near-uniform inside the window whose normalised entropy drops by `collapse` beyond 16."""
    rng = np.random.default_rng(seed)
    positions = np.arange(length)
    normalised = 0.8 + 0.1 * rng.standard_normal((2, 4, 1)) - collapse * (positions >= 16)
    raw = normalised * np.log2(positions + 1)
    normalised[..., 0] = np.nan
    return {"raw": raw, "normalised": normalised, "generated_normalised": normalised - 0.05}


def scalars(**overrides) -> dict:
    values = {
        "ppl_train_len": 40.0, "ppl_eval_len": 80.0, "ppl_128": 40.0, "ppl_512": 80.0,
        "entropy_raw_inside": 3.5, "entropy_raw_beyond": 6.0,
        "entropy_norm_inside": 0.6, "entropy_norm_beyond": 0.45,
        "needle_mass": 0.03, "needle_mass_inside": 0.05, "needle_mass_beyond": 0.02,
        "needle_mass_uniform": 0.01, "needle_mass_uniform_inside": 0.02, "needle_mass_uniform_beyond": 0.005,
        "repetition_generated": 0.5, "repetition_reference": 0.1,
        "generated_entropy_norm_inside": 0.55, "generated_entropy_norm_beyond": 0.3,
        "train": {"final_loss": 3.21, "seconds": 12.5, "steps": 300},
    }
    values.update(overrides)
    return values


def metrics(variants: dict[str, dict]) -> dict:
    return {
        "config": {"preset": "tiny", "model": "gpt2-tiny", "data": "embedded", "train_len": 128, "eval_len": 512,
                   "seed": 0, "encodings": list(variants), "epochs": 1, "lr": 0.001, "batch_size": 8},
        "command": "mempos needle --preset tiny --out runs/x",
        "variants": variants,
    }


def report_text(tmp_path, variants: dict[str, dict]) -> str:
    path = tmp_path / "report.md"
    write_report(metrics(variants), path)
    return path.read_text()


def test_plot_writes_png(tmp_path):
    path = tmp_path / "plots" / "entropy_vs_position.png"
    plot_entropy({"learned": synthetic_curves(0.0), "rope": synthetic_curves(0.3, seed=1),
                  "si_rope": synthetic_curves(-0.1, seed=2)}, train_len=16, path=path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["entropy_vs_position.png"]  # no temp file left


def test_plot_without_generated_curves(tmp_path):
    curves = synthetic_curves(0.2)
    del curves["generated_normalised"]
    path = tmp_path / "entropy.png"
    plot_entropy({"rope": curves}, train_len=16, path=path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_report_tables_carry_the_numbers(tmp_path):
    text = report_text(tmp_path, {"rope": scalars(), "learned": scalars(ppl_eval_len=400.0)})
    assert "```\nmempos needle --preset tiny --out runs/x\n```" in text
    assert "| variant | ppl @ 128 | ppl @ 512 | ratio 512/128 |" in text
    assert "| rope | 40 | 80 | 2 |" in text
    assert "| learned | 40 | 400 | 10 |" in text
    assert "| rope | 0.03 | 0.01 | 3 | 0.05 | 0.02 | 0.02 | 0.005 |" in text  # needle mass vs uniform
    assert "| rope | 0.5 | 0.1 |" in text  # repetition generated vs reference
    assert "| rope | 3.5 | 6 | 0.6 | 0.45 | 0.55 | 0.3 |" in text
    assert "| rope | 3.21 | 12.5 | 300 |" in text
    assert "![attention entropy against query position](entropy_vs_position.png)" in text
    assert "rope extrapolates best and learned worst" in text


def test_log_warp_statement_only_when_si_rope_ran(tmp_path):
    with_log = report_text(tmp_path, {"rope": scalars(), "si_rope": scalars()})
    assert "(1+j)/(1+i)" in with_log
    assert "not on the distance j - i" in with_log
    assert "f(a·i) ≠ a·f(i)" in with_log and "f(a·i) ≈ f(i) + log a" in with_log
    assert "(1+j)/(1+i)" not in report_text(tmp_path, {"rope": scalars()})


def test_interpretation_follows_the_numbers(tmp_path):
    falls = report_text(tmp_path, {"rope": scalars(entropy_norm_inside=0.6, entropy_norm_beyond=0.45)})
    rises = report_text(tmp_path, {"rope": scalars(entropy_norm_inside=0.5, entropy_norm_beyond=0.6)})
    assert "normalised attention entropy falls by 0.15 (-25.0%) from 0.6" in falls
    assert "concentrates on relatively fewer keys" in falls
    assert "normalised attention entropy rises by 0.1 (+20.0%) from 0.5" in rises
    assert "spreads more evenly" in rises
    steady = report_text(tmp_path, {"rope": scalars(entropy_norm_beyond=0.603, needle_mass=0.01005,
                                                    repetition_generated=0.105)})
    assert "normalised attention entropy changes by less than 1% (+0.50%)" in steady
    assert "keeps about the same relative spread" in steady
    assert "(about at it)" in steady and "repeat about as much as the reference" in steady

    above = report_text(tmp_path, {"rope": scalars()})
    below = report_text(tmp_path, {"rope": scalars(needle_mass=0.005, repetition_generated=0.05)})
    assert "0.03, 3× the uniform baseline 0.01 (above it)" in above
    assert "0.005, 0.5× the uniform baseline 0.01 (below it)" in below
    assert "its generations loop more than the reference" in above
    assert "its generations loop less than the reference" in below


def test_best_extrapolator_is_picked_by_ratio(tmp_path):
    variants = {"learned": scalars(ppl_train_len=30.0, ppl_eval_len=60.0),
                "rope": scalars(ppl_train_len=40.0, ppl_eval_len=200.0),
                "si_rope": scalars(ppl_train_len=50.0, ppl_eval_len=75.0)}
    text = report_text(tmp_path, variants)
    assert "si_rope extrapolates best and rope worst; best to worst: si_rope (1.500), learned (2.000), rope (5.000)" in text
    assert "The lowest perplexity at 512 tokens is nevertheless learned's (60): it starts lower at 128 tokens than si_rope" in text
    swapped = copy.deepcopy(variants)
    swapped["rope"].update(ppl_eval_len=44.0)
    assert "rope extrapolates best and learned worst" in report_text(tmp_path, swapped)
    swapped["si_rope"].update(ppl_eval_len=55.2)  # ratio 1.104 vs rope's 1.1
    assert "rope and si_rope extrapolate best (ratios within 1% of each other) and learned worst" in (
        report_text(tmp_path, swapped))
    swapped["learned"].update(ppl_eval_len=33.1)
    assert "all variants extrapolate about equally" in report_text(tmp_path, swapped)


def test_single_variant_and_missing_numbers(tmp_path):
    text = report_text(tmp_path, {"learned": scalars(entropy_norm_beyond=float("nan"), ppl_eval_len=36.0)})
    assert "learned: perplexity falls by 4 (-10.0%) from 40 at 128 tokens to 36 at 512 (ratio 0.900)" in text
    assert "learned: no normalised entropy beyond position 128 was measured." in text
    assert "n/a" in text


def test_sweep_table_gives_mean_and_sample_sd_over_seeds(tmp_path):
    from mempos.experiments.report import plot_sweep, sweep_blocks

    sweep = {
        "lengths": [128, 512],
        "seeds": [0, 1],
        "results": {
            "rope": {"128": {"ppl": [10.0, 12.0], "entropy_norm": [0.5, 0.7]},
                     "512": {"ppl": [30.0, 34.0], "entropy_norm": [0.6, 0.6]}},
            "si_rope": {"128": {"ppl": [11.0, 11.0], "entropy_norm": [0.5, 0.5]},
                        "512": {"ppl": [20.0, 22.0], "entropy_norm": [0.55, 0.65]}},
        },
    }
    text = "\n".join(sweep_blocks(sweep, train_len=128))
    # mean 11, sample sd sqrt(((10-11)^2 + (12-11)^2) / 1) = 1.414
    assert "| rope | 11 ± 1.414 | 32 ± 2.828 |" in text
    assert "| si_rope | 11 ± 0 | 21 ± 1.414 |" in text
    assert "lowest mean perplexity is si_rope's (21); ranked: si_rope, rope" in text
    plot_sweep(sweep, 128, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_sentence_names_a_tie_and_a_single_seed():
    from mempos.experiments.report import sweep_blocks

    sweep = {"lengths": [64], "seeds": [0],
             "results": {"rope": {"64": {"ppl": [354.21], "entropy_norm": [0.5]}},
                         "si_rope": {"64": {"ppl": [354.18], "entropy_norm": [0.5]}}}}
    text = "\n".join(sweep_blocks(sweep, train_len=32))
    assert "one seed (0), so no spread" in text and "over seeds 0" not in text
    assert "si_rope and rope share the lowest mean perplexity (354.2 to the digits shown)" in text
