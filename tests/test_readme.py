"""The README stays in step with the code it describes."""

import re
from pathlib import Path

from mempos.encodings import ENCODINGS
from mempos.experiments.presets import PRESETS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_encoding_is_documented_with_its_summary():
    for spec in ENCODINGS.values():
        assert f"| `{spec.name}` | {spec.summary.replace('|', '/')} |" in README, spec.name


def test_every_preset_is_documented():
    for name in PRESETS:
        assert re.search(rf"^\| `{name}`", README, re.M), name


def test_readme_test_command_is_what_ci_runs():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python -m pytest" in README and "python -m pytest" in ci


def test_the_readme_task_and_strategy_example_runs():
    """The 'Adding a task or a strategy' code block works as printed: both register, and run by name."""
    from mempos.agent.strategies import STRATEGIES, make_strategy
    from mempos.agent.tasks import TASKS, get_task

    block = re.search(r"```python\n(# my_experiment\.py.*?)```", README, re.S).group(1)
    try:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
        examples = get_task("mul").examples("train", 20, seed=0)
        assert all(int(e.prompt[0]) * int(e.prompt[2]) == int(e.answer) for e in examples)
        strategy = make_strategy("half_replay", ratio="0.25")
        assert strategy.ratio == 0.25 and type(strategy).compose_batch is not STRATEGIES["naive"].compose_batch
    finally:
        TASKS.pop("mul", None)
        STRATEGIES.pop("half_replay", None)


def test_the_readme_python_api_example_runs():
    block = re.search(r"```python\n(import torch\nfrom mempos.encodings.*?)```", README, re.S).group(1)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 32, 512) and len(scope["probs"]) == 2
    assert scope["tokens"].shape == (1, 48)
