"""The code style every change keeps: ruff's linter and formatter, configured in pyproject.toml.

Fix what this reports with `ruff check --fix . && ruff format .` (ruff comes with the test extra).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", [["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]])
def test_ruff(command):
    result = subprocess.run([sys.executable, "-m", "ruff", *command], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
