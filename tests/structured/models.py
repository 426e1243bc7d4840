"""Small linen models for the shrink tests, each with a hand-written masked-dense reference.

Every model takes its feature counts as attributes, so the shrunk variables can be applied with
the same class built from `ShrinkResult.features`. ``reference(variables, keep)`` zeroes the
INPUT rows of every consumer of a removed channel (written out by hand per model, independent
of the jaxpr analysis): the output of the dense model with those rows zeroed is what the shrunk
model must compute.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def randomize(variables, seed: int = 0):
    """Random values for every leaf (BatchNorm variances positive) so BN effects are visible."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        value = rng.standard_normal(leaf.shape).astype(np.float32) * 0.5
        if "var" in name:
            value = rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        out.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, out)


def zero_rows(variables, path: Sequence[str], axis: int, keep):
    """A copy of ``variables`` with the entries of ``path`` along ``axis`` zeroed where not ``keep``."""
    variables = jax.tree_util.tree_map(lambda x: x, variables)
    node = variables
    for key in path[:-1]:
        node = node[key]
    leaf = node[path[-1]]
    shape = [1] * leaf.ndim
    shape[axis] = leaf.shape[axis]
    node[path[-1]] = leaf * jnp.asarray(keep, leaf.dtype).reshape(shape)
    return variables


def flat_rows(keep, positions: int):
    """Keep-vector of a Dense kernel fed by an NHWC flatten: row h*w*C + c follows channel c."""
    return np.tile(np.asarray(keep), positions)


class ConvBNChain(nn.Module):
    features: Sequence[int] = (8, 12)
    classes: int = 5

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(f, (3, 3))(x)))
        return nn.Dense(self.classes)(x.mean(axis=(1, 2)))

    @staticmethod
    def reference(v, keep):
        v = zero_rows(v, ("params", "Conv_1", "kernel"), 2, keep["params/Conv_0/kernel"])
        return zero_rows(v, ("params", "Dense_0", "kernel"), 0, keep["params/Conv_1/kernel"])


class ResNet(nn.Module):
    """Stem conv, two residual blocks (conv-BN-relu-conv-BN + skip), global pool, classifier."""

    stem: int = 8
    inner: Sequence[int] = (8, 8)
    classes: int = 5

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.stem, (3, 3))(x)))
        for width in self.inner:
            y = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(width, (3, 3))(x)))
            y = nn.BatchNorm(use_running_average=True)(nn.Conv(self.stem, (3, 3))(y))
            x = nn.relu(x + y)
        return nn.Dense(self.classes)(x.mean(axis=(1, 2)))

    @staticmethod
    def reference(v, keep):
        stream = keep["params/Conv_0/kernel"]
        v = zero_rows(v, ("params", "Conv_1", "kernel"), 2, stream)
        v = zero_rows(v, ("params", "Conv_2", "kernel"), 2, keep["params/Conv_1/kernel"])
        v = zero_rows(v, ("params", "Conv_3", "kernel"), 2, stream)
        v = zero_rows(v, ("params", "Conv_4", "kernel"), 2, keep["params/Conv_3/kernel"])
        return zero_rows(v, ("params", "Dense_0", "kernel"), 0, stream)


class DenseStack(nn.Module):
    features: Sequence[int] = (16, 12)
    classes: int = 5

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = nn.relu(nn.Dense(f)(x))
        return nn.Dense(self.classes)(x)

    @staticmethod
    def reference(v, keep):
        v = zero_rows(v, ("params", "Dense_1", "kernel"), 0, keep["params/Dense_0/kernel"])
        return zero_rows(v, ("params", "Dense_2", "kernel"), 0, keep["params/Dense_1/kernel"])


class DepthwiseSeparable(nn.Module):
    """Conv -> BN -> relu -> depthwise 3x3 (follows its input) -> BN -> relu -> pointwise 1x1."""

    stem: int = 8
    pointwise: int = 12
    classes: int = 5

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(self.stem, (3, 3))(x)))
        x = nn.Conv(self.stem, (3, 3), feature_group_count=self.stem)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        x = nn.relu(nn.Conv(self.pointwise, (1, 1))(x))
        return nn.Dense(self.classes)(x.mean(axis=(1, 2)))

    @staticmethod
    def reference(v, keep):
        # The depthwise conv has one input per filter: its filters go with the stem's channels,
        # so the first consumer that mixes channels is the pointwise conv.
        v = zero_rows(v, ("params", "Conv_2", "kernel"), 2, keep["params/Conv_0/kernel"])
        return zero_rows(v, ("params", "Dense_0", "kernel"), 0, keep["params/Conv_2/kernel"])


class Concat(nn.Module):
    left: int = 4
    right: int = 6
    mixed: int = 8
    classes: int = 5

    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Conv(self.left, (3, 3))(x))
        b = nn.relu(nn.Conv(self.right, (1, 1))(x))
        x = nn.relu(nn.Conv(self.mixed, (3, 3))(jnp.concatenate([a, b], axis=-1)))
        return nn.Dense(self.classes)(x.mean(axis=(1, 2)))

    @staticmethod
    def reference(v, keep):
        rows = np.concatenate([keep["params/Conv_0/kernel"], keep["params/Conv_1/kernel"]])
        v = zero_rows(v, ("params", "Conv_2", "kernel"), 2, rows)
        return zero_rows(v, ("params", "Dense_0", "kernel"), 0, keep["params/Conv_2/kernel"])


class FlattenCNN(nn.Module):
    """jaxcompress.demo.pipeline.CNN's shape with configurable widths: two stride-2 convs, flatten, Dense."""

    features: Sequence[int] = (8, 12)
    hidden: int = 16
    classes: int = 5

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)

    @staticmethod
    def reference(v, keep):
        v = zero_rows(v, ("params", "Conv_1", "kernel"), 2, keep["params/Conv_0/kernel"])
        positions = v["params"]["Dense_0"]["kernel"].shape[0] // len(keep["params/Conv_1/kernel"])
        v = zero_rows(v, ("params", "Dense_0", "kernel"), 0, flat_rows(keep["params/Conv_1/kernel"], positions))
        return zero_rows(v, ("params", "Dense_1", "kernel"), 0, keep["params/Dense_0/kernel"])
