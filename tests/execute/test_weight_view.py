"""WeightView layout ops commute with dequantization (or refuse, returning None)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.execute.weight_view import WeightView, reshaped_scale_shape

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _view(shape, channel_axes=(), group_size=None, group_axis=None, symmetric=True, seed=0):
    """A QArray built directly (random codes and scales in the QArray layout), no compile."""
    rng = np.random.default_rng(seed)
    scale_shape = [1] * len(shape)
    for axis in channel_axes:
        scale_shape[axis] = shape[axis]
    if group_size is not None:
        axis = len(shape) - 2 if group_axis is None else group_axis
        scale_shape[axis] = shape[axis] // group_size
    q = jc.QArray(
        values=jnp.asarray(rng.integers(-127, 128, shape), jnp.int8),
        scale=jnp.asarray(rng.uniform(0.5, 2.0, scale_shape), jnp.float32),
        zero_point=None if symmetric else jnp.asarray(rng.integers(-5, 6, scale_shape), jnp.int8),
        channel_axes=tuple(channel_axes),
        group_axis=None if group_size is None else (len(shape) - 2 if group_axis is None else group_axis),
        group_size=group_size,
    )
    return WeightView.from_qarray(q), _dequantized(WeightView.from_qarray(q))


def _dequantized(view):
    """NumPy block dequantization of a view (independent of WeightView.dequantize)."""
    view = view.materialize()
    values = np.asarray(view.values.astype(jnp.int32), np.float64)
    scale = np.asarray(view.scale, np.float64)
    zero = None if view.zero_point is None else np.asarray(view.zero_point.astype(jnp.int32), np.float64)
    for axis in range(values.ndim):
        repeat = values.shape[axis] // scale.shape[axis]
        scale = np.repeat(scale, repeat, axis=axis)
        zero = None if zero is None else np.repeat(zero, repeat, axis=axis)
    return (values - (0 if zero is None else zero)) * scale


def _factorizations(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@SETTINGS
@given(
    dims=st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=1, max_size=4),
    channel=st.booleans(),
    symmetric=st.booleans(),
    split=st.integers(0, 10),
    seed=st.integers(0, 1000),
)
def test_reshape_commutes_with_dequantize_or_refuses(dims, channel, symmetric, split, seed):
    shape = tuple(dims)
    view, dense = _view(shape, channel_axes=(len(shape) - 1,) if channel else (), symmetric=symmetric, seed=seed)
    total = int(np.prod(shape))
    # a random target shape: merge everything, then split off a divisor
    divisors = _factorizations(total)
    first = divisors[split % len(divisors)]
    target = (first, total // first)
    reshaped = view.reshape(target)
    if reshaped is None:
        # refusing is only allowed when the scale really is not block-structured in the target
        assert reshaped_scale_shape(shape, tuple(view.scale.shape), target) is None
        return
    np.testing.assert_allclose(_dequantized(reshaped), dense.reshape(target), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape, kwargs, target",
    [
        ((4, 6, 5), dict(channel_axes=(2,)), (24, 5)),          # DenseGeneral merge
        ((24, 5), dict(channel_axes=(1,)), (4, 6, 5)),           # split
        ((8, 6), dict(channel_axes=(1,), group_size=4), (2, 4, 6)),  # groups stay contiguous
        ((8, 6), dict(channel_axes=(0,)), (48,)),                # per-row merge: blocks of 6
        ((2, 4, 6), dict(channel_axes=(0, 2), group_size=2, group_axis=1), (8, 6)),  # (c, g) merge
        ((3, 3, 4, 8), dict(channel_axes=(3,)), (36, 8)),        # conv kernel to im2col
    ],
)
def test_reshape_cases(shape, kwargs, target):
    view, dense = _view(shape, **kwargs)
    reshaped = view.reshape(target)
    assert reshaped is not None
    np.testing.assert_allclose(_dequantized(reshaped), dense.reshape(target), rtol=1e-6)


def test_reshape_refuses_scattered_blocks():
    view, _ = _view((4, 6), channel_axes=(1,))
    assert view.reshape((24,)) is None     # per-column scale is not contiguous once flattened


def test_transpose_broadcast_squeeze_slice_astype():
    view, dense = _view((4, 1, 6), channel_axes=(2,), group_size=2, group_axis=0, symmetric=False)
    np.testing.assert_allclose(_dequantized(view.transpose((2, 0, 1))), dense.transpose(2, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(_dequantized(view.squeeze((1,))), dense[:, 0], rtol=1e-6)
    b = view.broadcast_in_dim((3, 4, 5, 6), (1, 2, 3))
    np.testing.assert_allclose(_dequantized(b), np.broadcast_to(dense[None], (3, 4, 5, 6)), rtol=1e-6)
    s = view.slice((2, 0, 1), (4, 1, 5), (1, 1, 2))
    np.testing.assert_allclose(_dequantized(s), dense[2:4, 0:1, 1:5:2], rtol=1e-6)
    assert view.slice((1, 0, 0), (3, 1, 6)) is None      # cuts a group of 2 in half
    assert view.astype(jnp.bfloat16).dequantize().dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(view.dequantize()), dense, rtol=1e-6)   # the package's own
    assert view.astype(jnp.int32) is None
