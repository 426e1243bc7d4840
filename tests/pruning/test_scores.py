import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.pruning import scores


def test_magnitude_saliency_random():
    w = np.array([[1.0, -2.0], [0.5, -0.25]], np.float32)
    g = np.array([[0.1, 0.3], [-4.0, 2.0]], np.float32)
    np.testing.assert_allclose(scores.magnitude(w), np.abs(w))
    np.testing.assert_allclose(scores.saliency(w, g), np.abs(w.astype(np.float64) * g), rtol=1e-6)
    r = scores.random_scores(jax.random.PRNGKey(0), (50, 4))
    assert r.shape == (50, 4) and float(r.min()) >= 0 and float(r.max()) < 1
    with pytest.raises(ValueError, match="do not match"):
        scores.saliency(w, g[:1])


def test_unit_and_block_norms_match_numpy():
    x = np.random.default_rng(0).standard_normal((3, 3, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(scores.unit_norms(x, -1, "l1"), np.abs(x).sum((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(scores.unit_norms(x, 2, "l2"), np.sqrt((x.astype(np.float64) ** 2).sum((0, 1, 3))), rtol=1e-5)
    blocks = scores.block_norms(x, (2, 3), "l2")
    ref = np.sqrt((x.astype(np.float64).reshape(3, 3, 2, 2, 2, 3) ** 2).sum((3, 5)))
    np.testing.assert_allclose(blocks, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="norm must be one of"):
        scores.unit_norms(x, -1, "linf")


@pytest.mark.parametrize("how,ref", [("max", np.max), ("l1", np.sum), ("mean", np.mean), ("l2", lambda a: np.sqrt((a**2).sum()))])
def test_normalize(how, ref):
    x = np.abs(np.random.default_rng(1).standard_normal(10)).astype(np.float32)
    np.testing.assert_allclose(scores.normalize(jnp.asarray(x), how), x / ref(x.astype(np.float64)), rtol=1e-5)
    assert float(scores.normalize(jnp.zeros(3), how).sum()) == 0.0
