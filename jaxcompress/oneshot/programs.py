"""Capture programs over a fixed list of batches, compiled ahead by background threads."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def _compile_workers() -> int:
    """Background compile threads: half the cores (compilation is mostly single-threaded; the
    other half keeps running the capture programs), at least one. Two threads on two cores
    measured slower than one on the MiniLM GPTQ benchmark."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _batch_signature(batch: Any, mask: Any):
    leaves, treedef = jax.tree_util.tree_flatten((batch, mask))
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


class _Programs:
    """Jitted capture programs, optionally compiled ahead by background threads.

    `lower` traces and lowers a program for example arguments and (with ``compile_ahead``)
    queues its compilation; `call` runs it with the compiled executable when one was prepared
    for that key, else (or when the arguments' avals / shardings differ from the lowered ones,
    so the executable refuses them) through ``jax.jit``, which compiles for the new arguments.
    """

    def __init__(self, compile_ahead: bool):
        self._executor = ThreadPoolExecutor(_compile_workers(), thread_name_prefix="jaxcompress-compile") if compile_ahead else None
        self._pending: dict = {}

    def lower(self, key, jitted, *args):
        lowered = jitted.lower(*args)
        if self._executor is not None:
            self._pending[key] = self._executor.submit(lowered.compile)
        return lowered

    def call(self, key, jitted, *args):
        future = self._pending.get(key)
        if future is not None:
            compiled = future.result()
            try:
                return compiled(*args)
            except (TypeError, ValueError):
                # Other avals / shardings than lowered: jit compiles for these (or raises the real error).
                self._pending.pop(key, None)
        return jitted(*args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._pending.clear()


class _BatchCapture:
    """What the captures share: the batches, their row masks and shape signatures, closing."""

    _programs: "_Programs"  # set by each subclass's __init__

    def _init_batches(self, batches: Iterable[Any], row_mask: Callable[[Any], Any] | None) -> None:
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("capture_statistics needs at least one batch")
        self.masks = [None if row_mask is None else jnp.asarray(row_mask(batch)) for batch in self.batches]
        self.signatures = [_batch_signature(b, m) for b, m in zip(self.batches, self.masks)]
        self.first: dict = {}  # signature -> index of its first batch
        for index, signature in enumerate(self.signatures):
            self.first.setdefault(signature, index)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the compilations not started yet (running ones finish in the background)."""
        self._programs.close()
