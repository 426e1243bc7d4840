"""Mixed precision: the knapsack against brute force, sensitivities against float64 NumPy, exact
budgets in QArray.nbytes, and a small model where it beats uniform int4 at the same size."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcompress as jc
from jaxcompress.oneshot.mixed import choose_bits, layer_sensitivity, mixed_precision, probe_candidate


def _brute_force(errors, nbytes, budget):
    best = np.inf
    for pick in itertools.product(range(errors.shape[1]), repeat=errors.shape[0]):
        rows = np.arange(errors.shape[0])
        if nbytes[rows, pick].sum() <= budget and errors[rows, pick].sum() < best:
            best = errors[rows, pick].sum()
    return best


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 5), choices=st.integers(1, 4), seed=st.integers(0, 2**16), slack=st.floats(0.0, 1.0))
def test_knapsack_is_exact_against_brute_force(layers, choices, seed, slack):
    rng = np.random.default_rng(seed)
    nbytes = rng.integers(1, 40, size=(layers, choices)) * 8
    errors = rng.uniform(0, 10, size=(layers, choices))
    low, high = nbytes.min(1).sum(), nbytes.max(1).sum()
    budget = int(low + slack * (high - low))
    pick, exact = choose_bits(errors, nbytes, budget)
    rows = np.arange(layers)
    assert exact and nbytes[rows, pick].sum() <= budget
    assert errors[rows, pick].sum() == pytest.approx(_brute_force(errors, nbytes, budget))


def test_coarse_knapsack_fits_and_is_never_worse_than_uniform():
    rng = np.random.default_rng(0)
    nbytes = rng.integers(1000, 100_000, size=(12, 4))
    nbytes.sort(axis=1)
    errors = np.sort(rng.uniform(0, 1, size=(12, 4)), axis=1)[:, ::-1].copy()  # more bytes, less error
    for column in range(4):
        budget = int(nbytes[:, column].sum())
        pick, exact = choose_bits(errors, nbytes, budget, max_states=50)
        rows = np.arange(12)
        assert nbytes[rows, pick].sum() <= budget and exact == (column == 0)  # no room: trivially exact
        assert errors[rows, pick].sum() <= errors[:, column].sum() + 1e-12
    with pytest.raises(ValueError, match="below the smallest possible total"):
        choose_bits(errors, nbytes, int(nbytes[:, 0].sum()) - 1)


def test_sensitivities_float64():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)) * np.arange(1, 7)
    delta = rng.normal(size=(4, 6))
    h = x.T @ x
    assert layer_sensitivity(delta, h, 50) == pytest.approx(np.sum((x @ delta.T) ** 2) / 50)
    assert layer_sensitivity(delta, h, 50, "trace") == pytest.approx(np.mean(np.sum(x**2, 0)) / 50 * np.sum(delta**2))


class _MLP(nn.Module):
    """Parallel branches summed into one output: each layer's output error reaches the output as
    is, and the branches' inputs differ in scale by 300x (so where the bits go matters)."""

    @nn.compact
    def __call__(self, x):
        chunks = jnp.split(x, 5, axis=-1)
        scales = (30.0, 0.1, 1.0, 3.0, 0.3)
        return sum(nn.Dense(64, name=f"d{i}")(c * s) for i, (c, s) in enumerate(zip(chunks, scales)))


def _setup():
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (96, 320))
    params = model.init(jax.random.key(1), x)
    return model, params, [x[:48], x[48:]]


def _nbytes(qparams):
    return sum(q.nbytes for q in jax.tree.leaves(qparams, is_leaf=lambda v: isinstance(v, jc.QArray)) if isinstance(q, jc.QArray))


def test_budget_is_exact_in_qarray_bytes_and_beats_uniform_int4():
    model, params, batches = _setup()
    # symmetric like mixed_precision's rules (the library's own default is asymmetric at <= 4 bits)
    uniform_rule = jc.QuantRule(pattern=".*kernel", bits=4, channel_axes=(-1,), group_size=32, symmetric=True)
    uniform, _ = jc.quantize_params(params, [uniform_rule])
    budget = _nbytes(uniform)
    rules, report = mixed_precision(model.apply, params, batches, ".*kernel", group_size=32, budget_bytes=budget,
                                    candidates=(2, 3, 4, 8))
    assert [r.pattern for r in rules] == [f"params/d{i}/kernel" for i in range(5)]
    assert sorted({r.bits for r in rules}) != [4]  # not simply uniform
    mixed, _ = jc.quantize_params(params, rules, on_unused="error")
    assert _nbytes(mixed) == report.total_bytes <= report.budget_bytes == budget
    assert report.uniform["int4 g32"]["bytes"] == budget and report.exact
    assert report.total_error < report.uniform["int4 g32"]["error"]
    # the same holds for the model's real output error on the calibration data
    x = jnp.concatenate(batches)
    dense = model.apply(params, x)
    err = lambda q: float(jnp.mean((model.apply(jc.dequantize_params(q), x) - dense) ** 2))
    assert err(mixed) < err(uniform)
    # the average-bits budget: 4 + 32/32 bits per weight is exactly uniform int4 g32's size
    _, by_bits = mixed_precision(model.apply, params, batches, ".*kernel", group_size=32, budget_bits_per_weight=5.0,
                                 candidates=(2, 4, 8))
    assert by_bits.budget_bytes == budget and by_bits.total_bytes <= budget
    assert by_bits.bits_per_weight <= 5.0


