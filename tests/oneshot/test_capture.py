"""Calibration capture: statistics vs a float64 NumPy reference, matrix views, sequential groups."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.oneshot.capture import capture_statistics, from_matrix, sequential_groups, to_matrix


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 2), strides=(1, 2), padding="SAME")(x)
        x = jax.nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(6)(x)
        return nn.DenseGeneral((2, 3), axis=-1)(jax.nn.gelu(x))


def _np_stats(rows):
    rows = np.asarray(rows, np.float64)
    return rows.T @ rows, (rows**2).sum(0), np.abs(rows).sum(0), np.abs(rows).max(0), rows.shape[0]


def _check(stats, rows):
    hessian, sq, abs_sum, absmax, count = _np_stats(rows)
    np.testing.assert_allclose(stats.hessian, hessian, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats.sq_norms, sq, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats.abs_sums, abs_sum, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats.absmax, absmax, rtol=1e-6)
    assert stats.count == count


def _im2col(x, kh, kw, stride, pads):
    """NHWC patches, rows ordered (n, oh, ow), columns (c, i, j): float64 reference."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    n, h, w, c = x.shape
    oh, ow = (h - kh) // stride[0] + 1, (w - kw) // stride[1] + 1
    rows = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = x[b, i * stride[0] : i * stride[0] + kh, j * stride[1] : j * stride[1] + kw, :]
                rows.append(np.transpose(patch, (2, 0, 1)).ravel())
    return np.array(rows)


def test_statistics_match_numpy_for_conv_dense_and_dense_general():
    model = _Net()
    batches = [jax.random.normal(jax.random.key(i), (2, 5, 6, 3)) for i in range(3)]
    params = model.init(jax.random.key(9), batches[0])
    stats = capture_statistics(model.apply, params, batches, r".*kernel")
    assert list(stats) == ["params/Conv_0/kernel", "params/Dense_0/kernel", "params/DenseGeneral_0/kernel"]
    p = params["params"]
    conv_rows, dense_rows, general_rows = [], [], []
    for x in batches:
        # SAME padding for kernel (3, 2), strides (1, 2) on 5 x 6: pads (1, 1) and (0, 0)
        conv_rows.append(_im2col(x, 3, 2, (1, 2), ((1, 1), (0, 0))))
        h = jax.nn.relu(nn.Conv(4, (3, 2), strides=(1, 2), padding="SAME").apply({"params": p["Conv_0"]}, x)).reshape(2, -1)
        dense_rows.append(h)
        general_rows.append(jax.nn.gelu(nn.Dense(6).apply({"params": p["Dense_0"]}, h)))
    _check(stats["params/Conv_0/kernel"], np.concatenate(conv_rows))
    _check(stats["params/Dense_0/kernel"], np.concatenate(dense_rows))
    _check(stats["params/DenseGeneral_0/kernel"], np.concatenate(general_rows))


def test_matrix_views_reproduce_the_layer_and_round_trip():
    model = _Net()
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    params = model.init(jax.random.key(1), x)
    stats = capture_statistics(model.apply, params, [x], r".*kernel")
    p = params["params"]
    conv = stats["params/Conv_0/kernel"]
    W = to_matrix(p["Conv_0"]["kernel"], conv)
    assert W.shape == (4, 3 * 2 * 3)
    # conv output == im2col rows @ W.T
    out = nn.Conv(4, (3, 2), strides=(1, 2), padding="SAME", use_bias=False).apply({"params": {"kernel": p["Conv_0"]["kernel"]}}, x)
    np.testing.assert_allclose(_im2col(x, 3, 2, (1, 2), ((1, 1), (0, 0))) @ np.asarray(W, np.float64).T, np.asarray(out).reshape(-1, 4), rtol=1e-4, atol=1e-5)
    general = stats["params/DenseGeneral_0/kernel"]
    kernel = p["DenseGeneral_0"]["kernel"]  # (6, 2, 3)
    np.testing.assert_array_equal(to_matrix(kernel, general), np.asarray(kernel).reshape(6, 6).T)
    for path, leaf in [("params/Conv_0/kernel", p["Conv_0"]["kernel"]), ("params/DenseGeneral_0/kernel", kernel)]:
        back = from_matrix(to_matrix(leaf, stats[path]), leaf, stats[path])
        assert back.dtype == leaf.dtype
        np.testing.assert_array_equal(back, leaf)


def test_transposed_and_reshaped_weight_view():
    # weight stored (out, in) used as x @ w.T, and a (2, 3, 4) leaf reshaped to (6, 4) with 6 contracted
    params = {"a": jax.random.normal(jax.random.key(0), (5, 3)), "b": jax.random.normal(jax.random.key(1), (1, 5, 4))}
    fn = lambda p, x: (x @ p["a"].T) @ p["b"].reshape(5, 4)
    x = jax.random.normal(jax.random.key(2), (7, 3))
    stats = capture_statistics(fn, params, [x], lambda path: True)
    np.testing.assert_array_equal(to_matrix(params["a"], stats["a"]), params["a"])
    np.testing.assert_array_equal(to_matrix(params["b"], stats["b"]), params["b"].reshape(5, 4).T)
    for name in "ab":
        np.testing.assert_array_equal(from_matrix(to_matrix(params[name], stats[name]), params[name], stats[name]), params[name])
    _check(stats["b"], np.asarray(x, np.float64) @ np.asarray(params["a"], np.float64).T)


