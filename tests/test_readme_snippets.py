"""Every ```python block of README.md and docs/**/*.md runs as written.

Each block is executed on its own, in a fresh namespace (nothing carries over from the block
before it), with the current directory a fresh temporary folder (blocks may write files) and a
time limit. Blocks that are not meant to run are fenced as something else (```console,
```text, ```toml). A block indented inside a list item is dedented first, as Markdown does.
"""

from __future__ import annotations

import pathlib
import re
import signal
import sys
import textwrap
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIONAL_MODULES = {"ai_edge_litert", "onnx", "onnxruntime"}
TIME_LIMIT_S = 240  # per block; generous because CI machines are shared (blocks take seconds)

# An opening fence (optionally indented, e.g. inside a list item), its info string, the body, and
# a closing fence with the same indentation.
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def markdown_files() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, source)`` of every block fenced as ```python / ```py in ``text``."""
    blocks = []
    for match in _FENCE.finditer(text):
        language = match["info"].strip().split(" ")[0].lower() if match["info"].strip() else ""
        if language in ("python", "py", "python3"):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((line, textwrap.dedent(match["body"])))
    return blocks


def _cases():
    cases = []
    for path in markdown_files():
        for line, source in python_blocks(path.read_text(encoding="utf-8")):
            name = f"{path.relative_to(ROOT)}:{line}"
            cases.append(pytest.param(name, source, id=name))
    return cases


CASES = _cases()


def test_blocks_are_found():
    # The extraction itself: an indented block in a list item, a non-python block, two blocks.
    text = "a\n\n```python\nx = 1\n```\n\n* item\n\n  ```python\n  y = 2\n  ```\n\n```console\n$ ls\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\n")]
    # The README has snippets (a broken fence regex would silently collect nothing).
    assert sum(case.values[0].startswith("README.md") for case in CASES) >= 6


class _TimeLimit(Exception):
    pass


def _alarm(signum, frame):
    raise _TimeLimit(f"block ran longer than {TIME_LIMIT_S} s")


@pytest.mark.parametrize("name, source", CASES)
def test_snippet_runs(name, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the "measure" / "tune" policies' timing cache: the test's own, not the user's ~/.cache
    monkeypatch.setenv("JAXCOMPRESS_CACHE_DIR", str(tmp_path / "jaxcompress-cache"))
    code = compile(source, name, "exec")
    # A fresh module, as a script would have (dataclasses and flax modules look their module up).
    module = types.ModuleType("_readme_snippet")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    try:
        exec(code, module.__dict__)  # noqa: S102 -- running the snippet is the test
    except ModuleNotFoundError as error:
        # Only the deployment runtimes are optional for a block (the `litert` / `onnx` extras).
        if (error.name or "").split(".")[0] in OPTIONAL_MODULES:
            pytest.skip(f"{name} needs {error.name} (pip install 'jaxcompress[litert,onnx]')")
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
