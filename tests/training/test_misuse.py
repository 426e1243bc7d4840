"""Misuse of the QAT activation path gets an error naming the path and what was expected."""

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxcompress as jc

RULES = [jc.QuantRule(pattern="w", channel_axes=(-1,), activation="static")]
PARAMS = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
FN = lambda p, x: x @ p["w"] + p["b"]


def _opt_state():
    opt = jc.qat(optax.sgd(0.1), RULES, on_unused="ignore")
    return opt, opt.init(PARAMS)


def test_activation_stats_with_a_path_no_rule_quantizes():
    opt, state = _opt_state()
    with pytest.raises(ValueError, match=r"activation_stats has paths .*\['params/w'\].*expected keys among \['w'\]"):
        opt.update(PARAMS, state, PARAMS, activation_stats={"params/w": jnp.float32(1.0)})


def test_activation_stats_that_are_not_scalars():
    opt, state = _opt_state()
    with pytest.raises(ValueError, match=r"activation_stats\['w'\]: expected the scalar .* got shape \(3,\)"):
        opt.update(PARAMS, state, PARAMS, activation_stats={"w": jnp.ones(3)})


def test_activation_ranges_that_are_not_scalars():
    apply = jc.fake_quant_activations(FN, RULES, on_unused="ignore")
    with pytest.raises(ValueError, match=r"activation ranges\['w'\]: expected a scalar .* got shape \(3,\)"):
        apply(PARAMS, jnp.ones((2, 4)), ranges={"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"convert_qat: activation_ranges\['w'\]: expected a scalar"):
        jc.convert_qat(PARAMS, RULES, activation_ranges={"w": jnp.ones(3)})


def test_branching_on_a_weight_value_under_compressed():
    qparams, _ = jc.quantize_params(PARAMS, RULES[:1])

    def fn(p, x):
        if p["w"].sum() > 0:  # Python control flow on a traced value
            return x @ p["w"]
        return x

    with pytest.raises(TypeError, match=r"reads the VALUE of an argument while it is traced.*jax.lax.cond"):
        jc.compressed(fn)(qparams, jnp.ones((2, 4)))
    with pytest.raises(TypeError, match=r"reads the VALUE"):
        jax.jit(jc.compressed(fn))(qparams, jnp.ones((2, 4)))
