"""The package type-checks: ``python -m mypy jaxcompress`` (configured in pyproject.toml's
``[tool.mypy]``) exits 0. A failure prints mypy's report."""

import os
import pathlib
import re
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


def test_every_type_ignore_names_its_error_code_and_a_reason():
    # mypy checks the code (ignore-without-code); the reason is a comment after it or on the line above
    ignore = re.compile(r"#\s*type:\s*ignore(\[[^\]]*\])?(.*)$")
    offenders = []
    for path in sorted(pathlib.Path(ROOT, "jaxcompress").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            match = ignore.search(line)
            if match is None:
                continue
            reason_after = re.match(r"\s*#\s*\S", match.group(2) or "")
            reason_above = number > 1 and lines[number - 2].strip().startswith("#")
            if not match.group(1) or not (reason_after or reason_above):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "type: ignore without an error code and a reason:\n" + "\n".join(offenders)
