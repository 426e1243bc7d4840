"""Whole-program tuning (``ExecutionPolicy("tune")``): the search on a scripted clock, the
program it picks is the program that runs, the on-disk cache (reused, distrusted when tampered
with), overrides and weight-only leaves left alone, and the folded weight-only dot."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.execute import tune
from jaxcompress.execute.dot import weight_only_dot
from jaxcompress.execute.policy import ExecutionPolicy, choose_mode
from jaxcompress.execute.transform import compressed
from jaxcompress.execute.weight_view import WeightView
from tests.execute.reference import count_s8_contractions


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(96, name="a")(x))
        x = nn.relu(nn.Dense(64, name="b")(x))
        return nn.Dense(8, name="c")(x)


PATHS = ["params/a/kernel", "params/b/kernel", "params/c/kernel"]


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (16, 128))
    params = model.init(jax.random.key(1), x)
    rules = [jc.QuantRule(pattern=r".*/(a|b)/kernel", channel_axes=(-1,), activation="dynamic"),
             jc.QuantRule(pattern=r".*/c/kernel", channel_axes=(-1,))]  # weight-only: never tuned
    qparams, _ = jc.quantize_params(params, rules)
    return model, params, qparams, x


@pytest.fixture(autouse=True)
def _fresh_memory(monkeypatch):
    monkeypatch.setattr(tune, "_MEMORY", {})
    monkeypatch.setattr(tune, "_PLANS", {})


class ScriptedPrograms:
    """A clock for `tune._search`: a program's time is a function of its choice (plus a bias
    per timing call, to script noise)."""

    def __init__(self, cost, noise=None):
        self.cost, self.noise, self.built, self.calls = cost, noise or (lambda call, name: 0.0), {}, 0

    def build(self, name, choice):
        self.built.setdefault(name, None if choice is None else dict(choice))
        return name

    def timed(self, names):
        self.calls += 1
        return {n: self.cost(self.built[n]) + self.noise(self.calls, n) for n in names}


def _additive(table, interaction=0.0, float_s=1.0):
    def cost(choice):
        if choice is None:
            return float_s
        total = sum(table[p][choice[p]] for p in choice)
        if choice.get("x") == "integer" and choice.get("y") == "integer":
            total += interaction
        return total

    return cost


def _starts(paths, auto=None, measured=None):
    return {
        "weight_only": {p: "weight_only" for p in paths},
        "integer": {p: "integer" for p in paths},
        "auto": auto or {p: "integer" for p in paths},
        "measure": measured or {p: "weight_only" for p in paths},
    }


def test_search_finds_the_per_weight_optimum_of_an_additive_cost():
    table = {"x": {"integer": 1.0, "weight_only": 2.0}, "y": {"integer": 3.0, "weight_only": 1.0},
             "z": {"integer": 0.5, "weight_only": 0.6}}
    programs = ScriptedPrograms(_additive(table, float_s=2.0))
    result = tune._search(["x", "y", "z"], _starts(["x", "y", "z"]), programs)
    assert result.choice == {"x": "integer", "y": "weight_only", "z": "integer"}
    assert result.program_s == pytest.approx(2.5) and result.float_s == 2.0
    # evidence: each path's program time for each weight, the others as chosen before it
    assert result.evidence["y"]["integer"] > result.evidence["y"]["weight_only"]
    assert result.evidence["x"]["integer"] < result.evidence["x"]["weight_only"]
    assert all(set(e) == {"integer", "weight_only"} for e in result.evidence.values())  # default options
    # identical starts ("auto" = "integer", "measure" = "weight_only" here) are built once
    assert sum(1 for name in programs.built if name[0] == "start") == 2


def test_search_sees_interactions_that_per_site_choices_miss():
    # alone, x and y each win on the integer path; together they lose (one fusion cut twice)
    table = {"x": {"integer": 1.0, "weight_only": 1.2}, "y": {"integer": 1.0, "weight_only": 1.2}}
    programs = ScriptedPrograms(_additive(table, interaction=1.0))
    result = tune._search(["x", "y"], _starts(["x", "y"], auto={"x": "integer", "y": "integer"},
                                              measured={"x": "integer", "y": "integer"}), programs)
    assert sorted(result.choice.values()) == ["integer", "weight_only"]
    assert result.program_s == pytest.approx(2.2)


def test_small_gains_do_not_flip_and_drift_is_reverted():
    table = {"x": {"integer": 1.0, "weight_only": 1.005}}  # 0.5% < MIN_GAIN: noise, not a win
    result = tune._search(["x"], {"weight_only": {"x": "weight_only"}}, ScriptedPrograms(_additive(table)))
    assert result.choice == {"x": "weight_only"} and result.evidence["x"] == {"integer": 1.0, "weight_only": 1.005}

    # scripted noise: the flip of x looks 10% faster in its own comparison, but the final
    # side-by-side check against the start says otherwise: the start is kept
    table = {"x": {"integer": 1.0, "weight_only": 1.0}}

    def noise(call, name):
        return -0.2 if call == 2 and name == ("flip", 0, "integer") else 0.0

    programs = ScriptedPrograms(_additive(table), noise)
    result = tune._search(["x"], {"weight_only": {"x": "weight_only"}}, programs)
    assert result.choice == {"x": "weight_only"} and programs.calls == 3


def test_search_tries_every_path_a_weight_can_take():
    # x (a dot weight) can take integer_bf16, z (a conv weight) cannot: the search tries the
    # bf16 carrier for x only and keeps it where it is fastest
    table = {"x": {"integer": 1.0, "weight_only": 1.2, "integer_bf16": 0.7},
             "z": {"integer": 0.9, "weight_only": 0.5, "integer_bf16": 0.1}}
    programs = ScriptedPrograms(_additive(table))
    options = {"x": ("integer", "weight_only", "integer_bf16"), "z": ("integer", "weight_only")}
    starts = _starts(["x", "z"])
    result = tune._search(["x", "z"], starts, programs, options)
    assert result.choice == {"x": "integer_bf16", "z": "weight_only"}
    assert set(result.evidence["x"]) == {"integer", "weight_only", "integer_bf16"}
    assert set(result.evidence["z"]) == {"integer", "weight_only"}
    assert all(choice is None or choice["z"] != "integer_bf16" for choice in programs.built.values())
    # a carrier start wins outright when it is the fastest program
    starts["integer_bf16"] = {"x": "integer_bf16", "z": "integer"}
    assert tune._search(["x", "z"], starts, ScriptedPrograms(_additive(table)), options).choice["x"] == "integer_bf16"


def test_tuned_program_runs_the_choice_and_is_cached(mlp, tmp_path, monkeypatch):
    model, params, qparams, x = mlp
    policy = ExecutionPolicy("tune", cache_dir=str(tmp_path), rounds=1)
    apply = compressed(model.apply, policy=policy)
    out = jax.jit(apply)(qparams, x)  # tuned on traced arguments, inside jit
    sites = apply.sites(qparams, x)
    assert [s.path for s in sites] == PATHS
    tuned = {s.path: s for s in sites if s.reason.startswith("tuned")}
    assert sorted(tuned) == PATHS[:2]  # the weight-only kernel c is not tuned
    assert all("float program" in s.reason and "(measured)" in s.reason for s in tuned.values())
    data = json.loads((tmp_path / tune.TUNE_FILE).read_text())
    [entry] = data.values()
    assert sorted(entry["choice"]) == PATHS[:2] and entry["float_s"] > 0

    # the tuned program is the program of its choice, bit for bit, with as many s8 dots
    forced = ExecutionPolicy("weight_only", overrides={p: c for p, c in entry["choice"].items()})
    same = jax.jit(compressed(model.apply, policy=forced))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(same(qparams, x)))
    integer = sum(c == "integer" for c in entry["choice"].values())
    assert count_s8_contractions(jax.jit(apply).lower(qparams, x).compile().as_text()) == integer
    np.testing.assert_allclose(np.asarray(out), np.asarray(model.apply(params, x)), atol=0.1)

    # a new process reads the file and times nothing
    monkeypatch.setattr(tune, "_MEMORY", {})
    monkeypatch.setattr(tune, "_search", lambda *a, **k: pytest.fail("timed again"))
    again = compressed(model.apply, policy=policy).sites(qparams, x)
    assert all("(cached)" in s.reason for s in again if s.path in tuned)
    assert {s.path: s.chosen for s in again} == {s.path: s.chosen for s in sites}


@pytest.mark.parametrize("tamper", [
    lambda e: e["choice"].update({"params/a/kernel": "fast"}),  # not a path
    lambda e: e["choice"].pop("params/a/kernel"),  # not the tuned weights
    lambda e: e["evidence"]["params/b/kernel"].__setitem__("integer", -1.0),  # not a time
    lambda e: e["evidence"]["params/b/kernel"].__setitem__("fast", 1.0),  # not a path
    lambda e: e["evidence"].__setitem__("params/b/kernel", [1.0, 2.0]),  # the old pair format
    lambda e: e.update(program_s="soon"),
    lambda e: e.update(start="elsewhere"),
    lambda e: e.update(start=["auto"]),  # unhashable: must not crash the reader
    lambda e: e["starts"].update({"auto": "fast"}),
])
def test_a_tampered_cache_entry_is_measured_again(mlp, tmp_path, tamper):
    model, _, qparams, x = mlp
    policy = ExecutionPolicy("tune", cache_dir=str(tmp_path), rounds=1)
    compressed(model.apply, policy=policy).sites(qparams, x)
    file = tmp_path / tune.TUNE_FILE
    data = json.loads(file.read_text())
    [(key, entry)] = data.items()
    tamper(entry)
    file.write_text(json.dumps(data))
    tune._MEMORY.clear()
    sites = compressed(model.apply, policy=policy).sites(qparams, x)
    assert all("(measured)" in s.reason for s in sites if s.reason.startswith("tuned"))
    assert tune.Tuning.from_json(json.loads(file.read_text())[key], tuple(PATHS[:2])) is not None


def test_overrides_are_not_tuned(mlp, tmp_path, monkeypatch):
    model, _, qparams, x = mlp
    policy = ExecutionPolicy("tune", overrides={r".*/a/kernel": "integer"}, cache_dir=str(tmp_path), rounds=1)
    sites = {s.path: s for s in compressed(model.apply, policy=policy).sites(qparams, x)}
    assert sites["params/a/kernel"].chosen == "integer" and "override" in sites["params/a/kernel"].reason
    assert sites["params/b/kernel"].reason.startswith("tuned")
    [entry] = json.loads((tmp_path / tune.TUNE_FILE).read_text()).values()
    assert sorted(entry["choice"]) == ["params/b/kernel"]

    # everything forced: nothing to tune, nothing timed or written
    monkeypatch.setattr(tune, "_search", lambda *a, **k: pytest.fail("nothing to tune"))
    forced = ExecutionPolicy("tune", overrides={r".*": "weight_only"}, cache_dir=str(tmp_path / "none"))
    assert {s.chosen for s in compressed(model.apply, policy=forced).sites(qparams, x)} == {"weight_only"}
    assert not (tmp_path / "none").exists()


def test_tune_outside_compressed_is_a_clear_error():
    view = WeightView.from_qarray(jax.eval_shape(lambda: jc.quantize(jnp.ones((64, 64)), channel_axes=(-1,), activation="dynamic")))
    with pytest.raises(ValueError, match="times the whole program first"):
        choose_mode(ExecutionPolicy("tune"), "dot_general", jnp.ones((4, 64)), view, {"dimension_numbers": (((1,), (0,)), ((), ()))})


@pytest.mark.parametrize("dims, subscripts, x_shape, w_shape, permutation, channel_axes", [
    ((((1,), (0,)), ((), ())), "mk,kn->mn", (5, 24), (24, 16), (1, 0), (0,)),  # a Dense kernel stored (out, in)
    ((((2,), (1,)), ((0,), (0,))), "bmk,bkn->bmn", (3, 5, 24), (3, 24, 16), (0, 2, 1), (0, 1)),  # stored (b, out, in)
    ((((1,), (2,)), ((), ())), "mk,ijk->mij", (5, 24), (4, 6, 24), (2, 0, 1), (1, 2)),  # free axes emitted out of order
])
def test_weight_only_dot_folds_a_stored_transpose(dims, subscripts, x_shape, w_shape, permutation, channel_axes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    stored = np.transpose(rng.normal(size=w_shape).astype(np.float32), permutation)  # the stored layout
    q = jc.quantize(jnp.asarray(stored), channel_axes=channel_axes, symmetric=True, activation="dynamic")
    inverse = tuple(int(a) for a in np.argsort(permutation))
    view = WeightView.from_qarray(q).transpose(inverse)  # logical = w's layout, a pending transpose
    assert view.permutation is not None and view.shape == w_shape
    out = weight_only_dot(jnp.asarray(x), view, dims, jnp.float32)
    dequantized = np.transpose(np.asarray(jc.dequantize(q), np.float64), inverse)
    expected = np.einsum(subscripts, x.astype(np.float64), dequantized)  # float64 NumPy reference
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-5, atol=1e-4)
    # the int8 codes are contracted in their stored layout: no transpose of an s8 tensor
    text = jax.jit(lambda x: weight_only_dot(x, view, dims, jnp.float32)).lower(jnp.asarray(x)).as_text()
    assert not [line for line in text.splitlines() if "transpose" in line and "xi8>" in line]


def test_symbolic_shapes_fall_back_to_the_cost_model(mlp, tmp_path, monkeypatch):
    model, _, qparams, x = mlp
    monkeypatch.setattr(tune, "_search", lambda *a, **k: pytest.fail("a symbolic shape cannot be timed"))
    apply = jax.jit(compressed(model.apply, policy=ExecutionPolicy("tune", cache_dir=str(tmp_path))))
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, x.shape[1]), x.dtype)
    params_spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), qparams)
    exported = jax.export.export(apply)(params_spec, spec)
    out = exported.call(qparams, x)
    auto = jax.export.export(jax.jit(compressed(model.apply, policy="auto")))(params_spec, spec).call(qparams, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(auto))  # the same program: the cost model's
    assert not (tmp_path / tune.TUNE_FILE).exists()


class Dropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool, act: str = "relu"):
        x = getattr(jax.nn, act)(nn.Dense(64, name="a")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(8, name="b")(x)


def test_python_values_and_keys_in_the_call(tmp_path):
    """Static leaves (a bool the model branches on, a string) stay Python values while tuning,
    as they do when the program runs; a typed PRNG key gets a key stand-in."""
    model = Dropout()
    x = jax.random.normal(jax.random.key(0), (16, 128))
    params = model.init(jax.random.key(1), x, train=False)
    qparams, _ = jc.quantize_params(params, [jc.QuantRule(pattern=r".*kernel", channel_axes=(-1,), activation="dynamic")])
    policy = ExecutionPolicy("tune", cache_dir=str(tmp_path), rounds=1)
    apply = compressed(model.apply, policy=policy)
    eager = apply(qparams, x, train=False, act="gelu")
    jitted = jax.jit(apply, static_argnames=("train", "act"))(qparams, x, train=False, act="gelu")
    assert eager.shape == jitted.shape == (16, 8)
    rule = compressed(model.apply)(qparams, x, train=False, act="gelu")
    np.testing.assert_allclose(np.asarray(eager), np.asarray(rule), atol=0.05)
    assert all(s.reason.startswith("tuned") for s in apply.sites(qparams, x, train=False, act="gelu"))
    keyed = apply(qparams, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert keyed.shape == (16, 8)
    assert len(json.loads((tmp_path / tune.TUNE_FILE).read_text())) == 2  # two programs: train=False / True
    assert sorted(p.name for p in tmp_path.iterdir()) == [tune.TUNE_FILE, "site_timings.json"]  # nothing left over


def test_an_eager_loop_looks_the_plan_up_once(mlp, tmp_path, monkeypatch):
    model, _, qparams, x = mlp
    apply = compressed(model.apply, policy=ExecutionPolicy("tune", cache_dir=str(tmp_path), rounds=1))
    apply(qparams, x)
    monkeypatch.setattr(tune, "_plan", lambda *a, **k: pytest.fail("planned again for the same signature"))
    for _ in range(3):
        apply(qparams, x)
