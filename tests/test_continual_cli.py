"""`mempos continual` end to end: outputs, exact resume, a real forgetting effect, bad input."""

import functools
import shutil
import json

import pytest

import mempos.data as data_module
from mempos.experiments.cli import main
from mempos.agent.results import summarise
from mempos.experiments.continual import PRESETS, build_run, parse_variant, run_continual, validate
from mempos.models import tokenizer_from_json

OUTPUTS = ["config.json", "metrics.json", "report.md", "R_naive.png", "R_replay.png", "forgetting.png",
           "interference.png", "tokenizer.json", "modules/naive-seed0.json", "modules/replay-seed0.json",
           "checkpoints/naive-seed0/latest.json", "checkpoints/replay-seed0/task-001/model.pt"]


@pytest.fixture(scope="module", autouse=True)
def corpus_read_once():
    """The smoke stream's language-modelling task and the tokenizer read the embedded corpus (~2 s each
    time it is built from Python's docstrings); build it once for this module."""
    original = data_module.embedded_corpus
    data_module.embedded_corpus = functools.lru_cache(maxsize=1)(original)
    yield
    data_module.embedded_corpus = original


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, corpus_read_once):
    out = tmp_path_factory.mktemp("continual") / "run"
    assert main(["continual", "--preset", "smoke", "--out", str(out), "--jobs", "2"]) == 0  # in worker processes
    return out


def copy_forgetting(metrics, variant, seed):
    """Max-based forgetting of the first task (copy) in NLL, nats/token (> 0: its NLL rose)."""
    return metrics["variants"][variant]["runs"][str(seed)]["summary"]["nll"]["per_task"]["forgetting_max"][0]


