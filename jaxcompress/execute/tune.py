"""Whole-program tuning (``ExecutionPolicy("tune")``): the per-site choice that makes the
compiled program fastest on this machine, found by timing whole programs, cached on disk.

Per-site timings (``"measure"``) and cost models (``"auto"``) judge each dot / conv alone, but
XLA compiles the program as a whole: on its CPU backend a float network can become one YNNPACK
fusion, and an integer site cuts it where its int32 result leaves the fusion, so a site that wins
alone can lose in the program (an MNIST CNN whose integer conv is 1.1x faster than its
weight-only conv alone made the whole program 0.6x on an AMD EPYC), and which path a site
should take depends on its neighbours' paths. ``"tune"`` times the programs themselves:

1. the weights a quantized dot / conv meets are listed (`SiteChoice` of the ``"rule"`` program);
   those quantized weight-only, and those an override forces, are not tuned;
2. six start programs are timed side by side (identical ones once): every tuned weight
   weight-only, every one integer, every one integer with its dots on bfloat16 codes
   (``"integer_bf16"``; its convs integer), every one integer with its native s8 convs run on
   im2col patches (``"integer_im2col"``; its dots integer), the ``"auto"`` cost model's choice and the per-site
   ``"measure"`` choice (which times each site alone first, cached in ``site_timings.json``);
   the fastest is the start;
3. one pass over the tuned weights, largest site first: each other path the weight can take
   (``"integer_bf16"`` only for a weight a dot meets that is not a matrix-vector product,
   ``"integer_im2col"`` only for one a native s8 conv meets: elsewhere each compiles to the
   integer program) is tried, those programs and the current one
   are timed side by side, and the fastest is kept when it beats the current one by more than
   `MIN_GAIN` (noise on a shared CPU should not flip a choice);
4. the float program (every `QArray` dequantized, the unmodified function) is timed beside the
   start, for the record: the report says how the tuned program compares with it.

A program's time is its fastest of ``rounds`` calls (the minimum is the steadiest estimate on a
shared CPU, see `jaxcompress.execute.measure`). Tuning compiles at most six starts, the float
program and up to three programs per tuned weight, once per program signature and machine; programs run on stand-in arrays of the call's shapes and dtypes
(random codes, positive scales: XLA's run time does not depend on the values), in a helper
thread, so it works on traced arguments under ``jax.jit`` (the stand-ins live on the default
device: a program over sharded or ``vmap``-ped arguments is tuned as the single-device program of
the shapes the function sees). The result is kept in memory and in
``<cache dir>/program_timings.json`` (the cache directory of `jaxcompress.execute.measure`),
keyed by a hash of the traced program, the call's shapes and `QArray` layouts, the policy's
overrides, the machine and the code fingerprint; a cache entry that does not name exactly the
tuned weights with a valid path and positive times is ignored and measured again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import re
import threading
import time
from typing import Any, Callable, Mapping, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress._program.trace import TraceCache, trace_call
from jaxcompress.execute import measure
from jaxcompress.execute.policy import CARRIER, PATCHES, PATHS, ExecutionPolicy
from jaxcompress.qarray import QArray

__all__ = ["TUNE_FILE", "MIN_GAIN", "Tuning", "tune_plan", "program_key"]

TUNE_FILE = "program_timings.json"
MIN_GAIN = 0.01  # a flip is kept when the flipped program is faster by more than this fraction
TARGET_S = 0.05  # each timing gives a program at least this many seconds of calls ...
MAX_ROUNDS = 400  # ... in at most this many calls (and at least the policy's rounds)
_MEMORY: dict[str, "Tuning"] = {}
_PLANS: dict = {}  # (traced program id, policy, ...) -> (traced program, plan), this process
_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The outcome of tuning one program signature.

    Attributes:
      choice: ``{weight path: a path of PATHS}`` for the tuned weights.
      evidence: ``{weight path: {path: program s with the weight on that path}}``, timed side by
        side with the other weights as chosen before it.
      program_s: the chosen program's time (fastest call).
      float_s: the float program's time (every `QArray` dequantized), timed beside the start.
      start: which start program won (``"weight_only"``, ``"integer"``, ``"integer_bf16"``, ``"integer_im2col"``,
        ``"auto"`` or ``"measure"``) and
        ``starts``: their times.
      source: ``"measured"`` (this call) or ``"cached"``.
    """

    choice: dict
    evidence: dict
    program_s: float
    float_s: float
    start: str
    starts: dict
    source: str = "measured"

    def to_json(self) -> dict:
        return {
            "choice": dict(self.choice), "evidence": {k: dict(v) for k, v in self.evidence.items()},
            "program_s": self.program_s, "float_s": self.float_s, "start": self.start, "starts": dict(self.starts),
        }

    @classmethod
    def from_json(cls, entry: Any, paths: tuple[str, ...], options: Mapping[str, tuple] | None = None) -> "Tuning | None":
        """The entry read from the cache file, or ``None`` when it is not a valid tuning of
        exactly the weights ``paths`` on paths each weight can take (``options``: ``{weight:
        its paths}``, default every path in `PATHS`; never trust a loaded file)."""
        if not isinstance(entry, dict):
            return None
        choice, evidence, starts = entry.get("choice"), entry.get("evidence"), entry.get("starts")
        if not (isinstance(choice, dict) and isinstance(evidence, dict) and isinstance(starts, dict)):
            return None
        if set(choice) != set(paths) or set(evidence) != set(paths):
            return None
        allowed = {path: tuple((options or {}).get(path, PATHS)) for path in paths}
        if any(not isinstance(v, str) or v not in allowed[path] for path, v in choice.items()):
            return None

        positive = measure.positive_seconds

        for path, times in evidence.items():
            if not (isinstance(times, dict) and len(times) >= 2 and choice[path] in times):
                return None
            if not all(name in allowed[path] and positive(t) for name, t in times.items()):
                return None
        if not (positive(entry.get("program_s")) and positive(entry.get("float_s"))):
            return None
        if not all(isinstance(k, str) for k in starts) or not all(positive(t) for t in starts.values()):
            return None
        if not isinstance(entry.get("start"), str) or entry["start"] not in starts:
            return None
        return cls(
            choice=dict(choice), evidence={k: {n: float(t) for n, t in v.items()} for k, v in evidence.items()},
            program_s=float(entry["program_s"]), float_s=float(entry["float_s"]), start=str(entry["start"]),
            starts={str(k): float(v) for k, v in starts.items()}, source="cached",
        )

    def reason(self, path: str) -> str:
        times = self.evidence[path]
        shown = ", ".join(f"{1e3 * times[name]:.3f} ms {name.replace('_', '-')}" for name in PATHS if name in times)
        return (
            f"tuned ({self.source}): whole program with this weight {shown}; chosen program "
            f"{1e3 * self.program_s:.3f} ms, float program {1e3 * self.float_s:.3f} ms"
        )


