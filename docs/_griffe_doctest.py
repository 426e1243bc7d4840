"""Griffe extension for the API reference: docstring examples (``>>>`` runs) become code blocks.

The package's docstrings keep their runnable examples as plain doctest paragraphs (they run in
``tests/test_doctests.py``). Markdown would read ``>>>`` as nested block quotes, so each run of
doctest lines -- from a ``>>>`` line to the next blank line -- is fenced as ``pycon`` before the
docstring is parsed. Nothing else in the docstring changes.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Return ``text`` with every doctest paragraph wrapped in a ```` ```pycon ```` fence."""
    out: list[str] = []
    in_block = False
    indent = ""
    for line in text.splitlines():
        stripped = line.lstrip()
        if not in_block and stripped.startswith(">>>"):
            in_block = True
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
        elif in_block and not stripped:
            out.append(f"{indent}```")
            in_block = False
        out.append(line)
    if in_block:
        out.append(f"{indent}```")
    return "\n".join(out)


class FenceDoctests(griffe.Extension):
    """Fence the doctest paragraphs of every loaded object's docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
