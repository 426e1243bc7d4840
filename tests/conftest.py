"""Test-wide settings."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _timing_cache_outside_home(tmp_path_factory):
    """The ``"measure"`` / ``"tune"`` execution policies cache timings on disk; tests keep them
    in a temporary folder instead of the user's ``~/.cache/jaxcompress`` (a test that checks the
    default location sets the variable itself)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXCOMPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("jaxcompress-cache")))
    yield
    mp.undo()
