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