def test_trace_proxy_and_report_table():
    model, params, batches = _setup()
    rules, report = mixed_precision(model.apply, params, batches, ".*kernel", group_size=32,
                                    budget_bits_per_weight=5.0, sensitivity="trace", candidates=(2, 4, 8))
    assert report.total_bytes <= report.budget_bytes and len(rules) == 5
    assert "uniform int4 g32" in report.table() and report.to_dict()["bits_per_weight"] <= 5.0


def test_errors():
    model, params, batches = _setup()
    with pytest.raises(ValueError, match="exactly one of budget_bytes or budget_bits_per_weight"):
        mixed_precision(model.apply, params, batches, ".*kernel")
    with pytest.raises(ValueError, match="below the smallest possible total"):
        mixed_precision(model.apply, params, batches, ".*kernel", group_size=32, budget_bytes=10)
    with pytest.raises(ValueError, match="sensitivity must be one of"):
        mixed_precision(model.apply, params, batches, ".*kernel", budget_bits_per_weight=4.0, sensitivity="hessian")
    table = {"table": jnp.ones((10, 4)), "w": jnp.ones((4, 4))}
    fn = lambda p, ids: p["table"][ids] @ p["w"]
    with pytest.raises(ValueError, match=r"params\['table'\]: selected for mixed precision but it never meets"):
        mixed_precision(fn, table, [jnp.arange(6)], ".*", group_size=None, budget_bits_per_weight=8.0)


def test_group_size_candidates_with_ragged_groups():
    model, params, batches = _setup()
    candidates = ((4, None), (4, 64), (4, 16), (8, 64), (8, 48))  # 48 on 64 inputs: groups of 48 and 16
    rules, report = mixed_precision(model.apply, params, batches, ".*kernel", candidates=candidates,
                                    budget_bits_per_weight=5.0, sensitivity="output")
    for layer in report.layers:
        assert np.all(np.isfinite(layer.errors))
        assert layer.nbytes[layer.candidates.index((8, 48))] == 64 * 64 + 2 * 64 * 4  # ceil(64 / 48) scales
    assert {(r.bits, r.group_size) for r in rules} <= set(candidates)
    mixed, _ = jc.quantize_params(params, rules, on_unused="error")
    assert _nbytes(mixed) == report.total_bytes <= report.budget_bytes
    # finer groups cost scale bytes: the sizes are QArray.nbytes
    first = report.layers[0]
    assert first.nbytes[first.candidates.index((4, None))] == 64 * 64 // 2 + 64 * 4
    assert first.nbytes[first.candidates.index((4, 16))] == 64 * 64 // 2 + 4 * 64 * 4


def test_row_mask_leaves_padding_out_of_the_sensitivities():
    # Two layers, int2 or int8; only one may be int8. Real rows drive "a" hard, "b" barely; the
    # padding rows (masked) would make "b" look like the sensitive one.
    keys = jax.random.split(jax.random.key(4), 3)
    params = {"a": jax.random.normal(keys[0], (8, 8)), "b": jax.random.normal(keys[1], (8, 8))}
    fn = lambda p, x, mask: (x[..., :8] @ p["a"] + x[..., 8:] @ p["b"]) * mask[..., None]
    x = jax.random.normal(keys[2], (2, 6, 16)) * jnp.concatenate([jnp.full(8, 10.0), jnp.full(8, 0.1)])
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    x = jnp.where(mask[..., None] > 0, x, jnp.concatenate([jnp.zeros(8), jnp.full(8, 1000.0)]))  # loud padding in "b"
    options = dict(candidates=(2, 8), group_size=None, budget_bits_per_weight=5.0 + 32 / 8, sensitivity="output")
    rules, report = mixed_precision(fn, params, [(x, mask)], ".*", row_mask=lambda batch: batch[1], **options)
    assert [(r.pattern, r.bits) for r in rules] == [("a", 8), ("b", 2)]
    rules, _ = mixed_precision(fn, params, [(x, mask)], ".*", **options)
    assert [(r.pattern, r.bits) for r in rules] == [("a", 2), ("b", 8)]


def test_scaled_is_the_model_error_at_the_probe_and_keeps_the_local_ratios():
    model, params, batches = _setup()
    options = dict(group_size=32, candidates=(2, 4, 8), budget_bits_per_weight=5.0)
    reports = {s: mixed_precision(model.apply, params, batches, ".*kernel", sensitivity=s, **options)[1]
               for s in ("scaled", "output", "model")}
    errors = {s: np.array([layer.errors for layer in r.layers]) for s, r in reports.items()}
    probe = probe_candidate(errors["output"], np.array([layer.nbytes for layer in reports["output"].layers]),
                            reports["output"].budget_bytes)
    assert reports["output"].layers[0].candidates[probe] == (4, 32)  # uniform int4 g32 is exactly the budget
    np.testing.assert_allclose(errors["scaled"][:, probe], errors["model"][:, probe], rtol=1e-4)
    ratio = errors["scaled"] / errors["output"]
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-6)
    assert mixed_precision.__kwdefaults__["sensitivity"] == "scaled"
    _, default = mixed_precision(model.apply, params, batches, ".*kernel", budget_bits_per_weight=5.0, group_size=32)
    assert default.layers[0].candidates == ((4, None), (4, 32), (4, 16), (4, 8), (8, None))
    assert default.total_bytes <= default.budget_bytes and default.total_error <= default.uniform["int4 g32"]["error"]
