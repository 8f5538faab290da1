"""Walking the nested values a model takes and returns (tensors in tuples, lists, dicts,
dataclasses): one walker, :func:`walk`, and the few things the estimator does with it."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["walk", "replicate", "tensors", "clone_dense", "map_floats", "check_batch",
           "path_name", "batch_dims"]

Path = tuple


def _keep(tree: Any, path: Path) -> Any:
    return tree


def walk(tree: Any, leaf: Callable[[Tensor, Path], Any], *,
         other: Callable[[Any, Path], Any] = _keep, path: Path = ()) -> Any:
    """``tree`` rebuilt with every tensor ``t`` at ``path`` replaced by ``leaf(t, path)``.

    Tuples (NamedTuples too), lists, mappings (``dict``, ``OrderedDict``, ...) and dataclass
    instances are rebuilt with their own type; anything else goes to ``other(value, path)``
    (default: returned unchanged).
    """
    if isinstance(tree, Tensor):
        return leaf(tree, path)
    if isinstance(tree, tuple):
        items = [walk(v, leaf, other=other, path=(*path, i)) for i, v in enumerate(tree)]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, list):
        return [walk(v, leaf, other=other, path=(*path, i)) for i, v in enumerate(tree)]
    if isinstance(tree, Mapping):
        out = copy.copy(tree)
        for k, v in tree.items():
            out[k] = walk(v, leaf, other=other, path=(*path, k))
        return out
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{
            f.name: walk(getattr(tree, f.name), leaf, other=other, path=(*path, f.name))
            for f in dataclasses.fields(tree) if f.init})
    return other(tree, path)


def replicate(tree: Any, num_copies: int) -> Any:
    """Tile every tensor in ``tree`` ``num_copies`` times along dim 0, copy-major.

    Row ``k·B + b`` of the result is copy ``k`` of row ``b``::

        [x0, x1, x2] -> [x0, x1, x2, x0, x1, x2]        (B = 3, K = 2)

    Tuples, lists, dicts and dataclasses are mapped; anything that is not a tensor (and a
    0-dim tensor) is returned unchanged.
    """
    def tile(t: Tensor, path: Path) -> Tensor:
        return t if t.dim() == 0 else t.repeat(num_copies, *([1] * (t.dim() - 1)))

    return walk(tree, tile)


def tensors(tree: Any) -> list[Tensor]:
    """The tensors of ``tree`` with at least one dimension, in walking order."""
    found: list[Tensor] = []

    def note(t: Tensor, path: Path) -> Tensor:
        if t.dim() > 0:
            found.append(t)
        return t

    walk(tree, note)
    return found


def clone_dense(tree: Any) -> Any:
    """``tree`` with every strided tensor cloned (others, e.g. sparse, kept)."""
    return walk(tree, lambda t, _: t.clone() if t.layout == torch.strided else t)


def check_batch(tree: Any, batch: int, what: str) -> None:
    for t in tensors(tree):
        if t.shape[0] != batch:
            raise ValueError(
                f"{what} has a tensor of shape {tuple(t.shape)} whose first dimension is not "
                f"the batch size {batch}; every tensor in inputs and targets must be batch-first"
            )


def map_floats(tree: Any, fn: Callable[[Tensor, Path], Tensor], site: str) -> Any:
    """``tree`` with every floating-point tensor ``t`` at ``path`` replaced by ``fn(t, path)``.

    Other tensors, ``None``, numbers and strings pass unchanged. Any other object (not a
    container :func:`walk` rebuilds) is refused: it might hide a tensor that would escape the
    site.
    """
    def refuse(value: Any, path: Path) -> Any:
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return value
        raise TypeError(
            f"site {site!r} returned {path_name(path)} of type {type(value).__name__}, which "
            f"ulr cannot look into; a site's value must be a tensor or a tuple/list/dict/"
            f"dataclass of them. Choose the submodule that produces the tensor, or mark the "
            f"value inside forward with ulr.perturb(name, x)"
        )

    return walk(tree, lambda t, p: fn(t, p) if torch.is_floating_point(t) else t, other=refuse)


def path_name(path: Path) -> str:
    return "output" + "".join(f"[{k!r}]" for k in path)


def batch_dims(module: nn.Module | None) -> Callable[[Path], int]:
    """The batch dimension of each tensor of a module's nested output, by its path.

    torch's recurrent modules return ``(output, h_n)`` / ``(output, (h_n, c_n))`` with ``h_n``
    and ``c_n`` laid out ``[layers·directions, batch, hidden]`` and ``output`` batch-first only
    with ``batch_first=True``; ``nn.MultiheadAttention`` returns its output sequence-first
    unless ``batch_first=True`` and its attention weights batch-first. Everything else is
    batch-first.
    """
    if isinstance(module, nn.RNNBase):
        first = 0 if module.batch_first else 1
        return lambda path: first if path[:1] == (0,) else 1
    if isinstance(module, nn.MultiheadAttention):
        first = 0 if module.batch_first else 1
        return lambda path: first if path[:1] == (0,) else 0
    return lambda path: 0
