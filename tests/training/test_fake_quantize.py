"""Fake quantization: forward equals PTQ round trip; clipped STE; LSQ against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.training import fake_quant, fake_quant_array, init_lsq_step, init_lsq_steps, lsq_fake_quant


@pytest.mark.parametrize("options", [
    dict(bits=8, channel_axes=(-1,)),
    dict(bits=4, channel_axes=(-1,), group_size=4, calibration="mse"),
    dict(bits=3, symmetric=False),
    dict(qtype="float8_e4m3fn", channel_axes=(0,)),
])
def test_forward_equals_quantize_dequantize(options):
    x = jax.random.normal(jax.random.key(0), (16, 6))
    np.testing.assert_array_equal(fake_quant_array(x, **options), jc.dequantize(jc.quantize(x, **options)))


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_ste_is_identity_inside_and_zero_outside(symmetric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    calibration = jc.Calibration(method="percentile", percentile=90.0)
    spec = dict(bits=8, channel_axes=(-1,), symmetric=symmetric, calibration=calibration)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    grad = jax.grad(lambda w: jnp.sum(fake_quant_array(w, **spec) * upstream))(x)
    # Reference: inside iff the unrounded code lies within [qmin, qmax] (float64).
    q = jc.quantize(x, **spec)
    scale = np.asarray(q.scale, np.float64)
    codes = x.astype(np.float64) / scale
    if symmetric:
        qmin, qmax = -127, 127
    else:
        qmin, qmax = -128, 127
        codes = codes + np.asarray(q.zero_point, np.float64)
    inside = (codes >= qmin) & (codes <= qmax)
    assert 0 < (~inside).sum() < x.size * 0.25  # the 90th percentile clip really clips
    boundary = np.minimum(np.abs(codes - qmin), np.abs(codes - qmax)) < 1e-4
    np.testing.assert_array_equal(np.asarray(grad)[~boundary], np.where(inside, upstream, 0.0)[~boundary])


def test_absmax_ste_is_identity_everywhere():
    x = jax.random.normal(jax.random.key(1), (8, 8))
    # symmetric absmax clips nothing (an asymmetric zero point, rounded, can clip the extreme by < 1/2 step)
    grad = jax.grad(lambda w: jnp.sum(fake_quant_array(w, bits=4, symmetric=True, channel_axes=(-1,)) ** 2 / 2))(x)
    np.testing.assert_allclose(grad, fake_quant_array(x, bits=4, symmetric=True, channel_axes=(-1,)))


def _lsq_reference(x, step, bits, upstream, reduce_axes):
    """float64 LSQ (Esser et al. 2020): forward, dL/dx, dL/ds with gradient scaling."""
    x, step, upstream = (np.asarray(a, np.float64) for a in (x, step, upstream))
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax
    v = x / step
    rounded = np.clip(np.round(v), qmin, qmax)
    out = rounded * step
    inside = (v >= qmin) & (v <= qmax)
    grad_x = np.where(inside, upstream, 0.0)
    d_step = np.where(v < qmin, qmin, np.where(v > qmax, qmax, rounded - v))
    n = np.prod([x.shape[a] for a in reduce_axes])
    grad_s = np.sum(upstream * d_step, axis=reduce_axes, keepdims=True) / np.sqrt(n * qmax)
    return out, grad_x, grad_s


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_matches_numpy_reference_per_channel(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((32, 5)).astype(np.float32)
    step = (np.abs(rng.standard_normal((1, 5))) * 0.3 + 0.05).astype(np.float32)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    f = lambda a, s: jnp.sum(lsq_fake_quant(a, s, bits=bits, symmetric=True, channel_axes=(-1,)) * upstream)
    out = lsq_fake_quant(x, step, bits=bits, symmetric=True, channel_axes=(-1,))
    gx, gs = jax.grad(f, argnums=(0, 1))(x, step)
    ref_out, ref_gx, ref_gs = _lsq_reference(x, step, bits, upstream, (0,))
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-6)
    np.testing.assert_allclose(gs, ref_gs, rtol=1e-4, atol=1e-6)


def test_lsq_grouped_steps_match_reference():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    step = (np.abs(rng.standard_normal((2, 3))) * 0.2 + 0.05).astype(np.float32)  # 2 groups of 4 rows
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    spec = jc.QuantSpec(bits=4, symmetric=True, channel_axes=(-1,), group_size=4, group_axis=0)  # LSQ: symmetric
    gx, gs = jax.grad(lambda a, s: jnp.sum(lsq_fake_quant(a, s, spec) * upstream), argnums=(0, 1))(x, step)
    for g in range(2):
        rows = slice(4 * g, 4 * g + 4)
        _, ref_gx, ref_gs = _lsq_reference(x[rows], step[g : g + 1], 4, upstream[rows], (0,))
        np.testing.assert_allclose(gx[rows], ref_gx, rtol=1e-6)
        np.testing.assert_allclose(gs[g : g + 1], ref_gs, rtol=1e-4, atol=1e-6)


def test_lsq_rejects_bad_steps_and_asymmetric():
    with pytest.raises(ValueError, match=r"w: LSQ step has shape \(1, 1\), expected \(1, 3\)"):
        lsq_fake_quant(jnp.ones((4, 3)), jnp.ones((1, 1)), bits=4, symmetric=True, channel_axes=(-1,), name="w")
    with pytest.raises(ValueError, match="symmetric integer"):
        init_lsq_step(jnp.ones((4, 3)), bits=4, symmetric=False)


def test_fake_quant_tree_with_and_without_lsq():
    params = {"a": {"kernel": jax.random.normal(jax.random.key(2), (8, 4)), "bias": jnp.ones(4)}, "n": jnp.array(3)}
    rules = [jc.QuantRule(pattern=r".*kernel", bits=4, symmetric=True, channel_axes=(-1,))]  # LSQ: symmetric
    fq = jax.jit(lambda p: fake_quant(p, rules))(params)
    assert fq["a"]["bias"] is not None and fq["n"].dtype == jnp.int32
    np.testing.assert_array_equal(fq["a"]["bias"], params["a"]["bias"])
    steps = init_lsq_steps(params, rules)
    assert set(steps) == {"a/kernel"}

    def loss(p, s):
        return jnp.sum(fake_quant(p, rules, s)["a"]["kernel"] ** 2)

    grads, step_grads = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(params, steps)
    assert step_grads["a/kernel"].shape == (1, 4) and bool(jnp.all(jnp.isfinite(step_grads["a/kernel"])))
    with pytest.raises(ValueError, match="no LSQ step"):
        fake_quant(params, rules, {})
    with pytest.raises(ValueError, match="do not quantize"):
        fake_quant(params, rules, {**steps, "a/bias": jnp.ones(1)})
