"""The code is lint-clean under the rules of ``[tool.ruff]`` in pyproject.toml (pyflakes,
import order, errors, bugbear's mutable defaults): ``ruff check`` runs as part of the suite,
so CI fails on an unused import or a shadowed name."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    pytest.importorskip("ruff", reason="ruff comes with the test extra: pip install -e '.[test]'")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests",
                           "bench"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