def _describe_leaf(leaf: Any) -> Any:
    if isinstance(leaf, QArray):
        children, treedef = jax.tree_util.tree_flatten(leaf)
        return ["qarray", str(treedef), [[list(c.shape), jnp.dtype(c.dtype).name] for c in children]]
    return [list(jnp.shape(leaf)), str(getattr(leaf, "dtype", None) or jnp.result_type(leaf))]


def program_key(traced, policy: ExecutionPolicy, on_unsupported: str) -> str:
    """The signature a tuning is cached under: a hash of the traced program and of the call's
    leaves (shapes, dtypes, `QArray` layouts and modes), the policy's overrides, the machine and
    the code fingerprint."""
    dynamic = set(traced.dynamic_positions)
    leaves = [_describe_leaf(traced.leaves[p]) for p in traced.dynamic_positions]
    statics = [repr(leaf) for p, leaf in enumerate(traced.leaves) if p not in dynamic]
    text = json.dumps(
        {
            "program": str(traced.closed), "leaves": leaves, "statics": statics,
            "overrides": [list(item) for item in cast(tuple, policy.overrides)], "on_unsupported": on_unsupported,
            "rounds": policy.rounds, "machine": measure.machine_signature(), "code": measure.code_fingerprint(),
            "settings": repr(_settings()),
        },
        sort_keys=True, default=repr,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _settings() -> tuple:
    """The caller's thread-local JAX settings that change a compiled program (the helper thread
    that times programs does not inherit them, so they are re-entered there)."""
    config: Any = jax.config  # its options are attributes set at run time (not in the type stubs)
    return (config.jax_default_matmul_precision, bool(config.jax_enable_x64), config.jax_default_device)


def _in_settings(settings: tuple, work: Callable, *args) -> Any:
    precision, x64, device = settings
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.enable_x64(x64))
        if precision is not None:
            stack.enter_context(jax.default_matmul_precision(precision))
        if device is not None:
            stack.enter_context(jax.default_device(device))
        return work(*args)


