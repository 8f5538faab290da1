"""The user's own model and data: ``--model my_pkg.models:make_net --data path/to/data.py:load``.

A *spec* names a callable as ``module:callable`` (an importable module, e.g. ``my_pkg.models``;
the working directory is on the search path, as for ``python -m``) or ``path/to/file.py:callable``
(a file, recorded by its absolute path; its directory is put on ``sys.path`` so that it can import
its neighbours). The callable may be a dotted attribute (``module:Factory.build``).

The data callable (the contract, see docs/own-models.md) is called with those of ``seed``,
``val_fraction`` and ``data_dir`` that its signature names (all of them if it takes
``**kwargs``), and returns either a :class:`ulr.data.Dataset`, or a mapping (or an object with
these attributes) of

``train`` (required), ``val``, ``test`` (optional)
    each a pair ``(x, y)`` of tensors or numpy arrays with the same first dimension ``N``, a
    ``TensorDataset``, any map-style ``torch.utils.data.Dataset`` whose items are ``(x, y)``, or a
    ``DataLoader`` over one (its ``dataset``; every split is held in memory, and the loop draws
    its own batches so that a resumed run continues bit for bit). ``x`` is ``[N, *input_shape]``
    (float64 becomes float32); ``y`` is ``[N]``: int64 class indices for classification, floats for
    regression. Without ``val``, ``val_fraction`` of ``train`` is held out (stratified for
    classification, seeded by ``seed``); without ``test`` the run reports no test metrics.
``task`` (optional)
    ``"classification"`` or ``"regression"``; default: from ``y``'s dtype (integer:
    classification).
``num_classes`` (optional)
    default: the largest class index + 1.

The model callable is called with the ``model_args`` (``--model-arg KEY=VALUE``) as keyword
arguments, plus ``in_shape`` (one example's shape, a tuple) and ``num_outputs`` (classes, or 1 for
regression) when its signature names them (or takes ``**kwargs``); it must return an
``nn.Module`` whose output is ``[B, num_outputs]`` (logits, or the prediction).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Dataset
from ..data._dataset import stratified_split

__all__ = ["OBJECT", "as_dataset", "build_model", "display_name", "file_of", "is_spec",
           "load_data", "normalise_spec", "resolve"]

#: The prefix of a model or data given to :func:`ulr.fit` as a Python object (not rebuildable
#: by name: pass it again).
OBJECT = "object:"
_TASKS = ("classification", "regression")


def is_spec(name: str) -> bool:
    """Whether a ``model`` / ``data`` value names the user's callable (or object) rather than a
    registry entry."""
    return ":" in name


def _split(spec: str) -> tuple[str, str]:
    target, _, attr = spec.rpartition(":")
    return target, attr


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def normalise_spec(spec: str, what: str) -> str:
    """Check the form of a spec and make a file's path absolute (the run records it so).

    Raises:
        ValueError: not ``module:callable`` / ``file.py:callable``.
    """
    spec = spec.strip()
    if spec.startswith(OBJECT):
        return spec
    target, attr = _split(spec)
    form = (f"{what}: {spec!r} is neither a registry name nor MODULE:CALLABLE / "
            f"path/to/file.py:CALLABLE")
    if not target or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise ValueError(f"{form} (the part after the last ':' must name a callable)")
    if _is_file(target):
        return f"{Path(target).expanduser().resolve()}:{attr}"
    if not all(p.isidentifier() for p in target.split(".")):
        raise ValueError(f"{form} ({target!r} is not a module name; a file must end in .py)")
    return spec


def display_name(value: str) -> str:
    """A short name for directories, titles and tables: the callable's name for a spec."""
    if value.startswith(OBJECT):
        return value[len(OBJECT):].rsplit(".", 1)[-1] or "object"
    return _split(value)[1].rsplit(".", 1)[-1] if is_spec(value) else value


def file_of(spec: str) -> Path | None:
    """The file of a ``file.py:callable`` spec, else ``None``."""
    target, _ = _split(spec)
    return Path(target) if is_spec(spec) and _is_file(target) else None


