"""Every docstring example in the package runs (the examples are part of the API docs)."""

import doctest
import importlib
import pkgutil

import pytest

import jaxcompress

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(jaxcompress.__path__, prefix="jaxcompress.")
    if name != "jaxcompress.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
