"""The Python front door of the training product: :func:`fit` trains any ``nn.Module`` on data
in the contract of :mod:`ulr.train.custom`, :func:`load_run` returns a run's trained model.

Both are lazy attributes of :mod:`ulr` (``ulr.fit``, ``ulr.load_run``): ``import ulr`` loads no
training code.

Example:
    >>> import torch, ulr
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(96, 4), torch.randint(0, 3, (96,))
    >>> summary = ulr.fit(net, {"train": (x, y), "test": (x, y)}, epochs=1, num_copies=8)
    >>> summary["steps"]          # 86 training rows (10% held out for validation), batch 32
    3
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import custom, recipes
from .checkpoints import read_weights
from .config import RunConfig, check_values
from .config_file import load_toml
from .progress import Callback, ConsoleProgress
from .rundir import BEST, CHECKPOINT, GROUP_FILE, SUMMARY, read_json

__all__ = ["TrainedRun", "fit", "load_run"]

#: which weights of a run directory :func:`load_run` reads
WEIGHTS = {"best": BEST, "last": CHECKPOINT}


def _config(config: RunConfig | Mapping[str, Any] | str | Path | None,
            overrides: Mapping[str, Any]) -> RunConfig:
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, RunConfig):
        values = config.to_dict()
    elif isinstance(config, (str, Path)):
        values = load_toml(str(config))
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise TypeError(f"config must be a RunConfig, a mapping of its keys, a TOML file or "
                        f"None, got {type(config).__name__}")
    values = {**values, **check_values(dict(overrides), "ulr.fit")}
    return RunConfig.from_dict(values, source="ulr.fit")


def _object_name(obj: Any) -> str:
    cls = type(obj)
    return f"{custom.OBJECT}{cls.__module__}.{cls.__qualname__}"


def fit(model: nn.Module | str, data: Any, config: RunConfig | Mapping[str, Any] | str | Path
        | None = None, *, out_dir: str | Path | None = None, resume: bool = False,
        progress: bool = False, callbacks: Sequence[Callback] = (), **overrides: Any
        ) -> dict[str, Any]:
    """Train ``model`` on ``data`` with the ULR estimator (or ``method=...``) and return the
    run's summary; the model is trained in place (moved to ``config.device``).

    Args:
        model: any ``nn.Module`` (kept as it is, its own initial weights), or a spec
            ``"module:callable"`` / ``"file.py:callable"`` built as ``ulr train --model``
            builds it (then :func:`load_run` can rebuild it from the run directory alone).
        data: a :class:`ulr.data.Dataset`; a mapping or object with ``train`` (and ``val``,
            ``test``, ``task``, ``num_classes``) as :mod:`ulr.train.custom` describes; a bare
            training split (an ``(x, y)`` pair, a ``TensorDataset``, a ``DataLoader``, whose
            batch size is used unless given); or a spec ``"module:callable"``.
        config: a :class:`RunConfig`, a mapping of its keys, a TOML file, or ``None`` (the
            defaults); ``overrides`` (``epochs=5, num_copies=64, ...``) apply on top.
        out_dir: a run directory to write (checkpoints, metrics, summary), as ``ulr train
            --out``; ``None`` writes nothing.
        resume: continue the run in ``out_dir`` (pass the same model and data again).
        progress: print the progress bar and epoch lines.
        callbacks: more progress hooks (:class:`ulr.train.Callback`).

    Raises:
        ConfigError: an unknown key (with a did-you-mean) or an invalid value.
        TypeError, ValueError: data that does not fit the contract, a model that does not fit
            the data.
    """
    from .loop import fit as train_fit

    if isinstance(data, torch.utils.data.DataLoader) and "batch_size" not in overrides \
            and data.batch_size is not None:
        overrides = {**overrides, "batch_size": data.batch_size}
    if isinstance(model, str):
        overrides = {**overrides, "model": model}
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a 'module:callable' spec, got "
                        f"{type(model).__name__}")
    else:
        overrides = {**overrides, "model": _object_name(model)}
    if isinstance(data, str):
        overrides = {**overrides, "data": data}
    else:
        name = getattr(data, "name", None) if hasattr(data, "train") else None
        name = name if isinstance(name, str) and name else "data"
        overrides = {**overrides, "data": f"{custom.OBJECT}{name}"}
    cfg = _config(config, overrides)
    ds = None
    if not isinstance(data, str):
        ds = custom.as_dataset(data, name=custom.display_name(cfg.data), seed=cfg.seed,
                               val_fraction=cfg.val_fraction)
    label = cfg.method
    hooks = [*callbacks, ConsoleProgress(label, quiet=not progress, log_every=cfg.log_every)]
    return train_fit(cfg, out_dir, resume=resume, callbacks=hooks, label=label,
                     model=model if isinstance(model, nn.Module) else None, dataset=ds)


@dataclass
class TrainedRun:
    """A run's trained model, read back by :func:`load_run`.

    Attributes:
        model: the network with the chosen weights, in ``eval()`` mode, on ``device``.
        config: the run's :class:`RunConfig`.
        summary: ``summary.json`` when the run finished, else ``None``.
        path: the run directory.
        weights: the checkpoint file read (``best.pt`` or ``checkpoint.pt``).
        epoch: the epoch those weights are from (``None`` if unknown).
    """

    model: nn.Module
    config: RunConfig
    summary: dict[str, Any] | None
    path: Path
    weights: Path
    epoch: int | None


def _checkpoint(path: Path, weights: str) -> Path:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory written by ulr "
                                f"train or ulr.fit(out_dir=...)")
    if (path / GROUP_FILE).is_file():
        runs = [r.get("dir") for r in (read_json(path / GROUP_FILE) or {}).get("runs", [])]
        raise FileNotFoundError(f"{path} is a comparison directory of several runs "
                                f"({', '.join(map(str, runs))}); pass one of them, e.g. "
                                f"{path / str(runs[0]) if runs else path}")
    file = path / WEIGHTS[weights]
    if not file.is_file():
        other = "last" if weights == "best" else "best"
        has_other = (path / WEIGHTS[other]).is_file()
        raise FileNotFoundError(
            f"{path} has no {file.name}"
            + (f" (no epoch has finished yet, or the run predates best.pt); use weights="
               f"{other!r}" if has_other else
               "; is it a run directory written by ulr train?"))
    return file


def _check_file(record: Mapping[str, Any]) -> None:
    path, digest = record.get("file"), record.get("sha256")
    if path and digest and Path(path).is_file():
        now = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if now != digest:
            warnings.warn(f"{path} has changed since the run was trained; the model is built by "
                          f"its current code", stacklevel=3)


def _rebuild(config: RunConfig, record: Mapping[str, Any] | None) -> nn.Module:
    """The run's model, built from its recorded shapes (older runs: from its data)."""
    if config.model.startswith(custom.OBJECT):
        custom.resolve(config.model, "model")  # raises: an object cannot be rebuilt by name
    if record is None:
        ds = recipes.dataset(config.data, config.data_dir, config.seed, config.val_fraction)
        return recipes.build_model(config, ds)
    _check_file(record)
    shape = (tuple(record["in_shape"]), int(record["num_outputs"]))
    try:
        return recipes.build_model(config, shape=shape)
    except ImportError:
        cwd = record.get("cwd")
        if not custom.is_spec(config.model) or not cwd or cwd in sys.path:
            raise
        sys.path.append(cwd)  # the module was importable from the run's working directory
        return recipes.build_model(config, shape=shape)


