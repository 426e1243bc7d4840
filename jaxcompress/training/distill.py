"""Knowledge distillation: train a compressed student to match its float teacher's outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["distillation_loss"]


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 2.0,
    labels: jax.Array | None = None,
    alpha: float = 0.5,
) -> jax.Array:
    """Hinton et al. (2015) distillation loss, averaged over the batch.

    ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (the ``T^2`` keeps gradient
    magnitudes comparable across temperatures). With integer ``labels``, returns
    ``alpha * distillation + (1 - alpha) * cross_entropy(student, labels)``. The teacher gets no
    gradient.

    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[2.0, 0.5, -1.0]])
    >>> float(distillation_loss(logits, logits))  # identical outputs: nothing to learn
    0.0
    >>> round(float(distillation_loss(jnp.zeros((1, 3)), logits, temperature=1.0)), 4)
    0.477
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} differ in shape"
        )
    teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    student = student_logits.astype(jnp.float32)
    teacher_logp = jax.nn.log_softmax(teacher / temperature, axis=-1)
    student_logp = jax.nn.log_softmax(student / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
    loss = jnp.mean(kl) * temperature**2
    if labels is None:
        return loss
    log_probs = jax.nn.log_softmax(student, axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1))
    return alpha * loss + (1.0 - alpha) * ce
