"""`mempos bench`: comparison logic, baseline files, determinism, and the smoke suite itself.

The smoke suite runs once per session (`smoke_suite`) and is compared with the
committed baseline, one test per figure (`-m needle_regression` selects just
those). A deliberately broken encoding must make the suite fail.
"""

import copy
import json
import math

import pytest

from mempos.encodings import ENCODINGS
from mempos.errors import UsageError
from mempos.experiments import bench
from mempos.experiments.bench import (
    CHANGED, IMPROVED, MISSING, NEW, OK, REGRESSION, BaselineError, Row, compare, exit_status, judge,
    load_baseline, new_baseline, parse_baseline,
)
from mempos.experiments.cli import main

SMOKE = bench.SIZES["smoke"]
SMOKE_BASELINE = bench.baseline_path("smoke")


def entry(value, tolerance, higher=True):
    return {"value": value, "tolerance": tolerance, "higher_is_better": higher}


BASELINE = {
    "benchmark_version": bench.BENCHMARK_VERSION,
    "size": "smoke",
    "tolerances": {"method": "hand-made for the tests"},
    "figures": {
        "rope/accuracy@64": entry(0.5, {"abs": 0.1}),
        "rope/ppl@64": entry(200.0, {"rel": 0.05}, higher=False),
        "rope/entropy_beyond@256": entry(0.8, {"abs": 0.03}, higher=None),
        "alibi/accuracy@64": entry(0.25, {"abs": 0.1}),
    },
}
NOW = {"rope/accuracy@64": 0.5, "rope/ppl@64": 200.0, "rope/entropy_beyond@256": 0.8, "alibi/accuracy@64": 0.25}


def verdicts(rows):
    return {row.figure: row.verdict for row in rows}


# --- comparison on hand-made pairs ------------------------------------------------------


def test_all_within_tolerance_passes():
    now = {"rope/accuracy@64": 0.55, "rope/ppl@64": 209.0, "rope/entropy_beyond@256": 0.775,
           "alibi/accuracy@64": 0.15}  # every move inside (or exactly at) its tolerance
    rows = compare(BASELINE, now)
    assert set(verdicts(rows).values()) == {OK} and exit_status(rows) == 0
    assert [r.figure for r in rows] == list(BASELINE["figures"])


def test_worse_beyond_tolerance_is_a_regression():
    now = NOW | {"rope/accuracy@64": 0.35, "rope/ppl@64": 211.0}
    rows = compare(BASELINE, now)
    assert verdicts(rows) == {"rope/accuracy@64": REGRESSION, "rope/ppl@64": REGRESSION,
                              "rope/entropy_beyond@256": OK, "alibi/accuracy@64": OK}
    assert exit_status(rows) == 1
    row = rows[0]
    assert row.change == pytest.approx(-0.15) and row.tolerance == "±0.1"
    assert rows[1].tolerance == "±5%"


def test_better_beyond_tolerance_is_reported_but_passes():
    now = NOW | {"rope/accuracy@64": 0.9, "rope/ppl@64": 150.0}
    rows = compare(BASELINE, now)
    assert verdicts(rows)["rope/accuracy@64"] == IMPROVED and verdicts(rows)["rope/ppl@64"] == IMPROVED
    assert exit_status(rows) == 0
    assert [r.figure for r in bench.moved(rows)] == ["rope/accuracy@64", "rope/ppl@64"]


def test_a_figure_without_direction_that_moves_is_changed():
    for value in (0.75, 0.85):
        rows = compare(BASELINE, NOW | {"rope/entropy_beyond@256": value})
        assert verdicts(rows)["rope/entropy_beyond@256"] == CHANGED and exit_status(rows) == 1


def test_missing_figure_fails_and_new_figure_does_not():
    now = {k: v for k, v in NOW.items() if k != "alibi/accuracy@64"}
    rows = compare(BASELINE, now)
    assert verdicts(rows)["alibi/accuracy@64"] == MISSING and exit_status(rows) == 1
    rows = compare(BASELINE, NOW | {"rope/accuracy@1024": 0.1})
    assert verdicts(rows)["rope/accuracy@1024"] == NEW and exit_status(rows) == 0


def test_comparison_can_be_restricted_to_encodings():
    rows = compare(BASELINE, {"rope/accuracy@64": 0.5, "rope/ppl@64": 200.0, "rope/entropy_beyond@256": 0.8},
                   encodings=["rope"])
    assert [r.figure for r in rows] == ["rope/accuracy@64", "rope/ppl@64", "rope/entropy_beyond@256"]
    assert exit_status(rows) == 0


