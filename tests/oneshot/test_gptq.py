"""GPTQ: per-matrix algorithm vs a float64 NumPy reference, never worse than round-to-nearest,
degenerate calibration, and the tree-level function's QArrays."""

import dataclasses
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.oneshot.gptq import gptq, gptq_matrix


def _find_params(values, bits, symmetric, importance=None, ratios=()):
    """Per-row scale / zero of a (d_out, n) block, jaxcompress's absmax rule, float64; with
    ``ratios``, the clipping search: the range shrunk by each ratio, the least
    importance-weighted rounding error per row wins (ratio 1 first, ties keep the earlier)."""

    def params(lo, hi):
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = np.maximum(np.abs(lo), np.abs(hi)) / qmax
            scale = np.where(scale > 0, scale, 1.0)
            return scale, np.zeros_like(scale), -qmax, qmax
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = (hi - lo) / (qmax - qmin)
        scale = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(qmin - lo / scale), qmin, qmax)
        return scale, zero, qmin, qmax

    lo, hi = np.minimum(values.min(1), 0), np.maximum(values.max(1), 0)
    best = params(lo, hi)
    if not len(ratios):
        return best

    def error(scale, zero, qmin, qmax):
        c = np.clip(np.round(values / scale[:, None]) + zero[:, None], qmin, qmax)
        return np.sum(importance[None, :] * ((c - zero[:, None]) * scale[:, None] - values) ** 2, axis=1)

    best_err = error(*best)
    scale, zero = best[0].copy(), best[1].copy()
    for r in ratios:
        s_r, z_r, qmin, qmax = params(lo * r, hi * r)
        err = error(s_r, z_r, qmin, qmax)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        scale, zero = np.where(better, s_r, scale), np.where(better, z_r, zero)
    return scale, zero, best[2], best[3]


