"""Per-site execution choice: the cost model's decisions, overrides, the site report, and the
measured choice with its on-disk cache (written atomically, reused, safe when unwritable)."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.execute.transform import compressed
from jaxcompress.execute import measure
from jaxcompress.execute.policy import ExecutionPolicy, auto_choice, resolve_policy
from jaxcompress.execute.weight_view import WeightView
from tests.execute.reference import count_s8_contractions

DENSE = dict(dimension_numbers=(((1,), (0,)), ((), ())))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))  # 1 input channel: contracts 9 values
        x = nn.Conv(8, (3, 3), feature_group_count=8)(x)  # depthwise
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(64)(x))  # contracts 512
        return nn.Dense(4)(x)  # 4 outputs


RULES = [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")]


@pytest.fixture(scope="module")
def net():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
    params = model.init(jax.random.key(1), x)
    qparams, _ = jc.quantize_params(params, RULES)
    return model, params, qparams, x


def _view(shape, activation="dynamic"):
    return WeightView.from_qarray(jax.eval_shape(lambda: jc.quantize(jnp.ones(shape), channel_axes=(-1,), activation=activation)))


def test_cost_model_decisions():
    assert auto_choice("dot_general", (32, 4096), _view((4096, 4096)), DENSE)[0] == "integer"
    assert auto_choice("dot_general", (32, 16), _view((16, 64)), DENSE)[0] == "weight_only"  # tiny contraction
    assert auto_choice("dot_general", (32, 512), _view((512, 4)), DENSE)[0] == "weight_only"  # few outputs
    # batch 1 against an (in, out) kernel: the padded int8 dot (slow, but converting the weight every
    # call is slower); stored (out, in): the fast one
    path, reason = auto_choice("dot_general", (1, 4096), _view((4096, 4096)), DENSE)
    assert path == "integer" and "store_for_integer_dots" in reason
    stored = _view((4096, 4096)).transpose((1, 0))  # logical (in, out) over codes stored (out, in)
    assert stored.permutation == (1, 0)
    assert auto_choice("dot_general", (1, 4096), stored, DENSE)[0] == "integer"


def _conv_site(strides, window=(3, 3), in_features=32, stored=False):
    shape = (*window, in_features, 64)
    dnums = jax.lax.conv_dimension_numbers((1, 14, 14, in_features), shape, ("NHWC", "HWIO", "NHWC"))
    view = _view(shape)
    if stored:  # codes stored (O, I, H, W): a pending transpose XLA's native conv cannot take
        view = WeightView.from_qarray(jc.quantize(jnp.ones(shape), channel_axes=(-1,), activation="dynamic").with_layout((3, 2, 0, 1)))
    padding = tuple(((k - 1) // 2, k // 2) for k in window)
    return view, {"dimension_numbers": dnums, "window_strides": strides, "padding": padding, "lhs_dilation": (1, 1),
                  "rhs_dilation": (1, 1), "feature_group_count": 1, "batch_group_count": 1}


def test_cost_model_native_conv_and_the_im2col_expansion():
    x_shape = (32, 14, 14, 32)
    # channels-last 3x3 stride 1: XLA's native int8 convolution
    path, reason = auto_choice("conv_general_dilated", x_shape, *_conv_site((1, 1)))
    assert path == "integer" and "native" in reason
    # the same conv on the im2col dot: patches 9x the input (measured slower than weight-only)
    path, reason = auto_choice("conv_general_dilated", x_shape, *_conv_site((1, 1), stored=True))
    assert path == "weight_only" and "9x" in reason
    # im2col at stride 2: 2.25x; 1x1: 1x
    assert auto_choice("conv_general_dilated", x_shape, *_conv_site((2, 2), stored=True))[0] == "integer"
    assert auto_choice("conv_general_dilated", (32, 14, 14, 128), *_conv_site((1, 1), (1, 1), 128, stored=True))[0] == "integer"
    # one input channel contracts 9 values: weight-only, native or not
    assert auto_choice("conv_general_dilated", (32, 14, 14, 1), *_conv_site((1, 1), in_features=1))[0] == "weight_only"


def test_site_report_and_paths(net):
    model, params, qparams, x = net
    auto = compressed(model.apply, policy="auto")
    sites = {site.path: site for site in auto.sites(qparams, x)}
    assert {path: site.chosen for path, site in sites.items()} == {
        "params/Conv_0/kernel": "weight_only",
        "params/Conv_1/kernel": "integer_depthwise",
        "params/Dense_0/kernel": "integer",
        "params/Dense_1/kernel": "weight_only",
    }
    assert sites["params/Dense_0/kernel"].activation_shape == (16, 512)
    assert sites["params/Dense_0/kernel"].weight_shape == (512, 64)
    assert all(site.requested == "dynamic" and site.reason for site in sites.values())
    hlo = jax.jit(auto).lower(qparams, x).compile().as_text()
    assert count_s8_contractions(hlo, "dot") == 1  # only Dense_0 runs an int8 dot
    # the weight-only sites compute exactly what the all-weight-only program computes there
    everything_float = compressed(model.apply, policy="weight_only")
    assert {site.chosen for site in everything_float.sites(qparams, x)} == {"weight_only", "weight_only_depthwise"}
    reference = np.asarray(model.apply(params, x))
    for fn in (auto, everything_float, compressed(model.apply)):
        out = np.asarray(jax.jit(fn)(qparams, x))
        assert np.abs(out - reference).max() < 0.1 * np.abs(reference).max()


def test_overrides_force_a_path(net):
    model, _, qparams, x = net
    policy = ExecutionPolicy("auto", overrides={r".*/Conv_0/kernel": "integer", r".*Dense_0.*": "weight_only"})
    chosen = {site.path: site.chosen for site in compressed(model.apply, policy=policy).sites(qparams, x)}
    assert chosen["params/Conv_0/kernel"] == "integer" and chosen["params/Dense_0/kernel"] == "weight_only"
    hlo = jax.jit(compressed(model.apply, policy=policy)).lower(qparams, x).compile().as_text()
    assert count_s8_contractions(hlo, "dot") == 1  # Conv_0's im2col dot, no Dense_0 dot


def test_weight_only_leaves_stay_weight_only():
    q = jc.quantize(jax.random.normal(jax.random.key(0), (64, 64)), channel_axes=(-1,))
    fn = compressed(lambda w, x: x @ w, policy="integer")
    assert [site.chosen for site in fn.sites(q, jnp.ones((8, 64)))] == ["weight_only"]


@pytest.mark.parametrize(
    "bad, error",
    [
        ("fastest", ValueError),
        (3, TypeError),
        (ExecutionPolicy, TypeError),
    ],
)
def test_bad_policies_are_refused(bad, error):
    with pytest.raises(error):
        resolve_policy(bad)


def test_bad_overrides_are_refused():
    with pytest.raises(ValueError):
        ExecutionPolicy("auto", overrides={".*": "fast"})
    with pytest.raises(ValueError):
        ExecutionPolicy("auto", overrides={"(": "integer"})
    with pytest.raises(TypeError):
        ExecutionPolicy("auto", overrides=("integer",))
    with pytest.raises(ValueError):
        ExecutionPolicy("measure", rounds=0)


def test_measured_choice_is_cached_on_disk(tmp_path, monkeypatch):
    q = jc.quantize(jax.random.normal(jax.random.key(0), (128, 32)), channel_axes=(-1,), activation="dynamic")
    x = jnp.ones((16, 128))
    policy = ExecutionPolicy("measure", cache_dir=str(tmp_path), rounds=2)
    fn = compressed(lambda w, x: x @ w, policy=policy)
    [site] = fn.sites(q, x)
    assert site.reason.startswith("measured")
    data = json.loads((tmp_path / measure.CACHE_FILE).read_text())
    [entry] = data.values()
    assert set(entry) == {"integer_s", "weight_only_s", "integer_bf16_s"} and min(entry.values()) > 0  # a dot site
    assert entry[f"{site.chosen}_s"] == min(entry.values())
    # a new process (empty memory) reads the file and times nothing
    monkeypatch.setattr(measure, "_MEMORY", {})
    monkeypatch.setattr(measure, "time_site", _must_not_time)
    [again] = compressed(lambda w, x: x @ w, policy=policy).sites(q, x)
    assert again.reason.startswith("cached") and again.chosen == site.chosen
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, x)), np.asarray(x @ q.dequantize()), rtol=0.05, atol=0.05)


def _must_not_time(*args, **kwargs):
    raise AssertionError("a cached site was timed again")


def test_changed_kernel_code_is_timed_again(tmp_path, monkeypatch):
    # the cache key holds a hash of the execute sources: a kernel changed by an upgrade must not
    # reuse the choice timed for the old one
    q = jc.quantize(jax.random.normal(jax.random.key(1), (64, 16)), channel_axes=(-1,), activation="dynamic")
    x = jnp.ones((8, 64))
    policy = ExecutionPolicy("measure", cache_dir=str(tmp_path), rounds=1)
    [site] = compressed(lambda w, x: x @ w, policy=policy).sites(q, x)
    assert site.reason.startswith("measured")
    monkeypatch.setattr(measure, "_MEMORY", {})
    monkeypatch.setattr(measure, "code_fingerprint", lambda folder=None: "0.0.0:upgraded-kernels")
    [again] = compressed(lambda w, x: x @ w, policy=policy).sites(q, x)
    assert again.reason.startswith("measured")
    assert len(json.loads((tmp_path / measure.CACHE_FILE).read_text())) == 2


def test_code_fingerprint_follows_the_sources(tmp_path):
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(f"X = '{name}'\n")
    before = measure.code_fingerprint(tmp_path)
    assert measure.code_fingerprint(tmp_path) == before
    (tmp_path / "b.py").write_text("X = 'changed'\n")
    measure._fingerprint.cache_clear()
    assert measure.code_fingerprint(tmp_path) != before
    # the default covers the kernels' other sources too (quant, the program layer, qarray)
    assert measure.code_fingerprint() != measure.code_fingerprint(Path(measure.__file__).parent)


def test_unwritable_or_corrupt_cache_is_not_an_error(tmp_path, monkeypatch):
    q = jc.quantize(jax.random.normal(jax.random.key(0), (64, 16)), channel_axes=(-1,), activation="dynamic")
    x = jnp.ones((8, 64))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(measure, "_MEMORY", {})
    policy = ExecutionPolicy("measure", cache_dir=str(blocker / "cache"), rounds=1)
    [site] = compressed(lambda w, x: x @ w, policy=policy).sites(q, x)
    assert site.reason.startswith("measured")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / measure.CACHE_FILE).write_text("{not json")
    [site] = compressed(lambda w, x: x @ w, policy=ExecutionPolicy("measure", cache_dir=str(corrupt), rounds=1)).sites(q, x)
    assert site.reason.startswith("measured")
    assert len(json.loads((corrupt / measure.CACHE_FILE).read_text())) == 1
    assert [p.name for p in corrupt.iterdir()] == [measure.CACHE_FILE]  # no scratch file left


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCOMPRESS_CACHE_DIR", str(tmp_path / "x"))
    assert measure.cache_path() == tmp_path / "x" / measure.CACHE_FILE
    monkeypatch.delenv("JAXCOMPRESS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert measure.cache_path() == tmp_path / "xdg" / "jaxcompress" / measure.CACHE_FILE
    assert measure.cache_path(str(tmp_path / "given")) == tmp_path / "given" / measure.CACHE_FILE