def test_tied_weights_pool_rows_and_unused_leaves_are_absent():
    params = {"w": jax.random.normal(jax.random.key(0), (4, 4)), "unused": jnp.ones((4, 4)), "table": jnp.ones((3, 4))}
    fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"] + p["table"][0]
    x = jax.random.normal(jax.random.key(1), (3, 4))
    stats = capture_statistics(fn, params, [x, 2 * x], lambda path: True)
    assert set(stats) == {"w"} and stats["w"].num_sites == 2
    rows = []
    for batch in (x, 2 * x):
        rows += [batch, jnp.tanh(batch @ params["w"])]
    _check(stats["w"], np.concatenate([np.asarray(r) for r in rows]))


def test_degenerate_input_and_many_rows_accumulate_in_float64():
    params = {"w": jnp.ones((3, 2))}
    fn = lambda p, x: x @ p["w"]
    stats = capture_statistics(fn, params, [jnp.zeros((4, 3))], "w")
    assert stats["w"].count == 4 and not stats["w"].hessian.any() and not stats["w"].absmax.any()
    # 40 batches of 512 rows: float32 within a batch (the dot's accumulation), float64 across batches
    batch = jnp.full((512, 3), 0.1, jnp.float32)
    stats = capture_statistics(fn, params, [batch] * 40, "w")
    assert stats["w"].hessian.dtype == np.float64 and stats["w"].count == 40 * 512
    expected = 40 * 512 * np.float64(np.float32(0.1)) ** 2
    np.testing.assert_allclose(stats["w"].hessian, np.full((3, 3), expected), rtol=2e-5)
    no_hessian = capture_statistics(fn, params, [batch], "w", hessian=False)
    assert no_hessian["w"].hessian is None and no_hessian["w"].sq_norms.shape == (3,)


def test_select_accepts_rules_and_errors_are_clear():
    model = _Net()
    x = jnp.ones((1, 5, 6, 3))
    params = model.init(jax.random.key(1), x)
    rules = [jc.QuantRule(pattern=r".*Conv_0/kernel", skip=True), jc.QuantRule(pattern=r".*kernel", bits=4)]
    assert list(capture_statistics(model.apply, params, [x], rules)) == ["params/Dense_0/kernel", "params/DenseGeneral_0/kernel"]
    with pytest.raises(ValueError, match="at least one batch"):
        capture_statistics(model.apply, params, [], rules)
    depthwise = {"k": jnp.ones((3, 3, 1, 4))}
    conv = lambda p, x: jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    with pytest.raises(ValueError, match="k: grouped convolutions"):
        capture_statistics(conv, depthwise, [jnp.ones((1, 5, 5, 4))], "k")


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(8, name=n)(x) for n in ("query", "key", "value"))
        attn = jax.nn.softmax(q @ k.swapaxes(-1, -2)) @ v
        x = x + nn.Dense(8, name="out")(attn)
        return nn.Dense(8, name="mlp")(jax.nn.gelu(x))


def test_sequential_groups_follow_program_order_and_shared_inputs():
    x = jnp.ones((2, 3, 8))
    params = _Block().init(jax.random.key(0), x)
    groups = sequential_groups(_Block().apply, params, x, r".*kernel")
    assert groups == [
        ("params/query/kernel", "params/key/kernel", "params/value/kernel"),
        ("params/out/kernel",),
        ("params/mlp/kernel",),
    ]


def test_row_mask_drops_padding_rows():
    params = {"w": jnp.ones((3, 2))}
    fn = lambda p, x, mask: (x @ p["w"]) * mask[..., None]
    x = jax.random.normal(jax.random.key(0), (2, 4, 3))
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    stats = capture_statistics(fn, params, [(x, mask)], "w", row_mask=lambda batch: batch[1])
    _check(stats["w"], np.asarray(x)[np.asarray(mask) > 0])
    with pytest.raises(ValueError, match="w: row_mask of shape"):
        capture_statistics(fn, params, [(x, mask)], "w", row_mask=lambda batch: batch[1].T)


# ---- sequential capture: one pass of the function (SegmentedCapture) vs one pass per group -------


