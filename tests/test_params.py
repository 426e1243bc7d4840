"""quantize_params / dequantize_params on real linen and nnx trees; reports; errors."""

from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxcompress as jc


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def cnn():
    model = CNN()
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
    return model, model.init(jax.random.key(0), x), x


RULES = [
    jc.QuantRule(pattern=r".*Conv_\d+/kernel", bits=8, channel_axes=(-1,)),
    jc.QuantRule(pattern=r".*Dense_\d+/kernel", bits=4, channel_axes=(-1,), group_size=32, calibration="mse"),
]


def test_linen_cnn_same_structure_and_close_output(cnn):
    model, params, x = cnn
    qparams, report = jc.quantize_params(params, RULES)
    is_q = lambda v: isinstance(v, jc.QArray)
    flat = dict(
        (jc.path_to_str(p), v) for p, v in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_q)[0]
    )
    assert {k for k, v in flat.items() if is_q(v)} == {
        "params/Conv_0/kernel", "params/Conv_1/kernel", "params/Dense_0/kernel", "params/Dense_1/kernel",
    }
    assert flat["params/Dense_0/kernel"].bits == 4 and flat["params/Dense_0/kernel"].group_size == 32
    # Unmatched leaves are passed through untouched (the very same arrays).
    assert qparams["params"]["Conv_0"]["bias"] is params["params"]["Conv_0"]["bias"]
    assert set(report.quantized) == {k for k, v in flat.items() if is_q(v)}
    assert len(report.unmatched) == 4 and report.unused_rules == ()
    dq = jc.dequantize_params(qparams)
    chex.assert_trees_all_equal_shapes_and_dtypes(dq, params)
    y, y_q = model.apply(params, x), model.apply(dq, x)
    # int8 convs + int4 dense layers: the logits move by a few percent, not more.
    relative_error = float(jnp.linalg.norm(y - y_q) / jnp.linalg.norm(y))
    assert relative_error < 0.15, relative_error


def test_nnx_mlp_state(cnn):
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(8, 32, rngs=rngs), nnx.Linear(32, 4, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](jax.nn.relu(self.layers[0](x)))

    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    qstate, report = jc.quantize_params(state, [jc.QuantRule(pattern=r"layers/\d+/kernel", bits=8, channel_axes=(-1,))])
    assert report.quantized == ("layers/0/kernel", "layers/1/kernel")
    restored = nnx.merge(graphdef, jc.dequantize_params(qstate))
    x = jax.random.normal(jax.random.key(2), (5, 8))
    np.testing.assert_allclose(restored(x), model(x), atol=2e-2)


def test_integer_and_bool_leaves_are_skipped_and_reported():
    params = {"w": jnp.ones((4, 4)), "step": jnp.array(3), "mask": jnp.ones((4,), bool), "name": "layer"}
    qparams, report = jc.quantize_params(params, [jc.QuantRule(pattern=".*", bits=8)])
    assert isinstance(qparams["w"], jc.QArray)
    assert qparams["step"] is params["step"] and qparams["mask"] is params["mask"]
    reasons = {d.path: d.reason for d in report.leaves if d.action == "skipped"}
    assert reasons == {"step": "non-float dtype int32", "mask": "non-float dtype bool", "name": "not an array (str)"}


def test_skip_rule_and_already_quantized_leaves():
    params = {"emb": jnp.ones((8, 4)), "w": jnp.ones((4, 4))}
    rules = [jc.QuantRule(pattern="emb", skip=True), jc.QuantRule(pattern=".*", bits=8)]
    qparams, report = jc.quantize_params(params, rules)
    assert not isinstance(qparams["emb"], jc.QArray) and isinstance(qparams["w"], jc.QArray)
    again, report2 = jc.quantize_params(qparams, [jc.QuantRule(pattern=".*", bits=4)])
    assert again["w"] is qparams["w"]
    assert {d.path: d.reason for d in report2.leaves}["w"] == "already quantized"


def test_unused_rule_is_reported_and_warned():
    with pytest.warns(UserWarning, match="matched no leaf"):
        _, report = jc.quantize_params({"w": jnp.ones(4)}, [jc.QuantRule(pattern="w"), jc.QuantRule(pattern="x")])
    assert report.unused_rules == (1,)
    assert report.to_dict()["unused_rules"] == [{"index": 1, "pattern": "x"}]
    with pytest.raises(ValueError, match="matched no leaf"):
        jc.quantize_params({"w": jnp.ones(4)}, [jc.QuantRule(pattern="x")], on_unused="error")


def test_errors_name_the_leaf_path(cnn):
    _, params, _ = cnn
    with pytest.raises(ValueError, match=r"params\['params'\]\['Conv_0'\]\['kernel'\]: group axis 7 is out of range"):
        jc.quantize_params(params, [jc.QuantRule(pattern=".*Conv_0/kernel", bits=4, group_size=5, group_axis=7)])
    bad = {"enc": [{"kernel": jnp.array([[1.0, jnp.nan]])}]}
    with pytest.raises(ValueError, match=r"params\['enc'\]\[0\]\['kernel'\]: contains NaN or Inf"):
        jc.quantize_params(bad, [jc.QuantRule(pattern=".*kernel")])
    with pytest.raises(ValueError, match=r"params\['enc'\]\[0\]\['kernel'\]: channel axis 3 is out of range"):
        jc.quantize_params({"enc": [{"kernel": jnp.ones((2, 2))}]}, [jc.QuantRule(pattern=".*", channel_axes=(3,))])
    with pytest.raises(TypeError, match="expected a QuantRule"):
        jc.quantize_params(params, [jc.Rule(pattern=".*")])


def test_namedtuple_and_list_containers_and_jit():
    class Layer(NamedTuple):
        kernel: jax.Array
        bias: jax.Array

    params = [Layer(jnp.linspace(-1, 1, 32).reshape(8, 4), jnp.zeros(4)) for _ in range(2)]
    rules = [jc.QuantRule(pattern=r"\d+/kernel", bits=8, channel_axes=(-1,))]
    qparams, report = jc.quantize_params(params, rules)
    assert isinstance(qparams, list) and isinstance(qparams[1], Layer)
    assert report.quantized == ("0/kernel", "1/kernel")
    jitted = jax.jit(lambda p: jc.quantize_params(p, rules)[0])(params)
    chex.assert_trees_all_equal(jitted, qparams)