def load_run(run_dir: str | Path, weights: str = "best", *, model: nn.Module | None = None,
             device: str | torch.device = "cpu") -> TrainedRun:
    """The trained model of a run directory, rebuilt from what the run recorded (the model's
    registry name or spec, its arguments and input/output shapes), for built-in and custom
    models alike.

    Args:
        run_dir: a run directory (or one of its ``.pt`` files).
        weights: ``"best"`` (``best.pt``, the epoch of best validation score) or ``"last"``
            (``checkpoint.pt``, the latest weights).
        model: load the weights into this module instead of rebuilding it (a run of a model
            given to :func:`fit` as an object, or a model file that moved).
        device: where the model goes.

    Raises:
        FileNotFoundError: no such run or weights file; the model's file has moved.
        ImportError: the model's module cannot be imported (the message shows ``sys.path``)
            or has no such callable.
        TypeError: the callable returns no ``nn.Module``.
        ValueError: a checkpoint that is not ulr's, or weights that do not fit the model.
    """
    file = _checkpoint(Path(run_dir), weights)
    config, state, ckpt = read_weights(file)
    if model is None:
        with torch.random.fork_rng(devices=[]):  # building seeds the global RNG
            model = _rebuild(config, ckpt.get("model_source"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"the weights in {file} do not fit the model of {config.model!r} "
                         f"(has its code changed since the run?): {str(e).splitlines()[0]}"
                         ) from None
    model.to(device).eval()
    best = ckpt.get("best") or {}
    epoch = best.get("epoch") if ckpt.get("kind") == "best" else (
        (ckpt.get("progress") or {}).get("epoch"))
    return TrainedRun(model, config, read_json(file.parent / SUMMARY), file.parent, file, epoch)

