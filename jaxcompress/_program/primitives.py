"""The primitive lists every rule set shares (one list of call-like primitives for the library).

* `CALL_LIKE`: primitives whose body is a jaxpr evaluated with the caller's values (nested
  ``jit``, ``closed_call``, ``remat``, ``custom_jvp_call`` / ``custom_vjp_call``). The evaluator
  inlines them when a non-plain value flows in; their custom derivative rules are dropped, which is
  right for inference and calibration, and jax's own tracing of the caller applies to the inlined
  ops as usual.
* `LAYOUT`: primitives that move or relabel a weight's elements without arithmetic; a weight seen
  through them is still the same stored weight (its dot / conv is still a compressible site).
* `CONTROL_FLOW`: ``scan`` / ``cond`` / ``while``, rebuilt with `jax.lax` around a re-evaluated body
  (`jaxcompress._program.control_flow`).
"""

from __future__ import annotations

from typing import Any

from jax.extend.core import ClosedJaxpr, Jaxpr

__all__ = ["CALL_LIKE", "LAYOUT", "CONTROL_FLOW", "CONTRACTIONS", "call_body", "source_line"]

CALL_LIKE = frozenset(
    ("jit", "pjit", "closed_call", "core_call", "call", "remat2", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call")
)
LAYOUT = frozenset(("transpose", "reshape", "broadcast_in_dim", "squeeze", "convert_element_type", "slice", "copy", "copy_p"))
CONTROL_FLOW = frozenset(("scan", "cond", "while"))
CONTRACTIONS = frozenset(("dot_general", "conv_general_dilated"))


def call_body(eqn) -> tuple[Jaxpr, list] | None:
    """``(jaxpr, consts)`` of a call-like equation's body, or ``None`` (not call-like, or a body
    whose signature does not match the equation's)."""
    if eqn.primitive.name not in CALL_LIKE:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        body = eqn.params.get(key)
        if isinstance(body, ClosedJaxpr):
            jaxpr, consts = body.jaxpr, list(body.consts)
        elif isinstance(body, Jaxpr) and not body.constvars:
            jaxpr, consts = body, []
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
            return jaxpr, consts
    return None


def source_line(eqn: Any) -> str:
    """Where the user's code created ``eqn``: ``"model.py:42 (__call__)"``, or ``"<unknown>"``."""
    try:
        from jax._src import source_info_util

        frame = source_info_util.user_frame(eqn.source_info.traceback)
        if frame is not None:
            return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
    except Exception:  # source information is best effort: never fail an error message on it
        pass
    return "<unknown>"
