"""The package's shape: one evaluator of traced programs, no module hidden by its own function, small modules."""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import types

import jaxcompress

PACKAGE = pathlib.Path(jaxcompress.__file__).parent


def _modules() -> list[str]:
    return sorted(name for _, name, _ in pkgutil.walk_packages(jaxcompress.__path__, prefix="jaxcompress.") if name != "jaxcompress.__main__")


def test_no_module_is_hidden_by_what_its_package_exports():
    hidden = []
    for name in _modules():
        parent, _, child = name.rpartition(".")
        attribute = getattr(importlib.import_module(parent), child, None)
        if attribute is not None and not isinstance(attribute, types.ModuleType):
            hidden.append(f"{name} (hidden by {type(attribute).__name__} {parent}.{child})")
    assert not hidden, hidden


def test_one_evaluator_walks_traced_programs():
    """Only the program layer loops over a jaxpr's equations; every feature is a rule set on it."""
    walkers = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "_program" not in path.parts and "for eqn in" in path.read_text(encoding="utf-8") and ".eqns" in path.read_text(encoding="utf-8")
    ]
    assert not walkers, f"modules with their own equation loop: {walkers}"


def test_modules_stay_small():
    large = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not large, f"modules over 450 lines: {large}"