def test_unmeasurable_figures():
    assert judge(entry(None, {"abs": 0.1}), math.nan) == OK
    assert judge(entry(0.5, {"abs": 0.1}), math.nan) == REGRESSION
    assert judge(entry(0.5, {"abs": 0.1}, higher=None), None) == CHANGED
    assert judge(entry(None, {"abs": 0.1}), 0.3) == REGRESSION


def test_relative_tolerance_of_a_zero_baseline_is_zero():
    assert judge(entry(0.0, {"rel": 0.5}), 0.0) == OK
    assert judge(entry(0.0, {"rel": 0.5}), 0.01) == IMPROVED


def test_rows_render_as_markdown_and_json():
    rows = compare(BASELINE, NOW | {"rope/accuracy@64": 0.3})
    text = bench.rows_table(rows)
    assert "| rope/accuracy@64 | 0.5 | 0.3 | -0.2 | ±0.1 | REGRESSION |" in text
    assert bench.summary_line(rows) == "FAIL: 4 figures (3 ok, 1 REGRESSION)"
    assert rows[0].as_dict() == {"figure": "rope/accuracy@64", "baseline": 0.5, "now": 0.3,
                                 "change": pytest.approx(-0.2), "tolerance": "±0.1", "verdict": REGRESSION}
    assert Row("x/ppl@1", None, math.nan, NEW).as_dict()["now"] is None


# --- baseline files ----------------------------------------------------------------------


def test_baseline_round_trip(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(BASELINE))
    assert load_baseline(path, "smoke") == BASELINE


@pytest.mark.parametrize("size", sorted(bench.SIZES))
def test_every_size_ships_a_baseline_covering_every_encoding(size):
    baseline = load_baseline(bench.baseline_path(size), size)
    measured = {bench.figure_encoding(name) for name in baseline["figures"]}
    assert measured == set(ENCODINGS)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b.pop("benchmark_version"), "no integer 'benchmark_version'"),
    (lambda b: b.update(benchmark_version=bench.BENCHMARK_VERSION + 1), "benchmark version"),
    (lambda b: b.update(size="tiny"), "is for size 'tiny'"),
    (lambda b: b.update(figures={}), "non-empty"),
    (lambda b: b["figures"]["rope/accuracy@64"].update(tolerance={"abs": 0.1, "rel": 0.1}), "tolerance"),
    (lambda b: b["figures"]["rope/accuracy@64"].update(tolerance={"pct": 5}), "tolerance"),
    (lambda b: b["figures"]["rope/accuracy@64"].update(tolerance={"abs": -1}), ">= 0"),
    (lambda b: b["figures"]["rope/accuracy@64"].update(value="high"), "numeric 'value'"),
    (lambda b: b["figures"]["rope/accuracy@64"].update(higher_is_better="yes"), "higher_is_better"),
])
def test_malformed_or_foreign_baselines_are_refused(mutate, message):
    broken = copy.deepcopy(BASELINE)
    mutate(broken)
    with pytest.raises(BaselineError, match=message):
        parse_baseline(broken, "smoke")


