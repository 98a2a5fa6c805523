"""The needle experiment end to end: outputs, reload, bad input, several processes."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mempos.checkpoint import load_checkpoint
from mempos.data import chunk_tokens, load_text
from mempos.errors import UsageError
from mempos.experiments.cli import main
from mempos.experiments.evaluate import perplexity
from mempos.experiments.needle import build_data
from mempos.experiments.presets import PRESETS

OUTPUTS = ["config.json", "metrics.json", "curves.npz", "entropy_vs_position.png", "length_sweep.png", "report.md",
           "rope.pt", "si_rope.pt", "tokenizer/tokenizer.json"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("needle") / "run"
    assert main(["needle", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_every_output(smoke_run):
    for name in OUTPUTS:
        assert (smoke_run / name).is_file(), name
    assert not list(smoke_run.glob("**/*.part")), "a temporary file was left behind"
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    smoke = PRESETS["smoke"]
    assert metrics["command"].startswith("mempos needle --preset smoke")
    assert list(metrics["variants"]) == ["rope", "si_rope"]
    for scalars in metrics["variants"].values():
        for key in ("ppl_32", "ppl_128", "entropy_raw_inside", "entropy_norm_beyond", "needle_mass"):
            assert np.isfinite(scalars[key]), key
        assert scalars["train"]["losses"][-1] < scalars["train"]["losses"][0]
    # the training needles were recorded where they were put
    assert [n["chunk_index"] for n in metrics["data"]["needles"]] == list(range(0, smoke.max_train_chunks, smoke.needle_every))
    curves = np.load(smoke_run / "curves.npz")
    assert curves["rope/raw"].shape == (smoke.n_layer, smoke.n_head, smoke.eval_len)
    assert (smoke_run / "entropy_vs_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (smoke_run / "report.md").read_text()
    assert "| rope |" in report and "(1 + j)/(1 + i)" in report or "(1+j)/(1+i)" in report
    sweep = metrics["sweep"]
    assert sweep["lengths"] == smoke.sweep_lens and sweep["seeds"] == [0]
    for name in ("rope", "si_rope"):
        for length in smoke.sweep_lens:
            figures = sweep["results"][name][str(length)]
            assert len(figures["ppl"]) == 1 and np.isfinite(figures["ppl"][0]) and 0 < figures["entropy_norm"][0] <= 1
    # the sweep at the training length reads the same tokens as the detailed evaluation
    assert sweep["results"]["rope"]["32"]["ppl"][0] == pytest.approx(metrics["variants"]["rope"]["ppl_32"], rel=1e-9)
    assert "## Length sweep" in report
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["train_len"] == 32 and config["encodings"] == ["rope", "si_rope"]


@pytest.mark.parametrize("name", ["rope", "si_rope"])
def test_reloaded_checkpoint_reproduces_perplexity(smoke_run, name):
    model, tokenizer, meta = load_checkpoint(smoke_run / f"{name}.pt")
    cfg = PRESETS["smoke"]
    data = build_data(cfg, load_text(cfg.data), tokenizer)
    ppl = perplexity(model, chunk_tokens(data.eval_ids, cfg.train_len), cfg.eval_batch_size)
    recorded = json.loads((smoke_run / "metrics.json").read_text())["variants"][name]
    assert ppl == recorded["ppl_train_len"] == meta["metrics"]["ppl_train_len"]
    assert meta["encoding"] == name and model.config._attn_implementation == "mempos_sdpa"


def test_broken_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_non_empty_output_folder_is_kept(smoke_run, capsys):
    before = (smoke_run / "metrics.json").read_bytes()
    assert main(["needle", "--preset", "smoke", "--out", str(smoke_run)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (smoke_run / "metrics.json").read_bytes() == before


def bad_inputs(tmp: Path):
    empty = tmp / "empty.txt"
    empty.write_text("")
    binary = tmp / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 20)
    bad_gz = tmp / "bad.gz"
    bad_gz.write_bytes(b"\x1f\x8b\x08garbage")
    short = tmp / "short.txt.gz"
    with gzip.open(short, "wt") as handle:
        handle.write("too short to train on")
    return {
        "unknown preset": (["--preset", "huge"], "invalid choice"),
        "unknown encoding": (["--encodings", "rope,nope"], "unknown encoding 'nope'"),
        "missing model folder": (["--model", str(tmp / "no-model")], "no-model"),
        "missing data path": (["--data", str(tmp / "missing.txt")], "missing.txt"),
        "empty data file": (["--data", str(empty)], "empty"),
        "binary data file": (["--data", str(binary)], "binary"),
        "corrupt gzip": (["--data", str(bad_gz)], "bad.gz"),
        "text too short": (["--data", str(short)], "short"),
        "zero training length": (["--train-len", "0"], "--train-len must be between 1 and"),
        "negative eval length": (["--eval-len", "-4"], "--eval-len"),
        "not a number": (["--train-len", "ten"], "invalid int value"),
        "repeated seed": (["--seeds", "1,1"], "--seeds must name distinct seeds"),
        "bad seed list": (["--seeds", "one"], "--seeds takes comma-separated whole numbers"),
        "sweep length 0": (["--sweep-lens", "0,128"], "--sweep-lens"),
        "huge sweep length": (["--sweep-lens", "99999999999"], "--sweep-lens must be distinct lengths of 2 to"),
        "huge eval length": (["--eval-len", "99999999999"], "--eval-len must be between 1 and"),
        "overflowing lr": (["--lr", "1e300"], "--lr must be a positive number of at most 10"),
        "endless epochs": (["--epochs", "1e9"], "--epochs must be a positive number of at most"),
        "trailing comma": (["--encodings", "rope,"], "--encodings has an empty entry"),
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("/tmp"))))
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, case):
    args, expected = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(["needle", "--preset", "smoke", "--out", str(out), *args]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.lower() in err.lower(), err
    assert not out.exists(), "nothing may be written for bad input"


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mempos.experiments.cli", "needle", "--preset", "smoke",
         "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nothing-here.txt")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_two_processes_train_like_one(tmp_path, smoke_run):
    """`accelerate launch` with 2 CPU processes: the global batch is split, so training matches."""
    out = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "mempos.experiments.cli", "needle", "--preset", "smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    two = json.loads((out / "metrics.json").read_text())
    one = json.loads((smoke_run / "metrics.json").read_text())
    assert two["environment"]["processes"] == 2
    for name in ("rope", "si_rope"):
        assert two["variants"][name]["train"]["processes"] == 2
        np.testing.assert_allclose(two["variants"][name]["train"]["losses"], one["variants"][name]["train"]["losses"], rtol=1e-4)
        assert two["variants"][name]["ppl_train_len"] == pytest.approx(one["variants"][name]["ppl_train_len"], rel=1e-4)
