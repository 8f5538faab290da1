"""The shared run machinery of ``ulr bench``: the loss, the batch size, the datasets, the same
initial weights for every method, seeded generators, per-layer gradients, test accuracy, and
the statistics and progress lines every part uses."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...sites import named_param_owners

BATCH = 32


def ce(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy, the loss of every benchmark."""
    return F.cross_entropy(outputs, targets, reduction="none")


_DATA: dict[tuple[str, int], Any] = {}


def load_dataset(name: str, seed: int) -> Any:
    """:func:`ulr.data.load` of ``name`` with ``seed``, cached across the parts."""
    from ... import data

    key = (name, seed)
    if key not in _DATA:
        if len(_DATA) > 6:  # Fashion-MNIST is 200 MB per seed: keep a few
            _DATA.clear()
        _DATA[key] = data.load(name, seed=seed)
    return _DATA[key]


def initial_model(name: str, ds: Any, seed: int) -> nn.Module:
    """Model ``name`` for dataset ``ds`` with the initial weights of ``seed``."""
    from ... import models

    # The same initial weights for every method of one seed; the caller's global RNG is kept.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        return models.build(name, in_shape=ds.input_shape, num_classes=ds.num_classes)


def generator_for(*key: int) -> torch.Generator:
    """A CPU generator seeded by the integers ``key`` (one stream per purpose and seed)."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**62)
    return torch.Generator().manual_seed(seed)


def parameter_owners(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The modules that own parameters (ULR's noise sites, the layers of the cosine tables),
    by name, with their own parameters."""
    return [(name, list(m.parameters(recurse=False)))
            for name, m in named_param_owners(model, trainable=False)]


def layer_grads(model: nn.Module) -> dict[str, Tensor]:
    """Each parameter owner's ``.grad``, flattened into one vector (weight and bias)."""
    return {name: torch.cat([p.grad.flatten() for p in ps])
            for name, ps in parameter_owners(model)}


def cosine(a: Tensor, b: Tensor) -> float:
    """The cosine of two vectors (0 when one is zero)."""
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite ``values`` (nan, nan if none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values: Sequence[float], fmt: str = ".3f", scale: float = 1.0) -> str:
    """``mean ± std`` of ``values`` for the report (``n/a`` if none is finite)."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m * scale:{fmt}} ± {s * scale:{fmt}}"


def accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 1000) -> float:
    """The share of ``(x, y)`` that ``model`` classifies correctly."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            correct += int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum())
    return correct / max(1, len(x))


def progress(msg: str, verbose: bool) -> None:
    """A progress line on stderr when ``verbose``."""
    if verbose:
        print(msg, file=sys.stderr, flush=True)

