"""The docs site builds with warnings as errors, and its API reference covers the public API.

``mkdocs build --strict`` fails on a broken link or anchor, a page missing from the nav, an
object mkdocstrings cannot find or a cross-reference it cannot resolve. The build is skipped
(with the reason) when the docs tools are not installed: ``pip install -e ".[docs]"``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import jaxcompress
import jaxcompress.export

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
DOCS_TOOLS = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name is missing
        return False


def _documented() -> set[str]:
    """The objects the API pages render (``::: name`` lines)."""
    names = set()
    for page in API.glob("*.md"):
        names.update(re.findall(r"^::: (\S+)\s*$", page.read_text(encoding="utf-8"), re.MULTILINE))
    return names


# Public subpackages rendered whole on one page each, with their members listed.
SUBPACKAGES = {"export": "export.md", "models": "models.md", "lora": "lora.md"}


def test_api_reference_covers_public_api():
    documented = _documented()
    missing = [name for name in jaxcompress.__all__ if f"jaxcompress.{name}" not in documented]
    assert not missing, f"public names without an entry in docs/api/*.md: {missing}"
    for package, page in SUBPACKAGES.items():
        assert f"jaxcompress.{package}" in documented, package
        text = (API / page).read_text(encoding="utf-8")
        listed = set(re.findall(r"^\s+- (\w+)\s*$", text, re.MULTILINE))
        module = importlib.import_module(f"jaxcompress.{package}")
        absent = sorted(set(module.__all__) - listed)
        assert not absent, f"jaxcompress.{package} names missing from docs/api/{page}: {absent}"


def test_api_reference_lists_only_public_names():
    public = {f"jaxcompress.{name}" for name in jaxcompress.__all__} | {f"jaxcompress.{p}" for p in SUBPACKAGES}
    extra = sorted(_documented() - public)
    assert not extra, f"docs/api/*.md render names that are not in jaxcompress.__all__: {extra}"


@pytest.mark.skipif(
    not all(_installed(module) for module in DOCS_TOOLS),
    reason="docs tools not installed (pip install -e '.[docs]')",
)
def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    problems = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(
        problems or [result.stderr[-4000:]]
    )
    page = (site / "api" / "quantization" / "index.html").read_text(encoding="utf-8")
    assert 'id="jaxcompress.quantize_params"' in page       # the docstrings were rendered
    assert "&gt;&gt;&gt;" in page and "<blockquote>" not in page   # examples as code, not quotes
