"""Measured per-site choice (``ExecutionPolicy("measure")``), with an on-disk timing cache.

For a dot / conv site of a quantized weight, the programs `jaxcompress.compressed` could run
there -- the integer op and the weight-only float op, and at a dot site also the integer dot on
bfloat16 codes (``"integer_bf16"``, `jaxcompress.execute.policy`; not at a matrix-vector dot,
which runs the same padded s8 dot on both integer paths), and at a conv XLA runs as its native s8
convolution also the s8 dot on im2col patches (``"integer_im2col"``) -- are compiled for the site's exact
signature (activation shape and dtype, the weight's stored shapes, dtypes and pending layout,
the primitive's parameters) on stand-in data, timed interleaved (``rounds`` calls each after a
warm-up), and the fastest one is kept. Each program's time is its FASTEST call: on a shared CPU
other work only ever adds time, so the minimum is the steadiest estimate of the program's own
cost (a median flips the choice when the load changes between the two programs' calls). The
timing runs at trace time in a helper thread
(JAX's tracing state is per thread, so nothing is staged into the program being traced) and
once per signature per machine: the timings are kept in memory and in
``<cache dir>/site_timings.json`` keyed by the signature, the CPU / device, the jax version and
the code that builds the programs (the jaxcompress version and a hash of the sources of
``jaxcompress/execute``), so an upgrade that changes a kernel times it again instead of reusing a
choice made for the old one.

The cache directory is the policy's ``cache_dir``, else ``$JAXCOMPRESS_CACHE_DIR``, else
``$XDG_CACHE_HOME/jaxcompress`` (``~/.cache/jaxcompress``). A directory that cannot be read or
written is not an error: the timings are then only kept in memory for this process. The file is
replaced atomically (written beside it, then renamed), so concurrent processes never read half
a file; a file that is not valid JSON is ignored and rewritten.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.execute.policy import CARRIER, PATCHES, has_third_path, site_paths

__all__ = ["measured_choice", "cache_path", "site_key", "time_site", "fastest_calls", "code_fingerprint"]

CACHE_FILE = "site_timings.json"
_MEMORY: dict[str, dict] = {}
_LOCK = threading.Lock()


def cache_path(cache_dir: str | None = None) -> Path:
    """Where the timings are kept (see the module docs)."""
    if cache_dir is None:
        cache_dir = os.environ.get("JAXCOMPRESS_CACHE_DIR")
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(base, "jaxcompress")
    return Path(cache_dir) / CACHE_FILE


@functools.lru_cache(maxsize=None)
def machine_signature() -> str:
    """What a cached timing is only valid on: the device, the CPU model and count, the jax version."""
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{device.platform}:{device.device_kind}:{cpu}:{os.cpu_count()}:jax{jax.__version__}"


def code_fingerprint(folder: str | Path | None = None) -> str:
    """The jaxcompress version and a hash of the ``.py`` sources of ``folder`` (default: the
    code that builds the programs a site is timed with: ``jaxcompress/execute``,
    ``jaxcompress/quant``, ``jaxcompress/_program`` and ``jaxcompress/qarray*.py``): part of every
    cache key, so timings of an older kernel are never reused.

    >>> fp = code_fingerprint()
    >>> fp.split(":")[0] == __import__("jaxcompress").__version__, len(fp.split(":")[1])
    (True, 16)
    """
    if folder is not None:
        return _fingerprint((str(folder),))
    package = Path(__file__).parent.parent
    return _fingerprint(tuple(str(package / name) for name in ("execute", "quant", "_program", "qarray*.py")))


@functools.lru_cache(maxsize=None)
def _fingerprint(sources: tuple[str, ...]) -> str:
    from jaxcompress._version import __version__

    files: list[Path] = []
    for source in sources:
        path = Path(source)
        files += sorted(path.glob("*.py")) if path.is_dir() else sorted(path.parent.glob(path.name))
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(file.parent.parent)).encode() + b"\0" + file.read_bytes() + b"\0")
    return f"{__version__}:{digest.hexdigest()[:16]}"


def _describe(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return [list(value.shape), jnp.dtype(value.dtype).name]
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    return repr(value)


def site_key(primitive: str, x_shape, x_dtype, view, params: dict, weight_side: str) -> str:
    """The signature a timing is cached under (shapes, dtypes, layout, op parameters, machine)."""
    signature = {
        "primitive": primitive,
        "x": [list(x_shape), jnp.dtype(x_dtype).name],
        "weight": [_describe(getattr(view, name)) for name in ("values", "scale", "zero_point", "input_scale")],
        "dtype": jnp.dtype(view.dtype).name,
        "mode": view.activation,
        "static_scale": view.activation_scale is not None,
        "permutation": view.permutation,
        "side": weight_side,
        "params": {name: _describe(params[name]) for name in sorted(params)},
        "machine": machine_signature(),
        "code": code_fingerprint(),
    }
    return json.dumps(signature, sort_keys=True, default=repr)


def _stand_in(view, seed: int = 0):
    """A view of the same structure with concrete stand-in arrays."""
    rng = np.random.default_rng(seed)

    def codes(array):
        if array is None:
            return None
        return jnp.asarray(rng.integers(-7, 8, size=array.shape), jnp.int8).astype(array.dtype)

    def filled(array, value):
        return None if array is None else jnp.full(array.shape, value, array.dtype)

    activation_scale = view.activation_scale
    if view.activation == "static":
        activation_scale = jnp.full((), 0.02, jnp.float32)
    return dataclasses.replace(
        view,
        values=codes(view.values),
        scale=filled(view.scale, 0.01),
        zero_point=filled(view.zero_point, 0),
        input_scale=filled(view.input_scale, 1.0),
        activation_scale=activation_scale,
    )


def _site_fn(primitive: str, view, params: dict, weight_side: str, out_dtype, mode: str, carrier=None):
    """The jitted program of one site on one path (``carrier``: as `choose_mode` returns it)."""
    from jaxcompress.execute.conv import conv_with_weight
    from jaxcompress.execute.dot import dot_with_weight

    arrays = (view.values, view.scale, view.zero_point, view.input_scale, view.activation_scale)

    def run(x, arrays):
        values, scale, zero_point, input_scale, activation_scale = arrays
        site_view = dataclasses.replace(
            view, values=values, scale=scale, zero_point=zero_point, input_scale=input_scale, activation_scale=activation_scale
        )
        if primitive == "dot_general":
            return dot_with_weight(
                x, site_view, params["dimension_numbers"], weight_side=weight_side, out_dtype=out_dtype, mode=mode,
                precision=params.get("precision"), preferred_element_type=params.get("preferred_element_type"),
                on_unsupported="dequantize", carrier=carrier,
            )
        return conv_with_weight(
            x, site_view, params, out_dtype=out_dtype, mode=mode, on_unsupported="dequantize", im2col=carrier == PATCHES
        )

    return jax.jit(run), arrays


def time_site(primitive: str, x_shape, x_dtype, view, params: dict, weight_side: str, rounds: int) -> dict:
    """Seconds of the fastest call of each program of a site, on stand-in data, interleaved:
    ``{"<path>_s": seconds}`` for integer, weight-only and the site's third path where it has one
    (`_paths`: the dot on bfloat16 codes, or the conv as an s8 dot on im2col patches); runs in
    the calling thread (see `measured_choice`)."""
    stand_in = _stand_in(view)
    x = jnp.asarray(np.random.default_rng(1).normal(size=tuple(x_shape)), x_dtype)
    out_dtype = jnp.result_type(x_dtype, view.dtype)
    fns = {
        "integer": _site_fn(primitive, stand_in, params, weight_side, out_dtype, view.activation),
        "weight_only": _site_fn(primitive, stand_in, params, weight_side, out_dtype, "weight_only"),
    }
    paths = _paths(primitive, x_shape, stand_in, params, weight_side)  # concrete: this may run in a helper thread
    if CARRIER in paths:
        fns[CARRIER] = _site_fn(primitive, stand_in, params, weight_side, out_dtype, view.activation, jnp.bfloat16)
    if PATCHES in paths:
        fns[PATCHES] = _site_fn(primitive, stand_in, params, weight_side, out_dtype, view.activation, PATCHES)
    for fn, arrays in fns.values():
        jax.block_until_ready(fn(x, arrays))
        jax.block_until_ready(fn(x, arrays))
    fastest = fastest_calls({name: (fn, (x, arrays)) for name, (fn, arrays) in fns.items()}, rounds)
    return {f"{name}_s": seconds for name, seconds in fastest.items()}


def fastest_calls(programs: dict, rounds: int) -> dict:
    """``{name: seconds of its fastest call}`` for ``{name: (fn, args)}`` (already compiled),
    called round-robin for ``rounds`` rounds, the order rotated every round (see the module
    docs for why the fastest call)."""
    names = list(programs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn, args = programs[name]
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.min(values)) for name, values in times.items()}


def read_cache(path: Path) -> dict:
    """The JSON object of a timing cache file (``{}`` when missing, unreadable or not an object;
    the entries are still to be validated by the reader)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Set ``key`` to ``entry`` in a timing cache file, replacing it atomically (a scratch file
    beside it, then a rename); an unwritable directory is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = read_cache(path)
        data[key] = entry
        handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(data, file)
            os.replace(scratch, path)
        except BaseException:
            os.unlink(scratch)
            raise
    except OSError:
        pass  # an unwritable cache: the timing stays in memory for this process