def _stand_in(leaf: Any, rng: np.random.Generator) -> Any:
    """A concrete array like ``leaf`` (a `QArray`: each child): random codes, positive floats."""

    def one(array):
        if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):  # a typed PRNG key (jax.random.key)
            data = jax.eval_shape(jax.random.key_data, array)
            return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype), impl=jax.random.key_impl(array))
        dtype = jnp.dtype(array.dtype)
        shape = tuple(array.shape)
        if jnp.issubdtype(dtype, jnp.floating):
            return jnp.asarray(rng.uniform(0.5, 1.0, size=shape), dtype)
        if jnp.issubdtype(dtype, jnp.integer):
            low = 0 if jnp.issubdtype(dtype, jnp.unsignedinteger) else -7
            return jnp.asarray(rng.integers(low, 8, size=shape), dtype)
        return jnp.zeros(shape, dtype)

    if isinstance(leaf, QArray):
        return jax.tree_util.tree_map(one, leaf)
    return one(leaf)


def _concrete_shapes(traced) -> bool:
    leaves = [traced.leaves[p] for p in traced.dynamic_positions]
    arrays = jax.tree_util.tree_leaves(leaves)  # a QArray's children
    return all(isinstance(d, int) for a in arrays for d in jnp.shape(a))


def _macs(site) -> int:
    return math.prod(int(d) for d in site.activation_shape) * math.prod(site.weight_shape)


def _override_policy(policy: ExecutionPolicy, choice: Mapping[str, str]) -> ExecutionPolicy:
    """A ``"weight_only"`` policy with every weight of ``choice`` forced to its path (and the
    user's own overrides first, so they keep winning)."""
    exact = tuple((re.escape(path), chosen) for path, chosen in choice.items())
    return ExecutionPolicy("weight_only", overrides=cast(tuple, policy.overrides) + exact, rounds=policy.rounds)


class _Programs:
    """Compiles and times whole programs on stand-in inputs (in the helper thread)."""

    def __init__(self, policy: ExecutionPolicy, build_program: Callable, float_program: Callable,
                 inputs: list, float_inputs: list):
        self.policy, self.build_program, self.float_program = policy, build_program, float_program
        self.inputs, self.float_inputs = inputs, float_inputs
        self.compiled: dict = {}

    def build(self, name: Any, choice: dict | None) -> Any:
        """Compile the program of ``choice`` (``None``: the float program) under ``name``."""
        if name not in self.compiled:
            if choice is None:
                program, args = jax.jit(self.float_program), self.float_inputs
            else:
                program, args = jax.jit(self.build_program(_override_policy(self.policy, choice))), self.inputs
            jax.block_until_ready(program(*args))  # compile and run once
            start = time.perf_counter()
            jax.block_until_ready(program(*args))
            seconds = time.perf_counter() - start
            # short programs get more calls: the fastest of a few 0.1 ms calls is mostly noise
            rounds = max(self.policy.rounds, min(MAX_ROUNDS, math.ceil(TARGET_S / max(seconds, 1e-6))))
            self.compiled[name] = (program, args, rounds)
        return name

    def timed(self, names: list) -> dict:
        """The fastest-call seconds of each built program, called round-robin."""
        rounds = max(self.compiled[name][2] for name in names)
        return measure.fastest_calls({name: self.compiled[name][:2] for name in names}, rounds)