def _import_file(path: Path, spec: str, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {spec!r}: the file {path} does not exist; check the path (a run records "
            f"it absolute: if it moved since the run, restore it, or pass the model yourself "
            f"to ulr.load_run(dir, model=...))")
    name = f"_ulr_user_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:  # like `python file.py`: its neighbours import
        sys.path.insert(0, str(path.parent))
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None or loader.loader is None:
        raise ImportError(f"{what} {spec!r}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ImportError(f"{what} {spec!r}: running {path} raised {type(e).__name__}: {e}"
                          ) from e
    return module


def _import_module(target: str, spec: str, what: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:  # the `ulr` script lacks the cwd
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise ImportError(
                f"{what} {spec!r}: no module named {e.name!r} on sys.path {sys.path}; run from "
                f"the directory that holds it, install it, set PYTHONPATH, or name the file "
                f"(path/to/file.py:CALLABLE)") from None
        raise ImportError(f"{what} {spec!r}: importing {target} failed: {e}") from e
    except Exception as e:
        raise ImportError(f"{what} {spec!r}: importing {target} raised {type(e).__name__}: "
                          f"{e}") from e


def resolve(spec: str, what: str) -> Callable[..., Any]:
    """The callable a spec names.

    Raises:
        ImportError: the module or file cannot be imported, or has no such attribute.
        FileNotFoundError: the file does not exist.
        TypeError: the attribute is not callable.
        ValueError: the spec names an object given to ``ulr.fit``.
    """
    if spec.startswith(OBJECT):
        raise ValueError(
            f"{what} {spec!r} was passed to ulr.fit as a Python object and cannot be rebuilt by "
            f"name; pass it again (ulr.fit(model, data, ...), ulr.load_run(dir, model=...)), or "
            f"give ulr.fit a spec string (MODULE:CALLABLE) instead")
    target, attr = _split(spec)
    path = file_of(spec)
    module = (_import_file(path, spec, what) if path is not None
              else _import_module(target, spec, what))
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = target if i == 0 else f"{target}:{'.'.join(attr.split('.')[:i])}"
            raise ImportError(f"{what} {spec!r}: {where} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{what} {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _call(fn: Callable[..., Any], offered: dict[str, Any], given: dict[str, Any],
          what: str) -> Any:
    """``fn(**given, **those of offered that its signature names)``, with a clear error when
    the arguments do not fit."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: the given ones only
        return fn(**given)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    kwargs = {k: v for k, v in offered.items() if k in sig.parameters or var_kw}
    kwargs.update(given)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise TypeError(f"{what} cannot be called with keyword arguments {sorted(kwargs)} "
                        f"({e}); its signature is {sig}") from None
    return fn(**kwargs)


def build_model(spec: str, model_args: Mapping[str, Any], in_shape: tuple[int, ...],
                num_outputs: int) -> nn.Module:
    """The user's model: ``callable(**model_args[, in_shape=..., num_outputs=...])``.

    Raises:
        TypeError: the arguments do not fit the callable, or it returns no ``nn.Module``.
    """
    fn = resolve(spec, "model")
    model = _call(fn, {"in_shape": tuple(in_shape), "num_outputs": num_outputs},
                  dict(model_args), f"model {spec!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec!r} returned a {type(model).__name__}, not a "
                        f"torch.nn.Module")
    return model


def load_data(spec: str, *, seed: int, val_fraction: float, data_dir: str | None) -> Dataset:
    """The user's data, called as the module docstring says and normalised to a
    :class:`ulr.data.Dataset`."""
    fn = resolve(spec, "data")
    out = _call(fn, {"seed": seed, "val_fraction": val_fraction, "data_dir": data_dir}, {},
                f"data {spec!r}")
    return as_dataset(out, name=display_name(spec), seed=seed, val_fraction=val_fraction,
                      what=f"data {spec!r}")


def _tensor(v: Any) -> Tensor:
    t = torch.as_tensor(v)
    return t.float() if t.dtype == torch.float64 else t


def _as_split(split: Any, what: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a pair, a (Tensor)Dataset or a DataLoader."""
    if isinstance(split, torch.utils.data.DataLoader):
        split = split.dataset
    if isinstance(split, torch.utils.data.TensorDataset):
        split = split.tensors
    if isinstance(split, (tuple, list)) and len(split) == 2 and not isinstance(
            split[0], (tuple, list)):
        x, y = _tensor(split[0]), _tensor(split[1])
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        try:
            items = [split[i] for i in range(len(split))]
            x = torch.stack([_tensor(it[0]) for it in items])
            y = torch.stack([_tensor(it[1]) for it in items])
        except Exception as e:
            raise TypeError(f"{what}: its items must be (x, y) pairs of tensors or numbers "
                            f"({type(e).__name__}: {e})") from None
    else:
        raise TypeError(f"{what} is a {type(split).__name__}; give a pair (x, y) of tensors or "
                        f"arrays, a TensorDataset, a map-style Dataset of (x, y) items or a "
                        f"DataLoader over one")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{what}: x must be [N, ...] and y [N] with the same N, got x "
                         f"{tuple(x.shape)} and y {tuple(y.shape)}")
    return x, y


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def _hold_out(train: tuple[Tensor, Tensor], task: str, seed: int,
              fraction: float) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    x, y = train
    rng = np.random.default_rng([seed, 7])
    if task == "classification":
        rest, held = stratified_split(y.numpy(), fraction, rng)
    else:
        order = rng.permutation(len(y))
        k = int(round(fraction * len(y)))
        held, rest = order[:k], order[k:]
    r, h = torch.as_tensor(rest, dtype=torch.long), torch.as_tensor(held, dtype=torch.long)
    return (x[r], y[r]), (x[h], y[h])


def as_dataset(obj: Any, *, name: str = "custom", seed: int = 0, val_fraction: float = 0.1,
               what: str = "data") -> Dataset:
    """Normalise what a data callable returned (or what :func:`ulr.fit` was given: also a bare
    training split) to a :class:`ulr.data.Dataset`.

    Raises:
        TypeError, ValueError: it does not fit the contract (the message says what does).
    """
    if isinstance(obj, Dataset):
        return obj
    if _field(obj, "train") is None:
        if isinstance(obj, (tuple, list, torch.utils.data.Dataset, torch.utils.data.DataLoader)):
            obj = {"train": obj}
        else:
            raise TypeError(
                f"{what} gave a {type(obj).__name__}; it must be a ulr.data.Dataset or a "
                f"mapping (or object) with 'train' and optionally 'val', 'test', 'task', "
                f"'num_classes' (see docs/own-models.md)")
    train = _as_split(_field(obj, "train"), f"{what}: train")
    task = _field(obj, "task") or ("regression" if train[1].is_floating_point()
                                   else "classification")
    if task not in _TASKS:
        raise ValueError(f"{what}: task must be one of {_TASKS}, got {task!r}")
    parts = {k: _as_split(_field(obj, k), f"{what}: {k}") for k in ("val", "test")
             if _field(obj, k) is not None}
    if "val" not in parts:
        train, parts["val"] = _hold_out(train, task, seed, val_fraction)
    empty = (train[0][:0], train[1][:0])
    splits = {"train": train, "val": parts["val"], "test": parts.get("test", empty)}
    for key, (x, y) in splits.items():
        if tuple(x.shape[1:]) != tuple(train[0].shape[1:]):
            raise ValueError(f"{what}: {key} examples have shape {tuple(x.shape[1:])}, train "
                             f"{tuple(train[0].shape[1:])}")
        want = torch.float32 if task == "regression" else torch.int64
        if task == "classification" and y.is_floating_point():
            raise TypeError(f"{what}: {key} targets are {y.dtype} but the task is "
                            f"classification: give int64 class indices")
        splits[key] = (x, y.to(want))
    num_classes = _field(obj, "num_classes")
    if task == "classification" and num_classes is None:
        num_classes = int(max(int(y.max()) for _, y in splits.values() if len(y))) + 1
    return Dataset(name=name, train=splits["train"], val=splits["val"], test=splits["test"],
                   input_shape=tuple(train[0].shape[1:]),
                   num_classes=int(num_classes or 0) if task == "classification" else 0,
                   task=task)