def test_unreadable_baseline_files(tmp_path):
    with pytest.raises(BaselineError, match="no baseline at"):
        load_baseline(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BaselineError, match="not valid JSON"):
        load_baseline(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(BaselineError, match="JSON object"):
        load_baseline(tmp_path / "list.json")
    assert issubclass(BaselineError, UsageError)  # the command line turns it into one line and exit 2


def test_new_baseline_uses_the_rule_and_can_replace_one_encoding():
    rule = bench.TOLERANCE_RULES["smoke"]
    made = new_baseline({"rope/accuracy@64": 0.7, "rope/ppl@64": math.nan}, "smoke", rule, {"method": "m"},
                        old=BASELINE, encodings=["rope"])
    parse_baseline(made, "smoke")
    assert made["figures"]["rope/accuracy@64"] == {"value": 0.7, "tolerance": rule["accuracy"], "higher_is_better": True}
    assert made["figures"]["rope/ppl@64"]["value"] is None  # NaN is stored as null (valid JSON)
    assert made["figures"]["alibi/accuracy@64"] == BASELINE["figures"]["alibi/accuracy@64"]  # kept
    assert "rope/entropy_beyond@256" not in made["figures"]  # rope's figures were replaced as a whole


def test_calibrated_rule_is_a_multiple_of_the_largest_move_with_floors():
    reference = {"a/accuracy@64": 0.5, "b/accuracy@64": 0.5, "a/ppl@64": 100.0, "a/entropy_inside@256": 0.5}
    runs = [{"a/accuracy@64": 0.6, "b/accuracy@64": 0.5, "a/ppl@64": 102.0, "a/entropy_inside@256": 0.5}]
    floors = {"accuracy": {"abs": 0.05}, "ppl": {"rel": 0.01}, "entropy_inside": {"abs": 0.005}}
    rule, stats = bench.calibrated_rule(reference, runs, floors, multiplier=2.0)
    # accuracy: largest move 0.1 -> 0.2; ppl 2% -> 4% relative; entropy did not move -> its floor
    assert rule == {"accuracy": {"abs": pytest.approx(0.2)}, "ppl": {"rel": pytest.approx(0.04)},
                    "entropy_inside": {"abs": 0.005}}
    assert stats["accuracy"] == {"max_deviation": pytest.approx(0.1), "p90_deviation": pytest.approx(0.09),
                                 "figures": 2}
    assert bench.round_up(0.03153 * 2) == 0.064 and bench.round_up(0.1229) == 0.13 and bench.round_up(0.0) == 0.0


def test_calibration_note_takes_tolerances_from_the_rounding_run_only():
    reference = {"a/needle_mass@64": 0.3}
    runs = [{"a/needle_mass@64": 0.31}, {"a/needle_mass@64": 0.1}]  # 2 threads, then a seed
    rule, note = bench.calibration_note(SMOKE, reference, runs, ["2 torch threads", "seed 1"])
    assert rule["needle_mass"] == {"abs": 0.02}
    assert note["spread"]["seed 1"]["needle_mass"]["max_deviation"] == pytest.approx(0.2)
    assert "2 torch threads" in note["method"] and note["rule"] == rule


# --- the command line --------------------------------------------------------------------


def write_figures(path, figures, size="smoke", version=bench.BENCHMARK_VERSION):
    path.write_text(json.dumps({"benchmark_version": version, "size": size, "figures": figures}))
    return path


def run_cli(*argv):
    """main()'s exit status, whether it returns it or raises SystemExit."""
    try:
        return main(list(argv))
    except SystemExit as e:
        return e.code


def test_cli_bad_input_exits_2_before_any_work(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{")
    assert run_cli("bench", "--baseline", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")) == 2
    assert "not valid JSON" in capsys.readouterr().err
    old = copy.deepcopy(BASELINE) | {"benchmark_version": 0}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert run_cli("bench", "--baseline", str(tmp_path / "old.json")) == 2
    err = capsys.readouterr().err
    assert "benchmark version 0" in err and err.count("\n") == 1 and "Traceback" not in err
    assert run_cli("bench", "--baseline", str(tmp_path / "absent.json")) == 2
    assert run_cli("bench", "--encodings", "rope,nope") == 2
    assert run_cli("bench", "--lengths", "64,128") == 2  # grid options only with --grid-only
    assert run_cli("bench", "--size", "huge") == 2
    assert not (tmp_path / "o").exists()


def test_cli_compares_saved_figures(tmp_path, capsys):
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps(BASELINE))
    out = tmp_path / "out"
    good = write_figures(tmp_path / "good.json", NOW)
    assert run_cli("bench", "--baseline", str(baseline), "--figures", str(good), "--out", str(out)) == 0
    assert "PASS: 4 figures (4 ok)" in capsys.readouterr().out
    assert json.loads((out / "comparison.json").read_text())["status"] == 0

    worse = write_figures(tmp_path / "worse.json", NOW | {"rope/accuracy@64": 0.1, "alibi/accuracy@64": 0.5})
    assert run_cli("bench", "--baseline", str(baseline), "--figures", str(worse), "--out", str(out)) == 1
    printed = capsys.readouterr().out
    assert "| rope/accuracy@64 | 0.5 | 0.1 | -0.4 | ±0.1 | REGRESSION |" in printed
    assert "| alibi/accuracy@64 | 0.25 | 0.5 | +0.25 | ±0.1 | improved |" in printed
    result = json.loads((out / "comparison.json").read_text())
    assert result["status"] == 1 and result["counts"][REGRESSION] == 1 and result["counts"][IMPROVED] == 1
    assert "## Figures that moved" in (out / "comparison.md").read_text()

    foreign = write_figures(tmp_path / "tiny.json", NOW, size="tiny")
    assert run_cli("bench", "--baseline", str(baseline), "--figures", str(foreign)) == 2


def test_cli_update_baseline_writes_a_valid_file_and_shows_changes(tmp_path, capsys):
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps(BASELINE))
    moved = write_figures(tmp_path / "moved.json", NOW | {"rope/accuracy@64": 0.9})
    assert run_cli("bench", "--baseline", str(baseline), "--figures", str(moved), "--update-baseline",
                   "--out", str(tmp_path / "o")) == 0
    assert "| rope/accuracy@64 | 0.5 | 0.9 | +0.4 | ±0.1 | improved |" in capsys.readouterr().out
    written = load_baseline(baseline, "smoke")
    assert written["figures"]["rope/accuracy@64"]["value"] == 0.9
    assert written["tolerances"] == BASELINE["tolerances"]  # how tolerances were set travels along
    assert not list(tmp_path.glob(".*.part"))
    # and now the same figures hold
    assert run_cli("bench", "--baseline", str(baseline), "--figures", str(moved), "--out", str(tmp_path / "o")) == 0


def test_update_baseline_never_overwrites_a_file_that_is_not_a_baseline_of_that_size(tmp_path, capsys):
    moved = write_figures(tmp_path / "moved.json", NOW)
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(BASELINE | {"size": "tiny"}))
    for target, match in ((notes, "not a mempos bench baseline"), (tiny, "is the 'tiny' baseline"),
                          (tmp_path, "not a mempos bench baseline")):
        before = target.read_text() if target.is_file() else None
        assert run_cli("bench", "--baseline", str(target), "--figures", str(moved), "--update-baseline",
                       "--out", str(tmp_path / "o")) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
        assert before is None or target.read_text() == before
    # an older benchmark version is what --update-baseline replaces
    old = tmp_path / "old.json"
    old.write_text(json.dumps(BASELINE | {"benchmark_version": 0}))
    assert run_cli("bench", "--baseline", str(old), "--figures", str(moved), "--update-baseline",
                   "--out", str(tmp_path / "o")) == 0
    assert load_baseline(old, "smoke")["benchmark_version"] == bench.BENCHMARK_VERSION


def test_figures_and_tolerances_must_be_numbers(tmp_path, capsys):
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps(BASELINE))
    text = write_figures(tmp_path / "text.json", NOW | {"rope/accuracy@64": "high"})
    assert run_cli("bench", "--baseline", str(baseline), "--figures", str(text), "--out", str(tmp_path / "o")) == 2
    assert "is 'high', not a number" in capsys.readouterr().err
    endless = copy.deepcopy(BASELINE)
    endless["figures"]["rope/accuracy@64"]["tolerance"] = {"abs": math.inf}
    with pytest.raises(BaselineError, match="finite number"):
        parse_baseline(endless, "smoke")


