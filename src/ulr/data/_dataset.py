"""The `Dataset` container, deterministic split helpers and the `batches` iterator."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Split = tuple[Tensor, Tensor]
Task = Literal["classification", "regression"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory dataset with fixed train/val/test splits.

    Every split is a pair ``(x, y)`` of CPU tensors with the same first dimension ``N``:

    * ``x``: ``float32`` of shape ``[N, *input_shape]``. Image sets are ``[N, C, H, W]`` with
      values in ``[0, 1]``; sequence sets are ``[N, T, F]`` (batch first, time, features).
    * ``y``: for ``task == "classification"`` an ``int64`` tensor of shape ``[N]`` with values in
      ``[0, num_classes)``; for ``task == "regression"`` a ``float32`` tensor of shape ``[N]``.

    Models receive ``x`` unflattened; call :meth:`flattened` (or pass ``flatten=True`` to
    :func:`ulr.data.load`) to get ``[N, prod(input_shape)]`` inputs for an MLP.

    Attributes:
        name: Registry name, e.g. ``"digits"``.
        train: Training split ``(x, y)``.
        val: Validation split ``(x, y)``; may hold zero examples.
        test: Test split ``(x, y)``.
        input_shape: Shape of one example, e.g. ``(1, 28, 28)``, ``(1, 40)`` or ``(50, 2)``.
        num_classes: Number of classes; ``0`` for regression.
        task: ``"classification"`` or ``"regression"``.
    """

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    task: Task = "classification"

    @property
    def input_dim(self) -> int:
        """Number of input features per example, ``prod(input_shape)``."""
        return math.prod(self.input_shape)

    def flattened(self) -> Dataset:
        """Return a copy whose inputs are flattened to ``[N, input_dim]`` (``float32``)."""

        def flat(split: Split) -> Split:
            x, y = split
            return x.reshape(x.shape[0], self.input_dim), y

        return replace(
            self,
            train=flat(self.train),
            val=flat(self.val),
            test=flat(self.test),
            input_shape=(self.input_dim,),
        )

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{k}={len(s[0])}"
            for k, s in (("train", self.train), ("val", self.val), ("test", self.test))
        )
        return (
            f"Dataset(name={self.name!r}, {sizes}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, task={self.task!r})"
        )


def stratified_split(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(y)-1`` into ``(rest, held_out)``, stratified by label.

    Each class contributes ``round(fraction * n_class)`` examples to ``held_out``. Both index
    arrays are returned in a random (seeded) order.

    Args:
        y: Integer labels, shape ``[N]``.
        fraction: Share of each class to hold out, in ``[0, 1)``.
        rng: Source of randomness.

    Returns:
        ``(rest, held_out)``: disjoint ``int64`` index arrays covering ``0..N-1``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    rest: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        k = int(round(fraction * len(idx)))
        held.append(idx[:k])
        rest.append(idx[k:])
    empty = np.empty(0, dtype=np.int64)
    rest_idx = rng.permutation(np.concatenate(rest)) if rest else empty
    held_idx = rng.permutation(np.concatenate(held)) if held else empty
    return rest_idx.astype(np.int64), held_idx.astype(np.int64)


def to_split(x: np.ndarray, y: np.ndarray, *, regression: bool = False) -> Split:
    """Convert numpy arrays to a ``(float32 x, int64-or-float32 y)`` tensor pair (copies)."""
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32 if regression else torch.int64)
    return xt, yt


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield minibatches ``(x[idx], y[idx])`` covering every example once per call.

    Args:
        x: Inputs, shape ``[N, ...]``.
        y: Targets, shape ``[N, ...]``.
        batch_size: Maximum examples per batch (the last batch may be smaller).
        shuffle: Visit examples in a random order drawn from ``generator``.
        generator: Required when ``shuffle`` is true, so that epochs are reproducible and the
            global RNG is never consumed. Ignored otherwise.
        drop_last: Drop the final batch if it holds fewer than ``batch_size`` examples.

    Yields:
        Pairs ``(xb, yb)`` of shapes ``[B, ...]`` on the device of ``x`` / ``y``.

    Raises:
        ValueError: On a non-positive ``batch_size``, mismatched lengths, or ``shuffle`` without a
            ``generator``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y differ in length: {n} != {y.shape[0]}")
    if shuffle:
        if generator is None:
            raise ValueError(
                "shuffle=True needs a generator, e.g. torch.Generator().manual_seed(0)"
            )
        order = torch.randperm(n, generator=generator, device=generator.device)
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx.to(x.device)], y[idx.to(y.device)]
