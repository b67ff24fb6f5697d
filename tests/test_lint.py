"""ruff over every tracked Python file (pyflakes, pycodestyle, isort: the rules in pyproject's [tool.ruff])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"


def _python_files() -> list[str]:
    """The repository's tracked Python files (work in progress nobody has added yet is not judged)."""
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return [name for name in listed.stdout.split() if (ROOT / name).exists()]
    return ["src", "tests", "benchmarks", "scripts"]


def test_ruff_is_clean():
    assert RUFF.exists(), "ruff is in the dev extra: pip install -e '.[dev]'"
    result = subprocess.run([str(RUFF), "check", "--no-cache", "--output-format", "concise", *_python_files()],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