# --- determinism and the suite itself ----------------------------------------------------

# A small part of the smoke benchmark: a few training steps, a small grid.
PART = SMOKE.replace(train_contexts=48, multiples=(1, 2), depths=(0.0, 1.0), per_cell=2, text_sequences=1)


@pytest.fixture(scope="module")
def part_data():
    with bench.deterministic():
        return bench.build_data(PART)


def test_the_same_run_gives_identical_figures(part_data):
    first = bench.run_encoding("rope", PART, part_data, quiet=True)["figures"]
    again = bench.run_encoding("rope", PART, part_data, quiet=True)["figures"]
    assert first == again and len(first) == 2 + 2 + 2 * 4


def test_data_are_rebuilt_identically(part_data):
    with bench.deterministic():
        again = bench.build_data(PART)
    assert again.tokenizer_json == part_data.tokenizer_json
    assert again.train_chunks.equal(part_data.train_chunks) and again.text_ids.equal(part_data.text_ids)
    assert again.cells == part_data.cells


def _smoke_figure_names():
    try:
        return list(json.loads(SMOKE_BASELINE.read_text())["figures"])
    except (OSError, ValueError, KeyError):
        return ["<no committed smoke baseline>"]


@pytest.fixture(scope="session")
def smoke_suite():
    """The whole smoke benchmark, once per test session."""
    return bench.run_suite(SMOKE, list(ENCODINGS), jobs=bench.default_jobs())


