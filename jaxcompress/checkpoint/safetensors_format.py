"""The safetensors container: a validating reader and a streaming, bounded-memory writer.

File layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length ``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}``, then the data buffer; offsets are relative to the buffer.

`SafetensorsReader` validates the WHOLE header before any tensor is read: the length prefix
against the file size and a 100 MB cap, JSON that is an object of objects, known dtypes,
non-negative integer shapes, ``end - begin == prod(shape) * itemsize``, offsets that tile the
buffer exactly (sorted, no overlap, no gap) and a buffer that ends where the file ends. Nothing is
ever unpickled; tensors are read with ``seek`` + ``readinto`` into NumPy arrays.

`SafetensorsWriter` appends tensors one at a time to a scratch file next to the destination and,
on `SafetensorsWriter.close`, writes the header and copies the data in 16 MiB chunks, then
renames into place: memory stays at one tensor plus one chunk, and a crash leaves no
destination file. Scratch files are named ``.<destination>.jc-tmp-<host>-<pid>-<random>`` and
stay ``flock``-ed by their writer while it runs: an error or Ctrl-C removes them at once; after
a hard kill (SIGKILL, power loss) the kernel drops the lock, and the next `SafetensorsWriter` in
that folder removes every scratch file whose lock it can take (a live writer's never). An
``OSError`` while writing (disk full, read-only folder) becomes a `CheckpointWriteError` naming
the destination, with nothing left behind.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import struct
import tempfile
from typing import Any

import ml_dtypes
import numpy as np

from jaxcompress._errors import CheckpointFormatError, CheckpointNotFoundError, DestinationFolderMissingError, write_error

__all__ = ["SafetensorsReader", "SafetensorsWriter", "DTYPES", "HeaderError", "st_dtype_name", "remove_stale_scratch"]

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
CHUNK_BYTES = 16 * 1024 * 1024


class HeaderError(CheckpointFormatError):
    """A safetensors file whose header is malformed or inconsistent with the file (a
    `CheckpointFormatError`, so a ``ValueError``)."""


def st_dtype_name(dtype: Any) -> str:
    """The safetensors name of a NumPy dtype (``float32`` -> ``F32``).

    >>> st_dtype_name(np.int8)
    'I8'
    """
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
        raise TypeError(f"dtype {dtype} has no safetensors equivalent (supported: {sorted(str(d) for d in _NAMES)})")
    return _NAMES[dtype]


class SafetensorsReader:
    """A validated safetensors file: ``tensors`` (name -> (dtype, shape, begin, end)),
    ``metadata`` (the ``__metadata__`` dict) and `read`.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.safetensors")
    >>> with SafetensorsWriter(path, metadata={"k": "v"}) as writer:
    ...     _ = writer.add("w", np.arange(3, dtype=np.float32))
    >>> reader = SafetensorsReader(path)
    >>> reader.metadata, reader.read("w").tolist()
    ({'k': 'v'}, [0.0, 1.0, 2.0])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            kind = "is a directory, not a safetensors file" if os.path.isdir(self.path) else "no such safetensors file"
            raise CheckpointNotFoundError(2, f"{self.path}: {kind}")
        self.file_size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(f"{self.path}: {len(prefix)} bytes long; a safetensors file starts with an 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > self.file_size:
                raise HeaderError(
                    f"{self.path}: header length {header_len} is impossible for a file of {self.file_size} bytes "
                    f"(truncated, or not a safetensors file)"
                )
            raw = f.read(header_len)
        self.data_start = 8 + header_len
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise HeaderError(f"{self.path}: header is not valid UTF-8 JSON ({err})") from None
        except RecursionError:
            raise HeaderError(f"{self.path}: header JSON is nested too deeply (not a safetensors header)") from None
        if not isinstance(header, dict):
            raise HeaderError(f"{self.path}: header is a JSON {type(header).__name__}, expected an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise HeaderError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = metadata
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.tensors[name] = self._check_entry(name, info)
        self._check_layout()

    def _check_entry(self, name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"{where}: entry must have exactly dtype, shape and data_offsets, got {info!r}"[:300])
        if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
            raise HeaderError(f"{where}: unknown dtype {info['dtype']!r} (expected one of {sorted(DTYPES)})")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise HeaderError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise HeaderError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        dtype = DTYPES[info["dtype"]]
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise HeaderError(
                f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but "
                f"{info['dtype']}{shape} needs {nbytes}"
            )
        return dtype, tuple(shape), offsets[0], offsets[1]

    def _check_layout(self) -> None:
        position = 0
        for name, (_, _, begin, end) in sorted(self.tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != position:
                what = "overlaps the previous tensor" if begin < position else f"leaves a gap after byte {position}"
                raise HeaderError(f"{self.path}: tensor {name!r} at data_offsets [{begin}, {end}] {what}")
            position = end
        if self.data_start + position != self.file_size:
            raise HeaderError(
                f"{self.path}: the header describes {self.data_start + position} bytes but the file has "
                f"{self.file_size} (truncated or trailing data)"
            )

    def nbytes(self, name: str) -> int:
        """Stored bytes of tensor ``name``."""
        _, _, begin, end = self.tensors[name]
        return end - begin

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a fresh NumPy array."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        dtype, shape, begin, end = self.tensors[name]
        out = np.empty(end - begin, np.uint8)
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size != self.file_size:
                raise HeaderError(f"{self.path}: the file changed size since its header was validated")
            f.seek(self.data_start + begin)
            if f.readinto(out.data) != out.size:
                raise HeaderError(f"{self.path}: tensor {name!r}: short read (file truncated?)")
        return out.view(dtype).reshape(shape)


    def read_rows(self, name: str, begin: int, end: int) -> np.ndarray:
        """Rows ``begin:end`` (along axis 0) of tensor ``name``: a contiguous byte range, read
        without touching the rest of the tensor."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        dtype, shape, start, _ = self.tensors[name]
        if not shape:
            raise ValueError(f"{self.path}: tensor {name!r} is a scalar; it has no rows")
        begin, end = max(0, begin), min(shape[0], end)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        out = np.empty(max(end - begin, 0) * row_bytes, np.uint8)
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size != self.file_size:
                raise HeaderError(f"{self.path}: the file changed size since its header was validated")
            f.seek(self.data_start + start + begin * row_bytes)
            if f.readinto(out.data) != out.size:
                raise HeaderError(f"{self.path}: tensor {name!r}: short read (file truncated?)")
        return out.view(dtype).reshape((max(end - begin, 0),) + tuple(shape[1:]))


SCRATCH_MARK = ".jc-tmp-"


def _scratch_prefix(path: str) -> str:
    return f".{os.path.basename(path)}{SCRATCH_MARK}{socket.gethostname()}-{os.getpid()}-"


def _locked_scratch(directory: str, path: str, suffix: str = "") -> tuple[Any, str]:
    """A new scratch file next to ``path``, open for writing and ``flock``-ed by this process."""
    fd, name = tempfile.mkstemp(prefix=_scratch_prefix(path), suffix=suffix, dir=directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return os.fdopen(fd, "wb"), name
    except BaseException:
        os.close(fd)
        _remove(name)
        raise


def remove_stale_scratch(directory: str) -> list[str]:
    """Remove the scratch files of dead writers in ``directory`` (those nobody holds a lock on);
    returns their names. A live writer's scratch is locked, so it is never touched.

    >>> import tempfile
    >>> remove_stale_scratch(tempfile.mkdtemp())
    []
    """
    removed: list[Any] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(".") or SCRATCH_MARK not in name:
            continue
        file = os.path.join(directory, name)
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its writer is alive
            os.close(fd)
            continue
        try:
            os.remove(file)
            removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor; atomic (locked scratch files, then
    ``os.replace``).

    Use as a context manager (closing on success, aborting on error) or call `close` / `abort`.
    Creating one removes the scratch of dead writers in the destination folder (see the module
    docs). See `SafetensorsReader` for an example.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = os.path.abspath(os.fspath(path))
        self.metadata = dict(metadata or {})
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise DestinationFolderMissingError(2, f"{self.path}: the destination directory {directory} does not exist")
        self._closed = True
        remove_stale_scratch(directory)
        try:
            self._data, self._data_path = _locked_scratch(directory, self.path)
        except OSError as err:
            raise write_error(err, self.path) from None
        self._entries: dict[str, dict[str, Any]] = {}
        self._position = 0
        self._closed = False

    def add(self, name: str, array: Any) -> int:
        """Append one tensor; returns its byte size."""
        if name in self._entries or name == "__metadata__":
            raise ValueError(f"{self.path}: tensor name {name!r} is used twice (or reserved)")
        array = np.ascontiguousarray(array)
        dtype = st_dtype_name(array.dtype)
        nbytes = array.nbytes
        try:
            self._data.write(memoryview(array.reshape(-1).view(np.uint8)))
        except OSError as err:
            self.abort()
            raise write_error(err, self.path) from None
        self._entries[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [self._position, self._position + nbytes]}
        self._position += nbytes
        return nbytes

    def close(self) -> int:
        """Write the header + data to the destination (atomically); returns the file size."""
        if self._closed:
            raise ValueError(f"{self.path}: this writer is already closed")
        header = dict(self._entries)
        if self.metadata:
            header["__metadata__"] = self.metadata
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-(8 + len(encoded)) % 8)  # data starts 8-byte aligned
        final_tmp = None
        try:
            self._data.flush()
            out, final_tmp = _locked_scratch(os.path.dirname(self.path), self.path, ".safetensors")
            with out, open(self._data_path, "rb") as data:
                out.write(struct.pack("<Q", len(encoded)))
                out.write(encoded)
                while chunk := data.read(CHUNK_BYTES):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(final_tmp, 0o666 & ~umask)  # mkstemp makes 0600; give a normal file's mode
                os.replace(final_tmp, self.path)  # while still locked: nobody removes it under us
            final_tmp = None
        except OSError as err:
            raise write_error(err, self.path) from None
        finally:
            if final_tmp is not None:
                _remove(final_tmp)
            self._discard()
        return 8 + len(encoded) + self._position

    def _discard(self) -> None:
        self._closed = True
        try:
            self._data.close()
        except OSError:
            pass
        _remove(self._data_path)

    def abort(self) -> None:
        """Drop everything written so far; the destination is not touched."""
        if not self._closed:
            self._discard()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
