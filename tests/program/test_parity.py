"""One program layer: every feature sees exactly the sites `compressed` runs on integers.

For a set of programs (dense, conv, depthwise, scan over stacked layers, cond, while, nested jit,
remat, tied weights) the weights that meet a dot / conv under `compressed`'s integer rules (the
rule that runs the integer op is the one that observes the activation, so `run_with_qarrays`'s
observations name them) are the weights the QAT activation hooks fake-quantize, the weights
`capture_statistics` reports, and the weights GPTQ treats with GPTQ (not round-to-nearest).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxcompress as jc
from jaxcompress.execute.hooks import call_with_dot_hook
from jaxcompress.execute.rules import ExecutionOptions, run_with_qarrays
from jaxcompress.oneshot.capture import capture_statistics
from jaxcompress.rules import path_to_str

KEY = jax.random.key(0)


def _normal(i, shape):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape) * 0.5


def _conv(x, w, groups=1):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


PROGRAMS = {
    "dense": (
        lambda p, x: jax.nn.relu(x @ p["a"] + p["b"]) @ p["c"],
        {"a": _normal(1, (8, 16)), "b": jnp.zeros(16), "c": _normal(2, (16, 4))},
        (4, 8),
    ),
    "conv": (
        lambda p, x: jnp.mean(jax.nn.relu(_conv(x, p["k"])), axis=(1, 2)) @ p["head"],
        {"k": _normal(3, (3, 3, 2, 4)), "head": _normal(4, (4, 3))},
        (2, 6, 6, 2),
    ),
    "depthwise": (
        lambda p, x: jnp.mean(_conv(_conv(x, p["k"]), p["dw"], groups=4), axis=(1, 2)) @ p["head"],
        {"k": _normal(5, (3, 3, 2, 4)), "dw": _normal(6, (3, 3, 1, 4)), "head": _normal(7, (4, 3))},
        (2, 6, 6, 2),
    ),
    "scan": (
        lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"])[0] @ p["head"],
        {"stack": _normal(8, (3, 8, 8)), "head": _normal(9, (8, 4))},
        (5, 8),
    ),
    "scan_closure": (
        lambda p, x: lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), x, None, length=3)[0] @ p["head"],
        {"w": _normal(10, (8, 8)), "head": _normal(11, (8, 4))},
        (5, 8),
    ),
    "cond": (
        lambda p, x: lax.cond(jnp.sum(x) > 0, lambda h: h @ p["a"], lambda h: jnp.tanh(h @ p["b"]), x) @ p["head"],
        {"a": _normal(12, (8, 8)), "b": _normal(13, (8, 8)), "head": _normal(14, (8, 4))},
        (5, 8),
    ),
    "while": (
        lambda p, x: lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])), (0, x))[1] @ p["head"],
        {"w": _normal(15, (8, 8)), "head": _normal(16, (8, 4))},
        (5, 8),
    ),
    "nested_jit": (
        lambda p, x: jax.jit(lambda q, h: jax.nn.gelu(h @ q["a"]))(p, x) @ p["head"],
        {"a": _normal(17, (8, 8)), "head": _normal(18, (8, 4))},
        (5, 8),
    ),
    "remat": (
        lambda p, x: jax.checkpoint(lambda h: jnp.tanh(h @ p["a"].T))(x) @ p["head"],
        {"a": _normal(19, (8, 8)), "head": _normal(20, (8, 4))},
        (5, 8),
    ),
    "tied": (
        lambda p, x: jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"]) @ p["head"],
        {"w": _normal(21, (8, 8)), "head": _normal(22, (8, 4))},
        (5, 8),
    ),
}

RULES = [jc.QuantRule(pattern=r"b", skip=True), jc.QuantRule(pattern=r".*", channel_axes=(-1,), activation="static")]


def _integer_sites(fn, qparams, x) -> set[str]:
    """The leaves `compressed`'s integer rules run a quantized dot / conv for (the site rule
    observes the activation before it picks the integer or weight-only op)."""
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda v: isinstance(v, jc.QArray))[0]
    names = {index: path_to_str(path) for index, (path, _) in enumerate(flat)}

    def observe(ev, view, activation, axes):
        ev.observe(view.leaf_index, jnp.zeros(()), "sum")

    _, observations = jax.jit(lambda q, x: run_with_qarrays(fn, (q, x), {}, ExecutionOptions(weight_only=True, observe_activations=observe)))(qparams, x)
    return {names[index] for index in observations}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_every_feature_sees_the_integer_sites(name):
    fn, params, shape = PROGRAMS[name]
    x = _normal(99, shape)
    rules = RULES if "b" in params else RULES[1:]
    qparams, _ = jc.quantize_params(params, rules)
    integer = _integer_sites(fn, qparams, x)
    expected = {path for path, leaf in params.items() if path != "b"}
    assert integer == expected, "compressed should run every weight of these programs on integers"

    # compressed really computes the same function (integer arithmetic, calibrated)
    scales = jc.calibrate_activations(fn, qparams, [x])
    assert {path for path, scale in scales.items() if scale is not None} == integer
    calibrated = jc.attach_activation_scales(qparams, scales)
    reference = np.asarray(fn(jc.dequantize_params(qparams), x))
    out = np.asarray(jax.jit(jc.compressed(fn))(calibrated, x))
    assert np.max(np.abs(out - reference)) <= 0.1 * np.max(np.abs(reference)) + 1e-3

    # the float-weight hook rule set (QAT activation fake-quant, capture) sees the same leaves
    hooked: set[str] = set()
    call_with_dot_hook(fn, (params, x), None, lambda site, a, w: hooked.add(site.path) or a, select=lambda p: p != "b")
    assert hooked == integer
    _, observed = jc.fake_quant_activations(fn, rules)(params, x)
    assert set(observed) == integer

    if name == "depthwise":  # one-shot statistics have no matrix view of a grouped conv (documented)
        with pytest.raises(ValueError, match="dw"):
            capture_statistics(fn, params, [x], lambda p: p != "b")
        return
    stats = capture_statistics(fn, params, [x], lambda p: p != "b")
    assert set(stats) == integer