@pytest.fixture(scope="session")
def smoke_rows(smoke_suite):
    return {row.figure: row for row in compare(load_baseline(SMOKE_BASELINE, "smoke"), smoke_suite["figures"])}


@pytest.mark.needle_regression
@pytest.mark.parametrize("figure", _smoke_figure_names())
def test_smoke_figure_holds(smoke_rows, figure):
    row = smoke_rows[figure]
    assert row.verdict not in bench.FAILING, (
        f"{figure}: baseline {row.baseline}, now {row.now} (tolerance {row.tolerance}): {row.verdict}"
    )


@pytest.mark.needle_regression
def test_smoke_suite_measures_exactly_the_baseline_figures(smoke_suite, smoke_rows):
    committed = load_baseline(SMOKE_BASELINE, "smoke")["figures"]
    assert set(smoke_suite["figures"]) == set(committed)
    assert not [row.figure for row in smoke_rows.values() if row.verdict in (NEW, MISSING)]
    assert exit_status(list(smoke_rows.values())) == 0


def test_workers_give_the_same_figures_as_one_process(part_data):
    alone = bench.run_suite(PART, ["rope", "alibi"], jobs=1, data=part_data)["figures"]
    pooled = bench.run_suite(PART, ["rope", "alibi"], jobs=2, data=part_data)["figures"]
    assert alone == pooled


def test_a_broken_encoding_fails_the_suite(tmp_path, monkeypatch, capsys):
    """Queries rotated as if positions ran backwards while keys are not: relative offsets become
    (T - 1 - i) - j, which no training can absorb. The suite must report the moved figures."""
    from mempos.encodings.rotary import Rotary

    rotate = Rotary.rotate

    def reversed_queries(self, q, k, q_pos, k_pos):
        return rotate(self, q, k, k_pos.max() - q_pos, k_pos)

    monkeypatch.setattr(Rotary, "rotate", reversed_queries)
    out = tmp_path / "out"
    assert run_cli("bench", "--encodings", "rope", "--jobs", "1", "--out", str(out)) == 1
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    failed = {row["figure"] for row in result["rows"] if row["verdict"] in bench.FAILING}
    assert result["status"] == 1 and all(name.startswith("rope/") for name in failed)
    assert EXPECTED_TO_MOVE <= failed, f"moved: {sorted(failed)}"
    for name in EXPECTED_TO_MOVE:
        assert f"| {name} |" in printed


# what the broken encoding moves beyond tolerance, measured: needle mass 0.26 -> 0.06 and retrieval heads
# 0.39 -> 0.04 at 64 tokens, normalised entropy 0.69 -> 0.91 (and perplexity *improves*: absolute position
# leaks in, which is why a figure without a better direction must fail on any large move)
EXPECTED_TO_MOVE = {"rope/needle_mass@64", "rope/retrieval_heads@64",
                    "rope/entropy_inside@256", "rope/entropy_beyond@256"}


def test_grid_only_writes_heatmaps_and_a_ranking(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.SIZES, "smoke", PART)  # a few training steps: this checks outputs, not models
    out = tmp_path / "grid"
    assert run_cli("bench", "--grid-only", "--encodings", "rope,alibi", "--jobs", "1", "--lengths", "64,256",
                   "--depths", "0,0.5,1", "--per-cell", "1", "--out", str(out)) == 0
    grid = json.loads((out / "grid.json").read_text())
    cells = grid["cells"]["rope"]
    assert [(c["length"], c["depth"]) for c in cells] == [(64, 0.0), (64, 0.5), (64, 1.0), (256, 0.0), (256, 0.5),
                                                           (256, 1.0)]
    assert all(0 <= c["accuracy"] <= 1 and 0 <= c["needle_mass"] <= 1 and "entropy_10-99" in c for c in cells)
    for name in ("rope", "alibi"):
        assert (out / f"heatmap-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![accuracy against length](grid.png)" in (out / "grid.md").read_text()
    report = (out / "grid.md").read_text()
    assert "## Ranking by accuracy at 4x and 8x" in report and "| 64 (1x) | 256 (4x) |" in report
    assert "![rope](heatmap-rope.png)" in report
    assert "| rank | encoding |" in capsys.readouterr().out
    assert not (out / "comparison.json").exists()
    assert run_cli("bench", "--grid-only", "--depths", "0,2") == 2