class _Stack(nn.Module):
    """Two pre-LN blocks, a stem and a head: residual adds, shared q/k/v inputs, a jitted
    helper that transposes its weight before the dot (a static weight computation ahead of the
    site, which must be replayed, not carried, once the weight is compressed)."""

    @nn.compact
    def __call__(self, x, mask):
        x = nn.Dense(8, name="stem")(x)
        for i in range(2):
            h = nn.LayerNorm(name=f"ln{i}")(x)
            q, k, v = (nn.Dense(8, name=f"{n}{i}")(h) for n in ("query", "key", "value"))
            scores = jnp.where(mask[:, None, :] > 0, q @ k.swapaxes(-1, -2), -1e9)
            x = x + nn.Dense(8, name=f"out{i}")(jax.nn.softmax(scores) @ v)
            w = self.param(f"mlp{i}", nn.initializers.lecun_normal(), (8, 8))
            x = x + _transposed_dot(jax.nn.gelu(x), w)
        return nn.Dense(3, name="head")(x)


@jax.jit
def _transposed_dot(x, w):
    return x @ w.T.T


def _round_group(params, group):
    """A stand-in for compressing a group: round its leaves to a coarse grid."""
    flat = {jc.rules.path_to_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    rounded = {path: (jnp.round(leaf * 4) / 4 if path in group else leaf) for path, leaf in flat.items()}
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, [rounded[jc.rules.path_to_str(p)] for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]])


def _run_groups(capture, params, groups):
    out = []
    with capture:
        for index, group in enumerate(groups):
            out.append(capture(index, params))
            params = _round_group(params, group)
    return out


def _assert_same_statistics(expected, actual):
    assert [list(g) for g in expected] == [list(g) for g in actual]
    for want, got in zip(expected, actual):
        for path in want:
            np.testing.assert_allclose(got[path].hessian, want[path].hessian, rtol=2e-5, atol=2e-4, err_msg=path)
            np.testing.assert_allclose(got[path].absmax, want[path].absmax, rtol=2e-5, atol=1e-5, err_msg=path)
            assert (got[path].count, got[path].num_sites, got[path].view) == (want[path].count, want[path].num_sites, want[path].view)


@pytest.mark.parametrize("compile_ahead", [True, False])
def test_segmented_capture_matches_one_pass_per_group(compile_ahead):
    from jaxcompress.oneshot.capture import GroupCapture, SegmentedCapture, sequential_capture

    model = _Stack()
    keys = jax.random.split(jax.random.key(0), 3)
    batches = [  # two shapes, padding masked out of the statistics
        (jax.random.normal(keys[0], (3, 5, 4)), jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])),
        (jax.random.normal(keys[1], (2, 7, 4)), jnp.ones((2, 7), jnp.int32)),
        (jax.random.normal(keys[2], (3, 5, 4)), jnp.ones((3, 5), jnp.int32)),
    ]
    params = model.init(jax.random.key(1), *batches[0])
    groups = sequential_groups(model.apply, params, batches[0], r".*(kernel|mlp\d)")
    assert [len(g) for g in groups] == [1, 3, 1, 1, 3, 1, 1, 1]  # stem, qkv0, out0, mlp0, qkv1, ...
    kwargs = dict(row_mask=lambda batch: batch[1], compile_ahead=compile_ahead)
    selections = [frozenset(g).__contains__ for g in groups]
    segmented = sequential_capture(model.apply, params, selections, batches, **kwargs)
    assert isinstance(segmented, SegmentedCapture)
    expected = _run_groups(GroupCapture(model.apply, params, selections, batches, **kwargs), params, groups)
    _assert_same_statistics(expected, _run_groups(segmented, params, groups))
    # The statistics do see the compressed predecessors: rounding changes the later groups' inputs.
    uncompressed = GroupCapture(model.apply, params, selections, batches, **kwargs)
    assert not np.allclose(uncompressed(7, params)["params/head/kernel"].hessian, expected[7]["params/head/kernel"].hessian)
    with sequential_capture(model.apply, params, selections, batches, **kwargs) as capture:
        with pytest.raises(ValueError, match="in order: expected group 0, got 1"):
            capture(1, params)


@pytest.mark.parametrize("case", ["tied weight used again later", "weight used by activations before its group"])
def test_sequential_capture_falls_back_when_groups_interleave(case):
    from jaxcompress.oneshot.capture import GroupCapture, sequential_capture

    keys = jax.random.split(jax.random.key(2), 4)
    params = {"a": jax.random.normal(keys[0], (4, 4)), "b": jax.random.normal(keys[1], (4, 4))}
    if case == "tied weight used again later":
        fn = lambda p, x: jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) @ p["a"]
    else:  # "b" scales the activation ahead of b's own dot: its compressed value must be seen there
        fn = lambda p, x: jnp.tanh(x @ p["a"] * p["b"][0]) @ p["b"]
    batches = [jax.random.normal(keys[2], (6, 4)), jax.random.normal(keys[3], (6, 4))]
    groups = sequential_groups(fn, params, batches[0], ".*")
    selections = [frozenset(g).__contains__ for g in groups]
    capture = sequential_capture(fn, params, selections, batches)
    assert type(capture) is GroupCapture
    expected = _run_groups(GroupCapture(fn, params, selections, batches, compile_ahead=False), params, groups)
    _assert_same_statistics(expected, _run_groups(capture, params, groups))
