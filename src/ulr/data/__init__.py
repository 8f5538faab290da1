"""Offline datasets as in-memory tensors with deterministic splits.

Example:
    >>> import torch
    >>> from ulr.data import load, batches
    >>> ds = load("digits", seed=0)
    >>> x, y = ds.train                      # float32 [N, 1, 8, 8] in [0, 1], int64 [N]
    >>> gen = torch.Generator().manual_seed(0)
    >>> for xb, yb in batches(x, y, 64, shuffle=True, generator=gen):
    ...     pass

See :func:`load` for the datasets and their shapes, and :mod:`ulr.data.fashion_mnist` for where
the Fashion-MNIST files are looked up.
"""

from ._dataset import Dataset, batches
from ._loaders import available, load
from .fashion_mnist import download as download_fashion_mnist
from .idx import read_idx

__all__ = [
    "Dataset",
    "available",
    "batches",
    "download_fashion_mnist",
    "load",
    "read_idx",
]