def positive_seconds(value: Any) -> bool:
    """Whether a value read from a timing cache file is a time: a finite positive number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _paths(primitive: str, x_shape, view, params: dict, weight_side: str) -> tuple[str, ...]:
    """The distinct programs of a site (`jaxcompress.execute.policy.site_paths`)."""
    return site_paths(primitive, has_third_path(primitive, x_shape, view, params, weight_side))


def _valid(entry: Any, paths: tuple[str, ...]) -> bool:
    return isinstance(entry, dict) and all(positive_seconds(entry.get(f"{name}_s")) for name in paths)


def measured_choice(policy, primitive: str, x, view, params: dict, weight_side: str = "rhs") -> tuple[str, str]:
    """``(path, reason)`` from the (cached) timings of the programs of a site (``x``: the
    activation, or anything with its shape and dtype)."""
    x_shape, x_dtype = tuple(x.shape), jnp.dtype(x.dtype)
    key = site_key(primitive, x_shape, x_dtype, view, params, weight_side)
    paths = _paths(primitive, x_shape, view, params, weight_side)  # ties go to the earlier one
    path = cache_path(policy.cache_dir)
    memory_key = f"{path}|{key}"
    with _LOCK:
        entry = _MEMORY.get(memory_key)
        source = "cached"
        if entry is None:
            entry = read_cache(path).get(key)
            if not _valid(entry, paths):
                with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                    entry = pool.submit(time_site, primitive, x_shape, x_dtype, view, params, weight_side, policy.rounds).result()
                write_cache(path, key, entry)
                source = "measured"
            _MEMORY[memory_key] = cast(dict, entry)  # read or measured just above
    timings = cast(dict, entry)
    chosen = min(paths, key=lambda name: (timings[f"{name}_s"], paths.index(name)))
    shown = ", ".join(f"{name.replace('_', '-')} {1e3 * timings[f'{name}_s']:.3f} ms" for name in paths)
    return chosen, f"{source}: {shown}"
