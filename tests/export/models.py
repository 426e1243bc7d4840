"""Small Fashion-MNIST models for the export tests, trained in seconds, and their int8 versions."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.demo.data import load_fashion_mnist


@functools.lru_cache(maxsize=1)
def fashion_mnist():
    return load_fashion_mnist()


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (relu6) -> 3x3 depthwise (relu6) -> 1x1 project, + residual."""

    features: int
    expand: int = 3
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        channels = x.shape[-1]
        h = jax.nn.relu6(norm()(nn.Conv(channels * self.expand, (1, 1), use_bias=False)(x)))
        h = nn.Conv(channels * self.expand, (3, 3), strides=self.strides, feature_group_count=channels * self.expand,
                    use_bias=False)(h)
        h = jax.nn.relu6(norm()(h))
        h = norm()(nn.Conv(self.features, (1, 1), use_bias=False)(h))
        if self.strides == 1 and channels == self.features:
            h = h + x
        return h


class MobileNet(nn.Module):
    """A MobileNetV2-style CNN: stem conv, inverted residual blocks, global mean pool, classifier."""

    widths: tuple = ((16, 2), (16, 1), (24, 2), (24, 1))
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = jax.nn.relu6(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for features, strides in self.widths:
            x = InvertedResidual(features, strides=strides)(x, train)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def train(model, steps: int, batch: int = 128, seed: int = 0, learning_rate: float = 3e-3):
    """Adam on the Fashion-MNIST training set; returns the variables (with batch stats if any)."""
    data = fashion_mnist()
    variables = model.init(jax.random.key(seed), data.train_images[:2])
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    mutable = list(state)

    @jax.jit
    def step(params, state, opt_state, images, labels):
        def loss_fn(p):
            if mutable:
                logits, new_state = model.apply({"params": p, **state}, images, train=True, mutable=mutable)
            else:
                logits, new_state = model.apply({"params": p}, images), state
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state

        (_, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        index = rng.integers(0, len(data.train_images), batch)
        params, state, opt_state = step(params, state, opt_state, data.train_images[index], data.train_labels[index])
    return {"params": params, **state}


def quantize_static(apply, variables, calibration):
    """Per-output-channel int8 kernels with static activation scales calibrated on ``calibration``."""
    rules = [jc.QuantRule(pattern=r"params/.*kernel", channel_axes=(-1,), activation="static")]
    qparams, _ = jc.quantize_params(variables, rules, on_unused="ignore")
    return jc.attach_activation_scales(qparams, jc.calibrate_activations(apply, qparams, calibration))


def settle_batch_stats(model, variables, batches):
    """Untrained weights with BatchNorm statistics of real batches (a fixed, non-degenerate model
    without the cost of training depthwise convs on a shared CPU)."""

    @jax.jit
    def update(variables, images):
        _, state = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return {**variables, **state}

    for images in batches:
        variables = update(variables, images)
    return variables