def test_smoke_run_writes_every_output(smoke_run):
    for name in OUTPUTS:
        assert (smoke_run / name).is_file(), name
    assert not list(smoke_run.glob("**/*.part")), "a temporary file was left behind"
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    smoke = PRESETS["smoke"]
    assert metrics["command"] == f"mempos continual --preset smoke --out {smoke_run} --jobs 2"
    assert list(metrics["variants"]) == ["naive", "replay"] and metrics["seeds"] == [0]
    assert [t["name"] for t in metrics["tasks"]] == ["copy", "lm_embedded"]
    run = metrics["variants"]["replay"]["runs"]["0"]
    assert len(run["episodes"]) == 2 * smoke.episodes_per_task
    assert all(e["replayed"] == 0 for e in run["episodes"][:smoke.episodes_per_task])
    assert all(e["replayed"] == smoke.batch_size for e in run["episodes"][smoke.episodes_per_task:])
    em, nll = run["R"]["em"], run["R"]["nll"]
    assert em[0][1] is None and em[1][1] is None  # no exact match for language modelling
    assert all(v > 0 for row in nll for v in row)
    # the untrained model is near uniform over the vocabulary; training on copy lowers copy's NLL well below it
    assert run["baseline"]["nll"][0] > 5.5 and nll[0][0] < 3.5
    assert len(run["interference"]) == smoke.episodes_per_task // smoke.interference_every
    summary = metrics["variants"]["naive"]["summary"]
    assert summary["nll"]["forgetting_max"]["mean"] == copy_forgetting(metrics, "naive", 0)
    report = (smoke_run / "report.md").read_text()
    assert "| naive |" in report and "| replay |" in report and "![R for replay](R_replay.png)" in report
    assert "forgets" in report and "Chaudhry" in report
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["format"] == "mempos-continual/1" and config["config"]["tasks"] == smoke.tasks
    assert (smoke_run / "R_naive.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    graph = json.loads((smoke_run / "modules/replay-seed0.json").read_text())
    assert sum(node["n_slots"] for node in graph["nodes"]) == 2 * smoke.episodes_per_task * smoke.exemplars_per_episode


def test_killed_run_resumes_to_exactly_the_uninterrupted_metrics(smoke_run, tmp_path, capsys):
    """Replay: the resumed run must restore weights, optimizer moments, the memory bank and the generator
    that draws replayed exemplars; compared with replay in the uninterrupted smoke run."""
    out = tmp_path / "killed"
    cfg = PRESETS["smoke"].replace(out=str(out), variants=["replay"])
    assert run_continual(cfg, command="killed", stop_after_task=0, progress=False) is None
    assert (out / "checkpoints/replay-seed0/task-000/memory/manifest.json").is_file()
    assert json.loads((out / "checkpoints/replay-seed0/latest.json").read_text())["next_step"] == cfg.episodes_per_task
    assert not (out / "metrics.json").exists() and not (out / "runs").exists()
    assert main(["continual", "--resume", str(out)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    whole = json.loads((smoke_run / "metrics.json").read_text())
    assert resumed["variants"]["replay"] == whole["variants"]["replay"]  # every number but wall-clock times
    assert resumed["command"] == "killed" and list(resumed["variants"]) == ["replay"]


def test_worker_processes_give_exactly_the_metrics_of_one_process(smoke_run, tmp_path, capsys):
    import torch

    out = tmp_path / "one"
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as a user's process has (the test session runs on one thread)
    try:
        assert main(["continual", "--preset", "smoke", "--out", str(out), "--jobs", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    alone = json.loads((out / "metrics.json").read_text())
    pooled = json.loads((smoke_run / "metrics.json").read_text())
    assert alone["variants"] == pooled["variants"]  # every number but wall-clock times
    assert "worker processes" not in capsys.readouterr().out


def test_naive_forgets_the_first_task_and_replay_forgets_much_less(smoke_run, capsys):
    """Copy's answer NLL after the language-modelling task: naive fine-tuning loses it, replay keeps most of it.
    Seeds 0-5 gave naive 2.0-7.8 and replay 0.12-0.46 nats/token while this test was written."""
    seed0 = json.loads((smoke_run / "metrics.json").read_text())
    found = {(v, 0): copy_forgetting(seed0, v, 0) for v in ("naive", "replay")}
    cfg = PRESETS["smoke"].replace(seed=1)
    tasks, variants = validate(cfg)
    tokenizer = tokenizer_from_json((smoke_run / "tokenizer.json").read_text())
    for variant in variants:  # seed 1 without the folder: the run alone
        metrics = build_run(cfg, tasks, tokenizer, variant, seed=1).run()
        found[variant.label, 1] = summarise(metrics)["nll"]["per_task"]["forgetting_max"][0]
    # off a terminal, progress is one line per task boundary, with the row of R just measured
    lines = capsys.readouterr().err.splitlines()
    assert len([line for line in lines if " done after " in line]) == 4, lines
    assert any(line.startswith("replay") and "task 2/2 (lm_embedded) done" in line and "NLL copy " in line
               for line in lines), lines
    for seed in (0, 1):
        naive, replay = found["naive", seed], found["replay", seed]
        assert naive > 1.5, (seed, naive)
        assert replay < naive - 1.0 and replay < naive / 3, (seed, naive, replay)


def one_line_error(capsys, argv, match):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]


@pytest.mark.parametrize("extra, match", [
    (["--tasks", "copy,nosuch"], "unknown task 'nosuch'"),
    (["--strategy", "magic"], "unknown strategy 'magic'"),
    (["--compare", "naive;replay+time"], "unknown fingerprint axis 'time'"),
    (["--compare", "naive;;replay"], "--compare needs variants"),
    (["--compare", "replay:ratio=-1"], "replay ratio must be between 0 and 100"),
    (["--compare", "replay:ratio=nan"], "option ratio must be a finite number"),
    (["--compare", "naive;ewc:lambda=inf"], "option lambda must be a finite number"),
    (["--compare", "replay:ratio=1:ratio=2"], "option 'ratio' is given twice"),
    (["--compare", "replay;replay:ratio=1.0"], "are the same run"),
    (["--replay-ratio", "nan"], "--replay-ratio must be between 0 and 100"),
    (["--lr", "1e300"], "--lr must be between 0 and 10"),
    (["--context-len", "99999999999999999999"], "--context-len must be between 1 and 131072"),
    (["--episodes-per-task", "99999999999999999999"], "--episodes-per-task must be between"),
    (["--fingerprint-stride", "1e300"], "--fingerprint-stride must be between"),
    (["--seeds", "0,,1"], "--seeds has an empty entry"),
    (["--tasks", "copy:"], "ends in ':'"),
    (["--out", " "], "--out must not be empty"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--fingerprints", "slot"], "--fingerprints goes with --strategy"),
    (["--strategy", "naive", "--compare", "replay"], "not both"),
    (["--context-len", "8"], "longer than --context-len 8"),
    (["--seeds", "0,x"], "--seeds takes comma-separated whole numbers"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, extra, match):
    out = tmp_path / "out"
    one_line_error(capsys, ["continual", "--preset", "smoke", "--out", str(out), *extra], match)
    assert not out.exists()


def test_bad_jsonl_task_is_refused_before_anything_is_written(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", answer}\n')
    out = tmp_path / "out"
    one_line_error(capsys, ["continual", "--preset", "smoke", "--tasks", f"copy,jsonl:{bad}", "--out", str(out)],
                   "bad.jsonl:2: not valid JSON")
    assert not out.exists()


def test_occupied_out_folder_and_bad_resume_are_refused(capsys, tmp_path, smoke_run):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line_error(capsys, ["continual", "--preset", "smoke", "--out", str(busy)], "already holds files")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    one_line_error(capsys, ["continual", "--resume", str(busy)], "not a mempos continual run")
    one_line_error(capsys, ["continual", "--resume", str(tmp_path / "nowhere")], "no such folder")
    one_line_error(capsys, ["continual", "--resume", str(smoke_run), "--seed", "3"], "--resume takes no other option")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_variant_syntax_and_help(capsys):
    cfg = PRESETS["smoke"].replace(replay_ratio=0.5)
    assert parse_variant("replay+fp", cfg).label == "replay+fp"
    variant = parse_variant("replay:ratio=0.25+pc+slot", cfg)
    assert (variant.label, variant.options["ratio"], variant.fingerprints) == (
        "replay:ratio=0.25+slot+pc", 0.25, ("slot", "pc"))
    assert parse_variant("replay", cfg).options["ratio"] == 0.5  # --replay-ratio is the default
    assert parse_variant("ewc:lambda=1000", cfg).options["lambda"] == 1000.0
    with pytest.raises(SystemExit) as exit_:
        main(["continual", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "STRATEGY[:key=value...][+AXIS...]" in text and "naive;replay;replay+fp" in text
    for name in ("naive", "replay", "ewc", "joint", "smoke", "tiny"):
        assert name in text


def test_memory_line_counts_modules_per_task_and_sharing():
    from mempos.experiments.continual import memory_line

    memory = {"slots": 120, "modules": 5, "modules_per_task": {"0": [0, 1], "1": [1, 2, 3], "2": [4]}}
    assert memory_line(memory, ["copy", "reverse", "sort"]) == (
        "Memory (first seed): 120 slots in 5 modules; copy 2 modules, "
        "reverse 3 modules (1 also holds an earlier task's episodes), sort 1 module.")


@pytest.mark.parametrize("damage, match", [
    (lambda run: (run / "runs/naive-seed0.json").write_text("{not json"), "naive-seed0.json is damaged"),
    (lambda run: (run / "checkpoints/replay-seed0/task-001/optimizer.pt").write_bytes(b"\x80garbage" * 8),
     "cannot resume from"),
    (lambda run: (run / "checkpoints/replay-seed0/task-001/state.json").write_text("[]"), "cannot resume from"),
    (lambda run: (run / "checkpoints/replay-seed0/latest.json").write_text('{"boundary": "/tmp/elsewhere"}'),
     "not a boundary of this run"),
    (lambda run: (run / "config.json").write_text(
        json.dumps(json.loads((run / "config.json").read_text()) | {"config": []})), "config.json is damaged"),
    (lambda run: (run / "config.json").write_text(json.dumps(
        (lambda c: c | {"config": c["config"] | {"lr": "fast"}})(json.loads((run / "config.json").read_text())))),
     "config.json holds a setting no run accepts"),
])
def test_a_damaged_run_folder_is_refused_on_resume_in_one_line(capsys, tmp_path, smoke_run, damage, match):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "runs/replay-seed0.json").unlink()  # replay resumes from its checkpoints, naive is read back
    damage(run)
    one_line_error(capsys, ["continual", "--resume", str(run)], match)
