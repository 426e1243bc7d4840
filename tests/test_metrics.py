"""Per-leaf metrics: SQNR against a float64 formula, byte totals and ratio."""

import json
import math

import jax.numpy as jnp
import numpy as np

import jaxcompress as jc


def test_sqnr_matches_float64_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    q = jc.quantize(x, bits=4, channel_axes=(-1,))
    dq = np.asarray(jc.dequantize(q), np.float64)
    x64 = x.astype(np.float64)
    expected = 10 * np.log10(np.sum(x64**2) / np.sum((x64 - dq) ** 2))
    assert abs(jc.sqnr_db(x, jc.dequantize(q)) - expected) < 1e-3
    assert jc.sqnr_db(x, x) == math.inf
    assert jc.sqnr_db(np.zeros(3), np.zeros(3)) == math.inf


def test_totals_ratio_and_median():
    params = {"a": jnp.ones((128, 64)), "b": jnp.linspace(-1, 1, 64 * 32).reshape(64, 32), "bias": jnp.ones(32)}
    qparams, _ = jc.quantize_params(params, [jc.QuantRule(pattern="a|b", bits=8, channel_axes=(-1,))])
    m = jc.quantization_metrics(params, qparams)
    by_path = {leaf.path: leaf for leaf in m.leaves}
    assert by_path["a"].bytes_before == 128 * 64 * 4 and by_path["a"].bytes_after == 128 * 64 + 64 * 4
    assert by_path["bias"].bytes_after == by_path["bias"].bytes_before == 128 and by_path["bias"].sqnr_db is None
    assert m.bytes_before == sum(leaf.bytes_before for leaf in m.leaves)
    assert m.ratio == m.bytes_before / m.bytes_after
    assert by_path["a"].sqnr_db == math.inf  # a constant tensor quantizes exactly
    assert m.median_sqnr_db == float(np.median([by_path["a"].sqnr_db, by_path["b"].sqnr_db]))
    json.dumps(m.to_dict())  # JSON-ready (infinities become null)
    assert "ratio" in m.table() and "b" in m.table()
