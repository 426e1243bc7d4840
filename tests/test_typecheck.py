"""The package type-checks: ``python -m mypy jaxcompress`` (configured in pyproject.toml's
``[tool.mypy]``) exits 0. A failure prints mypy's report."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_reports_no_errors():
    pytest.importorskip("mypy")
    cache = os.path.join(ROOT, ".mypy_cache")  # mypy writes its own .gitignore there; a warm run takes seconds
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", cache, "jaxcompress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mypy found type errors:\n{report}"
    assert "Success" in report, report