def _search(paths: list, starts: dict, programs: Any, options: Mapping[str, tuple] | None = None) -> Tuning:
    """The search of the module docs; ``programs`` has ``build(name, choice)`` (``choice``
    ``None``: the float program) and ``timed(names) -> {name: seconds}``; ``options``:
    ``{weight path: the paths it can take}`` (default: integer and weight-only)."""
    keys: dict = {}
    for name, choice in starts.items():  # identical starts are built and timed once
        same = [other for other in keys if starts[other] == choice]
        keys[name] = keys[same[0]] if same else programs.build(("start", name), choice)
    programs.build("float", None)
    start_times = programs.timed(list(dict.fromkeys(keys.values())) + ["float"])
    float_s = start_times.pop("float")
    start_s = {name: start_times[key] for name, key in keys.items()}
    start = min(start_s, key=lambda name: start_s[name])
    choice, best_key = dict(starts[start]), keys[start]
    evidence: dict = {}
    for number, path in enumerate(paths):
        tried = {choice[path]: best_key}
        candidates = {}
        for alternative in (options or {}).get(path, PATHS[:2]):
            if alternative not in tried:
                candidates[alternative] = dict(choice, **{path: alternative})
                tried[alternative] = programs.build(("flip", number, alternative), candidates[alternative])
        times = programs.timed(list(tried.values()))
        evidence[path] = {name: times[key] for name, key in tried.items()}
        current = times[best_key]
        fastest = min(candidates, key=lambda name: times[tried[name]]) if candidates else None
        if fastest is not None and times[tried[fastest]] < current * (1.0 - MIN_GAIN):
            choice, best_key = candidates[fastest], tried[fastest]
    # Each flip won a side-by-side run, but a chain of noisy wins can drift: the result must
    # still beat the start it came from, timed side by side once more.
    if best_key != keys[start]:
        final = programs.timed([keys[start], best_key])
        if final[best_key] >= final[keys[start]]:
            choice, best_key = dict(starts[start]), keys[start]
        program_s = final[best_key]
    else:
        program_s = start_s[start]
    return Tuning(choice=choice, evidence=evidence, program_s=program_s, float_s=float_s, start=start, starts=start_s)


def _recorded(fn, args, kwargs, options, policy: ExecutionPolicy, cache) -> list:
    """The `SiteChoice`\\ s of ``fn`` under ``policy`` (traced abstractly)."""
    from jaxcompress.execute.rules import record_sites

    return record_sites(fn, args, kwargs, dataclasses.replace(options, policy=policy, record=None, plan=None), cache)


def _path_of(site) -> str:
    """The path in `PATHS` a `SiteChoice` took (depthwise included)."""
    if site.chosen in (CARRIER, PATCHES):
        return site.chosen
    return "integer" if site.chosen.startswith("integer") else "weight_only"


def _as_choice(sites: list, paths: tuple) -> dict:
    chosen = {site.path: _path_of(site) for site in sites}
    return {path: chosen[path] for path in paths}


def tune_plan(fn: Callable, args: tuple, kwargs: dict, options, cache: TraceCache | None,
              run: Callable[..., Any]) -> dict[str, tuple[str, str]]:
    """``{weight path: (path, reason)}`` for every tuned weight of ``fn(*args, **kwargs)``:
    cached, or measured now (see the module docs). ``run(fn, args, kwargs, options)`` evaluates
    the program under other options (`jaxcompress.execute.rules.run_with_qarrays`)."""
    policy: ExecutionPolicy = options.policy
    traced = trace_call(fn, args, kwargs, cache)
    # the same signature gives the same traced program (TraceCache): an eager loop pays the
    # lookup once, not an abstract re-interpretation and a hash per call
    memo_key = (id(traced.closed), policy, options.on_unsupported, _settings())
    memo = _PLANS.get(memo_key)
    if memo is not None and memo[0] is traced.closed:
        return memo[1]
    plan = _plan(fn, args, kwargs, options, cache, run, traced)
    _PLANS[memo_key] = (traced.closed, plan)
    while len(_PLANS) > 256:
        _PLANS.pop(next(iter(_PLANS)))
    return plan


