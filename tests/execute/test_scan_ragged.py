"""A weight stacked along a scan's xs with a ragged group axis runs on the int8 path (the
unstacked view's ragged axis moves down by one with the stacked axis)."""

import re

import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc


def _fn(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"])
    return h @ p["head"]


def test_scanned_ragged_group_weight_runs_int8():
    rng = np.random.default_rng(0)
    params = {"stack": jnp.asarray(rng.normal(size=(3, 40, 40)) * 0.2, jnp.float32), "head": jnp.asarray(rng.normal(size=(40, 4)), jnp.float32)}
    rules = [
        jc.QuantRule(pattern="stack", bits=8, channel_axes=(0, 2), group_size=16, group_axis=1, activation="dynamic"),
        jc.QuantRule(pattern="head", bits=8, channel_axes=(1,)),
    ]
    q, _ = jc.quantize_params(params, rules)
    assert q["stack"].scale.shape == (3, 3, 40)  # 40 = 16 + 16 + 8
    x = jnp.asarray(rng.normal(size=(5, 40)), jnp.float32)
    reference = np.asarray(_fn(jc.dequantize_params(q), x), np.float64)
    program = jax.jit(jc.compressed(_fn))
    out = np.asarray(program(q, x), np.float64)
    # dynamic int8 activations over three layers: about 1% of the output's range
    assert np.abs(out - reference).max() <= 0.03 * np.abs(reference).max()
    hlo = program.lower(q, x).compile().as_text()
    # the int8 codes are s8 parameters either way: look for the s8 x s8 -> s32 contraction itself,
    # inside the scan's body (the grouped dot batches over the 3 groups of the ragged axis)
    integer_dots = [line for line in hlo.splitlines() if re.search(r"= s32\[[^\]]*\][^ ]* dot\(", line) and "while/body" in line]
    assert len(integer_dots) == 1, integer_dots