def reference_gptq(W, H, bits, group_size, symmetric=True, act_order=False, static_groups=False, damp=0.01,
                   clip_ratios=()):
    """The algorithm one column at a time (no lazy blocks), float64: groups contiguous in the
    original order (the last one shorter when group_size does not divide d_in); a group's scale
    is set when its first column is processed, from the current weights (or from the original
    weights with static_groups), optionally by the clipping search weighted by diag(H)."""
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    d_out, d_in = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(d_in)
    importance = np.diag(H)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(d_in)
    groups = np.arange(d_in) // group_size
    U = np.linalg.cholesky(np.linalg.inv(H[np.ix_(perm, perm)])).T
    scales = {}
    if static_groups:
        for g in range(-(-d_in // group_size)):
            scales[g] = _find_params(W[:, groups == g], bits, symmetric, importance[groups == g], clip_ratios)
    Wp = W[:, perm].copy()
    codes = np.zeros_like(W)
    Q = np.zeros_like(W)
    for j in range(d_in):
        g = groups[perm[j]]
        if g not in scales:
            members = groups[perm] == g
            scales[g] = _find_params(Wp[:, members], bits, symmetric, importance[perm][members], clip_ratios)
        scale, zero, qmin, qmax = scales[g]
        w = Wp[:, j]
        c = np.clip(np.round(w / scale) + zero, qmin, qmax)
        q = (c - zero) * scale
        Wp[:, j:] -= np.outer((w - q) / U[j, j], U[j, j:])
        codes[:, perm[j]], Q[:, perm[j]] = c, q
    return Q, codes


def _layer(seed, d_out=12, d_in=32, rows=200):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, d_in)) * rng.uniform(0.1, 3.0, size=d_in)  # uneven input scales
    X[:, : d_in // 4] += 0.5 * X[:, d_in // 4 : d_in // 2]  # correlated inputs
    W = rng.normal(size=(d_out, d_in))
    return W.astype(np.float32), X.astype(np.float32)


def _error(Wq, W, X):
    return float(np.sum(((np.asarray(Wq, np.float64) - W) @ np.asarray(X, np.float64).T) ** 2))


@pytest.mark.parametrize(
    "bits, group_size, symmetric, act_order, static_groups, block_size, clip",
    [
        (4, 32, True, False, False, 8, False),
        (3, 8, False, False, False, 16, False),
        (4, 8, True, True, False, 16, False),
        (8, 16, False, True, True, 32, False),
        (3, 16, True, True, False, 6, False),  # block 4 (largest divisor of 32 <= 6): groups straddle blocks
        (4, 12, False, True, False, 8, False),  # ragged: groups of 12, 12, 8
        (4, 12, True, False, True, 16, True),  # ragged, static groups, clipping search
        (3, 8, False, True, False, 16, True),  # clipping search on the current (updated) weights
        (4, 20, False, False, False, 32, True),  # ragged 20 + 12, clipping search
    ],
)
def test_matches_numpy_reference(bits, group_size, symmetric, act_order, static_groups, block_size, clip):
    W, X = _layer(bits + group_size)
    H = 2 * X.T.astype(np.float64) @ X / len(X)
    result = gptq_matrix(W, H, bits, group_size, symmetric=symmetric, act_order=act_order,
                         static_groups=static_groups, block_size=block_size, clip_search=clip,
                         clip_grid=10, clip_min_ratio=0.6)
    ratios = np.linspace(1.0, 0.6, 11)[1:] if clip else ()
    Q_ref, codes_ref = reference_gptq(W, H, bits, group_size, symmetric, act_order, static_groups,
                                      clip_ratios=ratios)
    agree = np.mean(np.asarray(result.codes) == codes_ref)
    # float32 vs float64: an occasional tie flips a code; with the clipping search a flipped ratio
    # moves a whole group's codes, hence the lower bound there
    assert agree >= (0.95 if clip else 0.97), agree
    np.testing.assert_allclose(_error(result.weights, W, X), _error(Q_ref, W, X), rtol=0.05)
    assert np.all(np.asarray(result.codes) == np.round(np.asarray(result.codes)))
    groups = np.arange(32) // group_size
    assert result.scale.shape == (groups.max() + 1, 12)
    scale_cols = np.asarray(result.scale)[groups].T
    zero_cols = np.asarray(result.zero_point)[groups].T
    np.testing.assert_array_equal(result.weights, (np.asarray(result.codes) - zero_cols) * scale_cols)


def test_clipping_search_lowers_the_output_error():
    # Heavy-tailed weights: the absmax range wastes levels on a few outliers per group.
    rng = np.random.default_rng(11)
    W = (rng.standard_t(3, size=(24, 96))).astype(np.float32)
    X = (rng.normal(size=(400, 96)) * rng.uniform(0.2, 2.0, size=96)).astype(np.float32)
    H = 2 * X.T @ X
    for symmetric in (True, False):
        plain = gptq_matrix(W, H, 3, 32, symmetric=symmetric)
        searched = gptq_matrix(W, H, 3, 32, symmetric=symmetric, clip_search=True)
        assert _error(searched.weights, W, X) < _error(plain.weights, W, X)


@pytest.mark.parametrize("seed", range(3))
def test_never_worse_than_round_to_nearest(seed):
    W, X = _layer(100 + seed, d_out=16, d_in=64, rows=300)
    H = 2 * X.T @ X
    for group_size, act_order in [(None, False), (16, False), (16, True)]:
        result = gptq_matrix(W, H, 4, group_size, act_order=act_order, static_groups=True)
        # round to nearest with the same scales: jaxcompress.quantize on the (in, out) kernel
        rtn = jc.quantize(jnp.asarray(W.T), bits=4, channel_axes=(-1,), group_size=group_size or 64)
        assert _error(result.weights, W, X) <= _error(jc.dequantize(rtn).T, W, X)
        dynamic = gptq_matrix(W, H, 4, group_size, act_order=act_order)
        assert _error(dynamic.weights, W, X) <= _error(jc.dequantize(rtn).T, W, X)


def test_degenerate_calibration_warns_and_stays_finite():
    W, X = _layer(7)
    with pytest.warns(UserWarning, match="32 of 32 inputs are zero"):
        result = gptq_matrix(W, np.zeros((32, 32)), 4, 8)
    assert np.all(np.asarray(result.weights) == 0)  # dead inputs: weights zeroed, as in the paper
    with pytest.warns(UserWarning, match="rounded to nearest"):
        kept = gptq_matrix(W, np.zeros((32, 32)), 4, 8, zero_dead=False)
    rtn = jc.dequantize(jc.quantize(jnp.asarray(W.T), bits=4, channel_axes=(-1,), group_size=8)).T
    np.testing.assert_allclose(kept.weights, rtn, atol=1e-6)  # H = I: plain rounding
    # fewer samples than inputs (rank 3 of 32), one dead input
    X_few = X[:3].copy()
    X_few[:, 5] = 0
    with pytest.warns(UserWarning, match="1 of 32 inputs"):
        few = gptq_matrix(W, 2 * X_few.T @ X_few, 4, 8)
    assert np.all(np.isfinite(np.asarray(few.weights)))
    # tiny damping on a rank-deficient H: finite (retried with more damping if float32 fails)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = gptq_matrix(W, 2 * X[:3].T @ X[:3], 4, 8, damp=1e-9)
    assert np.all(np.isfinite(np.asarray(tiny.weights)))
    with pytest.raises(ValueError, match="group_size must be a positive int, got 0"):
        gptq_matrix(W, np.eye(32), 4, 0)
    with pytest.raises(ValueError, match="column_groups must use every group index"):
        gptq_matrix(W, np.eye(32), 4, column_groups=np.arange(32) // 8 * 2)  # groups 1, 3, 5 unused
    with pytest.raises(ValueError, match="0 < clip_min_ratio <= 1"):
        gptq_matrix(W, np.eye(32), 4, 8, clip_search=True, clip_min_ratio=0.0)


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(16, name=n)(x) for n in ("query", "key", "value"))
        x = x + nn.Dense(16, name="out")(jax.nn.softmax(q @ k.swapaxes(-1, -2) / 4.0) @ v)
        h = nn.Conv(8, (3,), name="conv")(x)
        return nn.DenseGeneral((2, 8), name="head")(jax.nn.gelu(h))


def _model_setup():
    model = _Model()
    batches = [jax.random.normal(jax.random.key(i), (4, 6, 16)) for i in range(3)]
    params = model.init(jax.random.key(5), batches[0])
    return model, params, batches


def _tree_error(model, params, batches, reference):
    return sum(float(jnp.sum((model.apply(params, x) - reference(x)) ** 2)) for x in batches)


def test_tree_level_qarrays_match_quantize_params_layout():
    model, params, batches = _model_setup()
    rules = [
        jc.QuantRule(pattern=r".*conv/kernel", bits=4, channel_axes=(-1,), group_size=8),
        jc.QuantRule(pattern=r".*head/kernel", bits=4, channel_axes=(1, 2), symmetric=False),
        jc.QuantRule(pattern=r".*kernel", bits=4, channel_axes=(-1,), group_size=8, scale_dtype="bfloat16"),
    ]
    qparams, report = gptq(model.apply, params, batches, rules, block_size=8, act_order=True)
    rtn, _ = jc.quantize_params(params, rules)
    for path in report.quantized:
        layer = report.layer(path)
        assert layer.method == "gptq" and layer.error <= layer.rtn_error, layer
    flat_q = jax.tree_util.tree_leaves(qparams, is_leaf=lambda x: isinstance(x, jc.QArray))
    flat_r = jax.tree_util.tree_leaves(rtn, is_leaf=lambda x: isinstance(x, jc.QArray))
    for q, r in zip(flat_q, flat_r):
        assert type(q) is type(r)
        if isinstance(q, jc.QArray):  # same layout, dtypes and metadata as quantize_params
            for field in ("values", "scale", "zero_point"):
                a, b = getattr(q, field), getattr(r, field)
                assert (a is None) == (b is None) and (a is None or (a.shape, a.dtype) == (b.shape, b.dtype))
            assert jax.tree_util.tree_structure(q) == jax.tree_util.tree_structure(r)
    # compressed runs the QArrays and equals the dequantized float model
    x = batches[0]
    dequantized = jc.dequantize_params(qparams)
    np.testing.assert_allclose(jc.compressed(model.apply)(qparams, x), model.apply(dequantized, x), rtol=2e-4, atol=2e-4)
    reference = lambda x: model.apply(params, x)
    assert _tree_error(model, dequantized, batches, reference) < _tree_error(model, jc.dequantize_params(rtn), batches, reference)


@pytest.mark.parametrize("sequential", [False, "stages"])
def test_tree_level_modes_unreached_leaves_and_errors(sequential):
    model, params, batches = _model_setup()
    params = jax.tree.map(lambda x: x, params)
    params["params"]["extra"] = jnp.ones((4, 8))  # matched but feeds no dot: round to nearest
    rules = [jc.QuantRule(pattern=r".*head/kernel", bits=8, channel_axes=(1, 2)),
             jc.QuantRule(pattern=r".*(kernel|extra)", bits=8, channel_axes=(-1,))]
    if sequential == "stages":  # one capture pass for the attention block, one for the rest
        sequential = lambda path: "attention" if path.split("/")[1] in ("query", "key", "value", "out") else "rest"
    qparams, report = gptq(model.apply, params, batches, rules, sequential=sequential)
    assert all(layer.error <= layer.rtn_error for layer in report.layers if layer.method == "gptq")
    assert report.layer("params/extra").method == "rtn" and isinstance(qparams["params"]["extra"], jc.QArray)
    assert "rtn" in next(d.spec for d in report.leaves if d.path == "params/extra")
    with pytest.raises(ValueError, match="at least one calibration batch"):
        gptq(model.apply, params, [], rules)
    bad = [jc.QuantRule(pattern=r".*head/kernel", bits=4, channel_axes=(2,))]  # scale shared across outputs
    with pytest.raises(ValueError, match="head'\\]\\['kernel'\\]: GPTQ needs each scale"):
        gptq(model.apply, params, batches, bad)


class _Ragged(nn.Module):
    @nn.compact
    def __call__(self, x):  # inputs of 40 and 24 features: groups of 16 leave 8 in the last one
        return nn.Dense(8, name="second")(jax.nn.gelu(nn.Dense(24, name="first")(x)))


@pytest.mark.parametrize("activation", ["weight_only", "dynamic"])
def test_tree_level_ragged_asymmetric_through_compressed(activation):
    model = _Ragged()
    batches = [jax.random.normal(jax.random.key(i), (64, 40)) for i in range(2)]
    params = model.init(jax.random.key(9), batches[0])
    rules = [jc.QuantRule(pattern=r".*kernel", bits=4, channel_axes=(-1,), group_size=16, symmetric=False,
                          activation=activation)]
    qparams, report = gptq(model.apply, params, batches, rules)
    first = qparams["params"]["first"]["kernel"]
    assert first.scale.shape == (3, 24) and first.zero_point.shape == (3, 24)
    assert qparams["params"]["second"]["kernel"].scale.shape == (2, 8)
    assert all(layer.method == "gptq" and layer.error < layer.rtn_error for layer in report.layers)
    x = batches[0]
    want = np.asarray(model.apply(jc.dequantize_params(qparams), x), np.float64)
    got = np.asarray(jc.compressed(model.apply)(qparams, x), np.float64)
    # weight-only: the same float math; dynamic: int8 x int4 dots with the zero-point term, int8
    # activations per row (a relative error of a few 1e-3), never the error of a dropped zero point
    tol = 2e-4 if activation == "weight_only" else 3e-2
    assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want))
    if activation == "dynamic":
        hlo = jax.jit(jc.compressed(model.apply)).lower(qparams, x).compile().as_text()
        assert re.search(r"= s32\[[^\]]*\][^ ]* dot\(", hlo), "no s8 x s8 -> s32 dot"
        dropped = jc.dequantize_params(jax.tree.map(  # the same codes, zero points ignored
            lambda q: dataclasses.replace(q, zero_point=jnp.zeros_like(q.zero_point)) if isinstance(q, jc.QArray) else q,
            qparams, is_leaf=lambda v: isinstance(v, jc.QArray)))
        assert np.max(np.abs(np.asarray(model.apply(dropped, x)) - want)) > 10 * tol * np.max(np.abs(want))