def _plan(fn: Callable, args: tuple, kwargs: dict, options, cache, run: Callable, traced) -> dict:
    policy: ExecutionPolicy = options.policy
    auto = _recorded(fn, args, kwargs, options, ExecutionPolicy("auto", overrides=policy.overrides), cache)
    sites = [s for s in auto if s.requested != "weight_only" and policy.forced(s.path) is None]
    if not sites:
        return {}
    if not _concrete_shapes(traced):
        # jax.export with a symbolic batch: nothing of that shape can run, so the cost model decides
        return {
            s.path: (_path_of(s), f"tune: symbolic shapes cannot be timed, so the cost model ('auto'): {s.reason}")
            for s in sites
        }
    paths = tuple(dict.fromkeys(s.path for s in sorted(sites, key=_macs, reverse=True)))  # largest first
    # the distinct programs each weight's sites can run: a third path only where a site runs it
    # (the carrier at a dot that is not a matrix-vector product, patches at a native s8 conv:
    # elsewhere it is the integer program again)
    third = {
        name: {s.path for s in _recorded(fn, args, kwargs, options, ExecutionPolicy(name, overrides=policy.overrides), cache)
               if s.chosen == name}
        for name in (CARRIER, PATCHES)
    }
    paths_of = {p: PATHS[:2] + tuple(name for name in (CARRIER, PATCHES) if p in third[name]) for p in paths}
    key = program_key(traced, policy, options.on_unsupported)
    file = measure.cache_path(policy.cache_dir).with_name(TUNE_FILE)
    memory_key = f"{file}|{key}"
    with _LOCK:
        tuning = _MEMORY.get(memory_key)
        if tuning is None:
            tuning = Tuning.from_json(measure.read_cache(file).get(key), paths, paths_of)
        if tuning is None:
            per_site = ExecutionPolicy("measure", overrides=policy.overrides, cache_dir=policy.cache_dir, rounds=policy.rounds)
            starts = {
                "weight_only": {p: "weight_only" for p in paths},
                "integer": {p: "integer" for p in paths},
                CARRIER: {p: CARRIER if CARRIER in paths_of[p] else "integer" for p in paths},
                PATCHES: {p: PATCHES if PATCHES in paths_of[p] else "integer" for p in paths},
                "auto": _as_choice(auto, paths),
                "measure": _as_choice(_recorded(fn, args, kwargs, options, per_site, cache), paths),
            }
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                tuning = pool.submit(
                    _in_settings, _settings(), _measure, fn, traced, policy, options, list(paths), starts, run, paths_of
                ).result()
            measure.write_cache(file, key, tuning.to_json())
        _MEMORY[memory_key] = tuning
    return {path: (tuning.choice[path], tuning.reason(path)) for path in paths}


def _measure(fn: Callable, traced, policy: ExecutionPolicy, options, paths: list, starts: dict,
             run: Callable, paths_of: Mapping[str, tuple]) -> Tuning:
    """Build the stand-in inputs and search (in the helper thread: nothing is staged into the
    caller's trace)."""
    rng = np.random.default_rng(0)
    inputs = [_stand_in(traced.leaves[p], rng) for p in traced.dynamic_positions]
    float_inputs = [leaf.dequantize() if isinstance(leaf, QArray) else leaf for leaf in inputs]

    def build_program(candidate: ExecutionPolicy) -> Callable:
        candidate_options = dataclasses.replace(options, policy=candidate, record=None, plan=None)

        def program(*dynamic):
            call, call_kwargs = traced.call_args(dynamic)
            return run(fn, call, call_kwargs, candidate_options)

        return program

    def float_program(*dynamic):
        call, call_kwargs = traced.call_args(dynamic)
        return fn(*call, **call_kwargs)

    return _search(paths, starts, _Programs(policy, build_program, float_program, inputs, float_inputs), paths_of)
