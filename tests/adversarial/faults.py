"""Fault injection for the writers: a disk that fills up, a folder that refuses writes."""

from __future__ import annotations

import builtins
import errno
import io
import os
from typing import Any


class _FullFile(io.RawIOBase):
    """A writable file that raises ENOSPC once ``budget`` bytes were written to it."""

    def __init__(self, inner: Any, budget: list[int]):
        self._inner, self._budget = inner, budget

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self._budget[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget[0] -= size
        return self._inner.write(data)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._inner.fileno()

    def flush(self) -> None:
        if not self._inner.closed:
            self._inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def close(self) -> None:
        super().close()
        self._inner.close()

    def __exit__(self, *exc) -> None:
        self.close()


def _under(path: Any, folder: str) -> bool:
    try:
        path = os.path.abspath(os.fspath(path))
    except TypeError:
        return False
    return os.path.commonpath([path, folder]) == folder


def disk_full(monkeypatch: Any, folder: Any, budget_bytes: int = 1000) -> None:
    """Files opened for writing under ``folder`` take ``budget_bytes`` in all, then ENOSPC."""
    folder = os.path.abspath(os.fspath(folder))
    budget = [budget_bytes]
    real_open, real_fdopen = builtins.open, os.fdopen

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and _under(file, folder):
            return _FullFile(handle, budget)
        return handle

    def fake_fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if any(c in mode for c in "wax+") and target and _under(target, folder):
            return _FullFile(handle, budget)
        return handle

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "fdopen", fake_fdopen)


def read_only(monkeypatch: Any, folder: Any) -> None:
    """Creating or opening files for writing under ``folder`` fails with EROFS, as on a
    read-only mount (works as root too, where chmod would not stop a write)."""
    folder = os.path.abspath(os.fspath(folder))
    real_open, real_os_open = builtins.open, os.open

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and _under(file, folder):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, folder):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
