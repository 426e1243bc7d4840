"""Distillation loss against a float64 NumPy reference; gradients reach the student only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc


def _reference(student, teacher, temperature, labels=None, alpha=0.5):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    tl, sl = log_softmax(t / temperature), log_softmax(s / temperature)
    kd = np.mean(np.sum(np.exp(tl) * (tl - sl), -1)) * temperature**2
    if labels is None:
        return kd
    ce = -np.mean(log_softmax(s)[np.arange(len(labels)), labels])
    return alpha * kd + (1 - alpha) * ce


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_matches_reference(temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.standard_normal((2, 16, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 16)
    assert abs(float(jc.distillation_loss(student, teacher, temperature=temperature))
               - _reference(student, teacher, temperature)) < 1e-5
    assert abs(float(jc.distillation_loss(student, teacher, temperature=temperature, labels=labels, alpha=0.3))
               - _reference(student, teacher, temperature, labels, 0.3)) < 1e-5


def test_teacher_gets_no_gradient():
    s, t = jnp.ones((2, 3)), jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    gs, gt = jax.grad(lambda a, b: jc.distillation_loss(a, b), argnums=(0, 1))(s, t)
    assert float(jnp.abs(gt).sum()) == 0.0 and float(jnp.abs(gs).sum()) > 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        jc.distillation_loss(jnp.ones((1, 2)), jnp.ones((1, 2)), temperature=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        jc.distillation_loss(jnp.ones((1, 2)), jnp.ones((1, 3)))
