"""Input-drift-aware targets: the cross-term capture and ``W*`` vs float64 NumPy references, and
``dense_target=`` in GPTQ / SparseGPT / Wanda lowering the error against the DENSE model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.oneshot.capture import GroupCapture, SegmentedCapture, sequential_capture
from jaxcompress.oneshot.gptq import gptq
from jaxcompress.oneshot.sparsegpt import sparsegpt
from jaxcompress.oneshot.targets import dense_target_weight
from jaxcompress.oneshot.wanda import wanda


def _mlp(seed=0, rows=(40, 56)):
    keys = jax.random.split(jax.random.key(seed), 5)
    params = {"a": jax.random.normal(keys[0], (8, 16)) / 3, "b": jax.random.normal(keys[1], (16, 12)) / 4,
              "c": jax.random.normal(keys[2], (12, 4)) / 3}
    fn = lambda p, x: jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) @ p["c"]
    batches = [jax.random.normal(keys[3], (rows[0], 8)), jax.random.normal(keys[4], (rows[1], 8))]
    return fn, params, batches


@pytest.mark.parametrize("kind", ["segmented", "group"])
def test_cross_term_matches_numpy(kind):
    fn, params, batches = _mlp()
    groups = [["a"], ["b"], ["c"]]
    if kind == "segmented":
        capture = sequential_capture(fn, params, groups, batches, dense_params=params)
        assert isinstance(capture, SegmentedCapture)
    else:
        capture = GroupCapture(fn, params, groups, batches, dense_params=params)
    compressed = {"a": params["a"] * 0.7, "b": params["b"] + 0.05, "c": params["c"]}
    with capture:
        stats = [capture(0, params), capture(1, {**params, "a": compressed["a"]}), capture(2, compressed)]
    x = np.concatenate([np.asarray(b, np.float64) for b in batches])
    a, b = (np.asarray(params[k], np.float64) for k in "ab")
    qa, qb = (np.asarray(compressed[k], np.float64) for k in "ab")
    inputs_d = [x, np.tanh(x @ a), np.tanh(np.tanh(x @ a) @ b)]
    inputs_q = [x, np.tanh(x @ qa), np.tanh(np.tanh(x @ qa) @ qb)]
    for stat, path, xq, xd in zip(stats, "abc", inputs_q, inputs_d):
        np.testing.assert_allclose(stat[path].cross, xq.T @ xd, rtol=1e-4, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(stat[path].hessian, xq.T @ xq, rtol=1e-4, atol=1e-4, err_msg=path)


def test_cross_term_respects_the_row_mask():
    fn, params, batches = _mlp()
    masks = [np.arange(len(b)) % 3 != 0 for b in batches]
    batches = [(b, jnp.asarray(m)) for b, m in zip(batches, masks)]
    masked_fn = lambda p, x, m: fn(p, x)
    with sequential_capture(masked_fn, params, [["a"], ["b"]], batches, dense_params=params,
                            row_mask=lambda batch: batch[1]) as capture:
        capture(0, params)
        stats = capture(1, {**params, "a": params["a"] * 0.5})["b"]
    x = np.concatenate([np.asarray(b[0], np.float64)[m] for b, m in zip(batches, masks)])
    a = np.asarray(params["a"], np.float64)
    np.testing.assert_allclose(stats.cross, np.tanh(x @ (a * 0.5)).T @ np.tanh(x @ a), rtol=1e-4, atol=1e-4)
    assert stats.count == x.shape[0]


def test_dense_target_weight_solves_the_ridge_normal_equations():
    rng = np.random.default_rng(1)
    x_d = rng.normal(size=(300, 6))
    x = x_d + 0.3 * rng.normal(size=(300, 6))
    W = rng.normal(size=(3, 6))
    H, C = x.T @ x, x.T @ x_d
    lam = 0.2 * np.mean(np.diag(H))
    target = dense_target_weight(W, H, C, damp=0.2)
    # Gradient of sum ||V x - W x_d||^2 + lam ||V - W||^2 vanishes at the target.
    np.testing.assert_allclose(target @ H - W @ C.T + lam * (target - W), 0, atol=1e-9)
    with pytest.raises(ValueError, match="damp > 0"):
        dense_target_weight(W, H, C, damp=0.0)
    with pytest.raises(ValueError, match="weight: expected weight"):
        dense_target_weight(W, H[:5, :5], C)


def _dense_output_error(fn, params, compressed, batches):
    return sum(float(jnp.sum((fn(compressed, b) - fn(params, b)) ** 2)) for b in batches)


def test_gptq_dense_target_lowers_the_error_against_the_dense_model():
    fn, params, batches = _mlp(rows=(400, 400))
    rule = jc.QuantRule(pattern=".*", bits=3, channel_axes=(-1,), group_size=8)
    plain, _ = gptq(fn, params, batches, [rule], dense_target=False)
    drift, report = gptq(fn, params, batches, [rule])  # the default: dense_target=True
    errors = [_dense_output_error(fn, params, jc.dequantize_params(q), batches) for q in (plain, drift)]
    assert errors[1] < 0.9 * errors[0], errors
    assert all(layer.error <= layer.rtn_error for layer in report.layers)
    # The first layer sees no drift: it is quantized exactly as without the dense target.
    np.testing.assert_array_equal(np.asarray(drift["a"].values), np.asarray(plain["a"].values))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_pruning_dense_target_lowers_the_error_against_the_dense_model(method):
    fn, params, batches = _mlp(rows=(400, 400))
    prune = sparsegpt if method == "sparsegpt" else wanda
    rules = [jc.PruneRule(pattern=".*", sparsity=0.5)]
    plain, _ = prune(fn, params, batches, rules, reconstruct=True, dense_target=False)
    drift, masks = prune(fn, params, batches, rules, reconstruct=True, dense_target=True)
    errors = [_dense_output_error(fn, params, p, batches) for p in (plain, drift)]
    assert errors[1] < 0.9 * errors[0], errors
    assert all(float(jnp.mean(m)) == 0.5 for m in jax.tree_util.tree_leaves(masks))
    assert all(bool(jnp.all(jnp.where(m, True, p == 0))) for m, p in zip(jax.tree_util.tree_leaves(masks),
                                                                         jax.tree_util.tree_leaves(drift)))


def test_dense_target_without_sequential_changes_nothing():
    fn, params, batches = _mlp()
    rules = [jc.PruneRule(pattern=".*", sparsity=0.5)]
    one_pass, _ = sparsegpt(fn, params, batches, rules, sequential=False, dense_target=False)
    drift, _ = sparsegpt(fn, params, batches, rules, sequential=False, dense_target=True)
    for want, got in zip(jax.tree_util.tree_leaves(one_pass), jax.tree_util.tree_leaves(drift)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("flow", ["fori", "cond"])
def test_dense_target_defaults_run_with_weights_inside_control_flow(flow):
    # a weight used inside a loop / cond body gets no cross term (its dense rows belong to the
    # dense run's body trace): it keeps the plain target, the others still get theirs
    keys = jax.random.split(jax.random.key(3), 4)
    params = {"a": jax.random.normal(keys[0], (8, 16)) / 3, "b": jax.random.normal(keys[1], (16, 16)) / 4,
              "c": jax.random.normal(keys[2], (16, 4)) / 3}

    def fn(p, x):
        h = jnp.tanh(x @ p["a"])
        if flow == "fori":
            h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p["b"]), h)
        else:
            h = jax.lax.cond(jnp.sum(x) > -1e9, lambda h: jnp.tanh(h @ p["b"]), lambda h: h, h)
        return h @ p["c"]

    batches = [jax.random.normal(keys[3], (64, 8))]
    for method, rules in ((gptq, [jc.QuantRule(pattern=".*", bits=4, channel_axes=(-1,))]),
                          (sparsegpt, [jc.PruneRule(pattern=".*", sparsity=0.5)])):
        plain = method(fn, params, batches, rules, dense_target=False)[0]
        drift = method(fn, params, batches, rules)[0]  # the defaults: dense_target=True
        as_array = lambda leaf: np.asarray(leaf.dequantize() if isinstance(leaf, jc.QArray) else leaf)
        np.testing.assert_array_equal(as_array(drift["b"]), as_array(plain["b"]))  # no cross term in the body
        assert not np.array_equal(as_array(drift["c"]), as_array(plain["c"]))  # the target applies outside it
