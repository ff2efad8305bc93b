"""The CI workflow for Linux, macOS and Windows runners (.github/workflows/ci.yml), checked here."""

import shutil
import subprocess
from pathlib import Path

import pytest

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "ci.yml"


def test_actionlint_accepts_the_workflow():
    if not shutil.which("actionlint"):
        pytest.skip("actionlint is not installed (pip install '.[lint]'; .ci/run does)")
    result = subprocess.run(["actionlint", str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_matrix_covers_three_oses_and_three_pythons():
    text = WORKFLOW.read_text()
    assert "os: [ubuntu-latest, macos-latest, macos-15-intel, windows-latest]" in text
    assert 'python: ["3.11", "3.12", "3.13"]' in text
    for step in ("pyvmm check", "pyvmm demo -v", "python -m pytest tests/unit", "tests/integration/test_guests.py"):
        assert step in text, step
