import jax
import numpy as np
import optax
import pytest

from jaxcompress.pruning import distributions, schedules
from tests.pruning import reference


def test_polynomial_matches_zhu_gupta_formula():
    s = jax.jit(schedules.polynomial(0.9, begin_step=100, end_step=1100, initial_sparsity=0.1, frequency=50))
    for step in [0, 99, 100, 149, 150, 420, 1099, 1100, 5000]:
        expected = reference.zhu_gupta(step, 0.9, 100, 1100, 0.1, 3, 50)
        assert float(s(step)) == pytest.approx(expected, abs=1e-6), step


def test_constant_one_shot_and_cosine():
    assert float(schedules.constant(0.3)(10**6)) == pytest.approx(0.3)
    s = schedules.one_shot(0.8, step=10)
    assert [round(float(s(t)), 6) for t in (0, 9, 10, 11)] == [0.0, 0.0, 0.8, 0.8]
    f = schedules.cosine_drop_fraction(0.4, 200)
    for t in (0, 37, 100, 199, 200, 300):
        assert float(f(t)) == pytest.approx(0.2 * (1 + np.cos(np.pi * min(t, 200) / 200)), abs=1e-6)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.5"])
def test_sparsity_outside_unit_interval_is_an_error(bad):
    with pytest.raises(ValueError, match=r"must be .*\[0, 1\)"):
        schedules.constant(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        schedules.polynomial(bad, 0, 10)


def test_polynomial_argument_errors():
    with pytest.raises(ValueError, match="end_step"):
        schedules.polynomial(0.5, 10, 10)
    with pytest.raises(ValueError, match="frequency"):
        schedules.polynomial(0.5, 0, 10, frequency=0)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95, 0.99])
def test_erk_matches_reference_and_total(sparsity):
    shapes = ((3, 3, 1, 16), (3, 3, 16, 32), (1568, 128), (128, 10))
    got = np.asarray([float(x) for x in jax.jit(distributions.erk_sparsities, static_argnums=0)(shapes, sparsity)])
    np.testing.assert_allclose(1 - got, reference.erk_densities(shapes, sparsity), atol=1e-5)
    sizes = np.array([np.prod(s) for s in shapes])
    assert (got * sizes).sum() / sizes.sum() == pytest.approx(sparsity, abs=1e-5)
    assert np.all(got >= 0) and np.all(got < 1)


def test_erk_keeps_small_layers_denser():
    s = [float(x) for x in distributions.erk_sparsities([(1000, 1000), (10, 10)], 0.9)]
    assert s[1] < s[0]


def test_optax_schedule_works_as_sparsity():
    sched = optax.linear_schedule(0.0, 0.5, 100)
    assert float(sched(50)) == pytest.approx(0.25)
    assert float(distributions.uniform_sparsities([(2, 2)], sched(100))[0]) == pytest.approx(0.5)
