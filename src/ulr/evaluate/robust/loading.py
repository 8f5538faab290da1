"""A trained model and its evaluation data, read from a ``ulr train`` run directory (the
model is rebuilt from the checkpoint's config and the data reloaded by name)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..runs import SUMMARY, WEIGHTS, checkpoint_path, read_json

#: Datasets of :mod:`ulr.data` whose inputs lie in [0, 1] by construction.
_UNIT_RANGE = ("digits", "sequential-digits", "mnist-subset", "fashion-mnist")


@dataclass
class Loaded:
    """A trained model read from a ``ulr train`` run directory or checkpoint.

    Attributes:
        label: name in tables (the run directory's name, or ``parent/name`` when ambiguous).
        path: the run directory.
        model: the model with the checkpoint's weights, on the CPU, in ``eval()`` mode.
        config: the run's config as a dict.
        x, y: the evaluation split (``split``, first ``limit`` examples).
        value_range: the valid input range of the data (see :func:`value_range`).
        summary: ``summary.json`` when present (the run finished), else ``None``.
    """

    label: str
    path: Path
    model: nn.Module
    config: dict[str, Any]
    x: Tensor
    y: Tensor
    value_range: tuple[float, float]
    summary: dict[str, Any] | None


def value_range(dataset: Any) -> tuple[float, float]:
    """The valid input range of a :class:`ulr.data.Dataset`: ``(0, 1)`` for the image sets
    (digits, sequential-digits, mnist-subset, fashion-mnist), else the observed range of the
    training inputs (e.g. MNIST-1D, which is standardised)."""
    if dataset.name in _UNIT_RANGE:
        return 0.0, 1.0
    x = dataset.train[0]
    return float(x.min()), float(x.max())





_DATA_CACHE: dict[tuple, Any] = {}


def _dataset(name: str, root: str | None, seed: int, val_fraction: float) -> Any:
    from ... import data
    from ...train import recipes
    from ...train.custom import is_spec

    if is_spec(name):  # the user's data callable (ulr train --data MODULE:CALLABLE)
        return recipes.dataset(name, root, seed, val_fraction)
    key = (name, root, seed, val_fraction)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one dataset at a time (Fashion-MNIST is 200 MB)
        _DATA_CACHE[key] = data.load(name, root=root, seed=seed, val_fraction=val_fraction)
    return _DATA_CACHE[key]


def load(path: str | Path, *, split: str = "test", limit: int | None = None,
         label: str | None = None, weights: str = "last") -> Loaded:
    """Read the model and the evaluation data of a run directory (or its ``checkpoint.pt``).

    The test split is the same for every seed of a dataset (:func:`ulr.data.load`), so runs
    with different seeds are evaluated on the same examples; ``split="val"`` uses the run's
    own validation split.

    ``weights``: ``"last"`` (``checkpoint.pt``, the latest weights) or ``"best"``
    (``best.pt``, the epoch of best validation accuracy) of a run directory.

    Raises:
        FileNotFoundError: no such path, or no checkpoint in it.
        ValueError: an unreadable checkpoint, a regression run (accuracy is undefined), an
            empty split, or a bad ``split``/``limit``/``weights``.
    """
    from ...train import build_model
    from ...train.checkpoints import read_weights

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    ckpt_path = checkpoint_path(Path(path), weights)
    config, weights, ckpt = read_weights(ckpt_path)
    ds = _dataset(config.data, config.data_dir, config.seed if split == "val" else 0,
                  config.val_fraction if split == "val" else 0.1)
    from ...data import Dataset

    if not isinstance(ds, Dataset) or ds.task != "classification":
        raise ValueError(f"{ckpt_path}: dataset {config.data!r} is not a classification task "
                         f"of in-memory (x, y) examples; ulr robust measures accuracy")
    model = build_model(config, ds)
    model.load_state_dict(weights)
    model.eval()
    x, y = ds.test if split == "test" else ds.val
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if len(x) == 0:
        raise ValueError(f"{ckpt_path}: the {split} split of {config.data!r} is empty")
    run_dir = ckpt_path.parent
    return Loaded(label or run_dir.name, run_dir, model, config.to_dict(), x, y,
                  value_range(ds), read_json(run_dir / SUMMARY))

