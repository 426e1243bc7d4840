"""Work around XLA:CPU's collective deadlock with many virtual CPU devices (issue 21).

XLA:CPU's client thread pool has ``max(cores, devices)`` threads, and every participant of a
collective needs one at the same time. With ``--xla_force_host_platform_device_count=N`` (N
virtual devices, the way sharded programs are developed and tested on one CPU) and several
sharded executions in flight (asynchronous dispatch of the next step), the pool runs dry and a
collective never gathers all devices: the process aborts after the collective timeout. A larger
pool (``PJRT_NPROC``, read when the CPU client starts) avoids it; see docs/scaling.md for the
evidence and a minimal repro without jaxcompress.

`ensure_cpu_pool` sets ``PJRT_NPROC`` (only if the user has not) when virtual CPU devices are
forced; it must run before jax creates its CPU client, which is why ``import jaxcompress`` runs it
(jax creates the client lazily, at the first computation).
"""

from __future__ import annotations

import os
import re

__all__ = ["ensure_cpu_pool"]


def ensure_cpu_pool(environ=os.environ) -> str | None:
    """Set ``PJRT_NPROC`` to ``4 x`` the forced virtual CPU device count (at least 32) when more
    than one virtual device is forced and ``PJRT_NPROC`` is unset; returns the value set, if any.

    >>> env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    >>> ensure_cpu_pool(env), env["PJRT_NPROC"]
    ('32', '32')
    >>> ensure_cpu_pool({"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "9"}) is None
    True
    """
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    if match is None or int(match.group(1)) <= 1 or "PJRT_NPROC" in environ:
        return None
    environ["PJRT_NPROC"] = str(max(32, 4 * int(match.group(1))))
    return environ["PJRT_NPROC"]
