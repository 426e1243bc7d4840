"""Small real image datasets for the demo, examples and benchmarks (no downloads).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (IDX files under
``/usr/share/datasets/fashion-mnist``; set ``JAXCOMPRESS_FASHION_MNIST`` to use another folder).
When it is absent, scikit-learn's ``load_digits`` (8x8 digits, shipped inside scikit-learn) is the
fallback; the returned `Dataset` says which one you got.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "load_fashion_mnist", "load_digits", "load_image_dataset", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = Path(os.environ.get("JAXCOMPRESS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images as float32 NHWC in [0, 1], labels as int32."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {data[:4]!r})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} bytes of data for shape {dims}, found {body.size}")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{root}: no {stem}(.gz)")


def load_fashion_mnist(root: str | Path | None = None) -> Dataset:
    """The full Fashion-MNIST (60k train / 10k test, 28x28x1). Raises FileNotFoundError if absent."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{root}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        arrays[f"{split}_images"] = (images.astype(np.float32) / 255.0)[..., None]
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    return Dataset(name="fashion-mnist", num_classes=10, **arrays)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images), split deterministically into train / test."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset("sklearn-digits", images[train], labels[train], images[test], labels[test], 10)


def load_image_dataset() -> Dataset:
    """Fashion-MNIST if the Debian package is installed, else scikit-learn digits."""
    try:
        return load_fashion_mnist()
    except FileNotFoundError:
        return load_digits()
