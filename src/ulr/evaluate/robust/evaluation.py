"""The evaluation loop of ``ulr robust``: a model's accuracy clean, under every attack and
budget, and under every corruption and severity, as one row per condition."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .attacks import check_budget, check_differentiable, count_features, fgsm, pgd
from .conditions import ATTACKS, CORRUPTIONS, DEFAULT_EPS, choose
from .corruptions import corrupt


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> int:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())



def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attacks: Sequence[str] = ATTACKS,
    eps: Sequence[float] = DEFAULT_EPS,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    value_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    batch_size: int = 500,
    surrogate: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Accuracy of ``model`` on ``(x, y)``: clean, under each attack and budget, and under each
    corruption and severity.

    The model is put in ``eval()`` mode and restored afterwards; its parameters and their
    ``.grad`` are not touched (input gradients use ``torch.autograd.grad``).

    Args:
        model: a classifier mapping ``x`` to logits ``[B, classes]``.
        x, y: evaluation inputs (within ``value_range``) and integer labels.
        attacks: names from :data:`ATTACKS` (may be empty).
        eps: budgets, fractions of the value range (see the module docstring).
        corruptions: names from :data:`CORRUPTIONS` (may be empty).
        severities: integers 1..5.
        steps, step_size, random_start, restarts: PGD settings (see :func:`pgd`).
        value_range: valid input range ``(lo, hi)``.
        seed: seeds the PGD random starts and the corruptions.
        batch_size: examples per batch (memory only; the random draws depend on it for PGD).
        surrogate: when given, the attacks are computed on this model and ``model`` is evaluated
            on the result (a transfer attack; for models without an input gradient).

    Returns:
        One dict per condition: ``condition`` (e.g. ``"pgd-linf eps=0.1"``), ``kind``
        (``clean``/``attack``/``corruption``), ``name``, ``level`` (eps or severity; 0 for
        clean), ``accuracy``, ``correct``, ``n``, and for attacks ``max_perturbation`` (the
        largest perturbation found, in the same relative units as ``eps``) and ``transfer``.

    Raises:
        NotDifferentiableError: an attack on a model (or surrogate) without input gradient.
        ValueError: unknown names, bad budgets or severities, empty or mismatched data.
    """
    attacks = choose(attacks, ATTACKS, "attack", "--attacks")
    corruptions = choose(corruptions, CORRUPTIONS, "corruption", "--corruptions")
    _check_inputs(x, y, eps, severities, value_range, batch_size)
    source = surrogate if surrogate is not None else model
    modes = {m: m.training for m in {id(model): model, id(source): source}.values()}
    for m in modes:
        m.eval()
    try:
        if attacks:
            check_differentiable(source, x[:batch_size], y[:batch_size],
                                 "the surrogate" if surrogate is not None else "this model")
        rows = [_row("clean", "clean", 0, _correct(model, x, y, batch_size), len(x))]
        for name in attacks:
            for e in eps:
                adversarial = functools.partial(
                    _adversarial, source, name, e, steps=steps, step_size=step_size,
                    random_start=random_start, restarts=restarts, value_range=value_range,
                    generator=torch.Generator().manual_seed(seed))
                rows.append(_attack_row(model, x, y, name, e, adversarial, value_range,
                                        batch_size, transfer=surrogate is not None))
        for name in corruptions:
            for s in severities:
                xc = corrupt(x, name, s, seed=seed, value_range=value_range)
                rows.append(_row(f"{name} s={s}", "corruption", s,
                                 _correct(model, xc, y, batch_size), len(x), name=name))
        return rows
    finally:
        for m, training in modes.items():
            m.train(training)


def _check_inputs(x: Tensor, y: Tensor, eps: Sequence[float], severities: Sequence[int],
                  value_range: tuple[float, float], batch_size: int) -> None:
    for e in eps:
        check_budget(e, value_range)
    for s in severities:
        if isinstance(s, bool) or s not in range(1, 6):
            raise ValueError(f"severities must be ints from 1 to 5, got {s!r}")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need a non-empty batch with one label per example, got {len(x)} "
                         f"inputs and {len(y)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lo, hi = value_range
    if float(x.min()) < lo - 1e-6 or float(x.max()) > hi + 1e-6:
        raise ValueError(f"inputs lie in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside "
                         f"value_range {value_range}; pass the data's range")


def _correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> int:
    """The number of examples ``model`` classifies correctly, in batches."""
    return sum(_accuracy(model, x[i:i + batch_size], y[i:i + batch_size])
               for i in range(0, len(x), batch_size))


def _adversarial(source: nn.Module, name: str, eps: float, xb: Tensor, yb: Tensor, *,
                 steps: int, step_size: float | None, random_start: bool, restarts: int,
                 value_range: tuple[float, float], generator: torch.Generator) -> Tensor:
    """The attack ``name`` (e.g. ``pgd-linf``) of budget ``eps`` on one batch, crafted on
    ``source``; PGD's random starts continue ``generator`` from batch to batch."""
    kind, norm = name.split("-")
    if kind == "fgsm":
        return fgsm(source, xb, yb, eps, norm=norm, value_range=value_range)
    return pgd(source, xb, yb, eps, norm=norm, steps=steps, step_size=step_size,
               random_start=random_start, restarts=restarts, value_range=value_range,
               generator=generator)


def _attack_row(model: nn.Module, x: Tensor, y: Tensor, name: str, eps: float,
                adversarial: Callable[[Tensor, Tensor], Tensor],
                value_range: tuple[float, float], batch_size: int,
                transfer: bool) -> dict[str, Any]:
    """The row of one attack and budget: accuracy on the adversarial inputs, and the largest
    perturbation found (relative to the value range, as ``eps``)."""
    norm = name.split("-")[1]
    lo, hi = value_range
    d = count_features(x)
    correct, largest = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        adv = adversarial(xb, yb)
        correct += _accuracy(model, adv, yb)
        delta = (adv - xb).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1) / math.sqrt(d)
        largest = max(largest, float(size.max()) / (hi - lo))
    row = _row(f"{name} eps={eps:g}", "attack", eps, correct, len(x), name=name)
    row.update(max_perturbation=largest, transfer=transfer)
    return row


def _row(condition: str, kind: str, level: float, correct: int, n: int,
         name: str = "clean") -> dict[str, Any]:
    return {"condition": condition, "kind": kind, "name": name, "level": level,
            "accuracy": correct / n, "correct": correct, "n": n}

