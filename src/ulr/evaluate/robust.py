"""``ulr robust``: accuracy of trained models under adversarial attacks and natural corruptions.

**Attacks** (white box, computed with autograd on the evaluated model in ``eval()`` mode; they
attack the model, they do not train it):

* ``fgsm-linf`` / ``fgsm-l2``: one step of size ``eps`` along the sign of the input gradient of
  the cross-entropy (L∞), or along the gradient itself normalised to L2 length ``eps``;
* ``pgd-linf`` / ``pgd-l2``: projected gradient ascent (Madry et al. 2018): a random start
  uniform in the ball (optional), ``steps`` steps of size ``step_size · eps`` (default
  ``2.5 / steps``, so the walk can cross the ball), each followed by the projection onto the
  ball and the valid input range; per example the iterate that misclassifies (else the one with
  the largest loss) is kept, so more steps never weaken the attack. ``restarts`` repeats it.

**Budgets are relative to the data's value range** ``[lo, hi]`` (``[0, 1]`` for the image
datasets of :mod:`ulr.data`, which are not normalised; the observed training range otherwise):
an L∞ budget ``eps`` allows every input feature to move by ``eps · (hi - lo)``; an L2 budget
``eps`` allows a perturbation of Euclidean length ``eps · (hi - lo) · sqrt(d)`` for ``d`` input
features, i.e. an RMS change of ``eps · (hi - lo)`` per feature. (On 28×28 images in ``[0, 1]``,
L2 ``eps = 0.1`` is a radius of 2.8.) Adversarial inputs are always clipped to ``[lo, hi]``.

**Corruptions** (severities 1-5; the random ones draw from a generator seeded by ``seed`` and
the corruption's name only, so the same seed gives the same noise at every severity, and the
distortion grows with the severity for every example):

==================  ========================================================================
``gaussian-noise``   add ``N(0, s²)``, ``s = (0.04, 0.08, 0.12, 0.18, 0.26) · (hi - lo)``; clip
``impulse-noise``    salt and pepper: a share ``p = (0.01, 0.03, 0.06, 0.10, 0.17)`` of the
                     features is set to ``lo`` or ``hi`` (half each)
``blur``             Gaussian blur over the last two (images) or last one (signals) dimensions,
                     ``σ = (0.5, 0.75, 1, 1.5, 2)`` pixels, edge values repeated
``contrast``         ``x → m + c·(x - m)`` with ``m`` the example's mean and
                     ``c = (0.8, 0.6, 0.45, 0.3, 0.2)``
==================  ========================================================================

Models whose input gradient does not exist or is zero (sign/Heaviside units, spiking LIF
neurons without a surrogate, a numpy black box) cannot be attacked by gradient:
:func:`evaluate` raises :class:`NotDifferentiableError`. The documented fallback is a
**transfer attack**: pass a differentiable surrogate (``--transfer-from RUN``, e.g. the same
architecture trained by backprop); the adversarial inputs are computed on it and the target is
evaluated on them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ulr.evaluate.robust import evaluate
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    >>> x, y = torch.rand(50, 1, 8, 8), torch.randint(0, 10, (50,))
    >>> rows = evaluate(model, x, y, attacks=["pgd-linf"], eps=[0.1], corruptions=["blur"],
    ...                 severities=[1, 5])
    >>> [r["condition"] for r in rows]
    ['clean', 'pgd-linf eps=0.1', 'blur s=1', 'blur s=5']
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTACKS",
    "CORRUPTIONS",
    "DEFAULT_EPS",
    "SEVERITIES",
    "Loaded",
    "NotDifferentiableError",
    "corrupt",
    "evaluate",
    "fgsm",
    "format_markdown",
    "format_table",
    "load",
    "main",
    "pgd",
    "plot",
    "radius",
    "value_range",
]

ATTACKS = ("fgsm-linf", "fgsm-l2", "pgd-linf", "pgd-l2")
CORRUPTIONS = ("gaussian-noise", "impulse-noise", "blur", "contrast")
#: Default budgets, as fractions of the value range (see the module docstring).
DEFAULT_EPS = (0.02, 0.05, 0.1, 0.2)
#: The parameter of each corruption at severities 1..5.
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian-noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "impulse-noise": (0.01, 0.03, 0.06, 0.10, 0.17),
    "blur": (0.5, 0.75, 1.0, 1.5, 2.0),
    "contrast": (0.8, 0.6, 0.45, 0.3, 0.2),
}
#: Datasets of :mod:`ulr.data` whose inputs lie in [0, 1] by construction.
_UNIT_RANGE = ("digits", "sequential-digits", "mnist-subset", "fashion-mnist")
_SUSPECTS = ("NumpyBlackBox", "Sign", "SignActivation", "Heaviside", "LIF", "BinaryLinear")


class NotDifferentiableError(ValueError):
    """A gradient attack was asked of a model without a usable input gradient."""


def _choose(names: Sequence[str], valid: Sequence[str], what: str, flag: str) -> list[str]:
    out = []
    for raw in names:
        name = str(raw).strip().lower().replace("_", "-")
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {what} {raw!r}{hint}; valid {what}s: "
                             f"{', '.join(valid)} (or '{flag} none')")
        if name not in out:
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# Budgets and attacks


def _features(x: Tensor) -> int:
    return math.prod(x.shape[1:])


def radius(eps: float, norm: str, value_range: tuple[float, float], num_features: int) -> float:
    """The absolute radius of a relative budget ``eps`` (see the module docstring).

    Example:
        >>> radius(0.1, "linf", (0.0, 1.0), 784), round(radius(0.1, "l2", (0.0, 1.0), 784), 6)
        (0.1, 2.8)
    """
    span = value_range[1] - value_range[0]
    if norm == "linf":
        return eps * span
    if norm == "l2":
        return eps * span * math.sqrt(num_features)
    raise ValueError(f"unknown norm {norm!r}; valid: linf, l2")


def _check_budget(eps: float, value_range: tuple[float, float]) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (a fraction of the value range), "
                         f"got {eps!r}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example cross-entropy (in float64, so confident examples keep a gradient), its
    gradient with respect to ``x``, and the predictions."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = model(x)
        if not out.requires_grad:
            raise NotDifferentiableError(
                "the model's output does not depend on its input through autograd (a part "
                "such as a numpy black box cuts the graph)")
        loss = F.cross_entropy(out.double(), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    if grad is None:
        raise NotDifferentiableError(
            "the model's output does not depend on its input through autograd (a part such "
            "as a numpy black box cuts the graph)")
    return loss.detach(), grad.detach(), out.detach().argmax(1)


def _per_example_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _step(grad: Tensor, size: float, norm: str) -> Tensor:
    if norm == "linf":
        return size * grad.sign()
    n = _per_example_norm(grad)
    return torch.where(n > 0, size * grad / n.clamp_min(1e-30), torch.zeros_like(grad))


def _project(delta: Tensor, r: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-r, r)
    n = _per_example_norm(delta)
    return delta * torch.where(n > r, r / n.clamp_min(1e-30), torch.ones_like(n))


def _clip(x: Tensor, value_range: tuple[float, float]) -> Tensor:
    return x.clamp(value_range[0], value_range[1])


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: str = "linf",
         value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Fast gradient (sign) method: one step of budget ``eps`` up the loss.

    Args:
        model: the attacked classifier (call ``model.eval()`` first); never modified.
        x: inputs ``[B, ...]`` inside ``value_range``; y: labels ``[B]``.
        eps: budget as a fraction of the value range (see the module docstring).
        norm: ``"linf"`` (the sign of the gradient) or ``"l2"`` (the normalised gradient).
        value_range: ``(lo, hi)`` of valid inputs; the result is clipped to it.

    Returns:
        The adversarial inputs, ``|x_adv - x| <= radius(eps, ...)`` in the chosen norm.
    """
    _check_budget(eps, value_range)
    r = radius(eps, norm, value_range, _features(x))
    _, grad, _ = _loss_grad(model, x, y)
    return _clip(x + _step(grad, r, norm), value_range).detach()


def _random_start(x: Tensor, r: float, norm: str, generator: torch.Generator) -> Tensor:
    shape = x.shape
    if norm == "linf":
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        return ((2 * u - 1) * r).to(x.device, x.dtype)
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    d = _features(x)
    u = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=generator,
                   dtype=torch.float64)
    g = g / _per_example_norm(g).clamp_min(1e-30) * r * u ** (1.0 / d)
    return g.to(x.device, x.dtype)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: str = "linf",
        steps: int = 10, step_size: float | None = None, random_start: bool = True,
        restarts: int = 1, value_range: tuple[float, float] = (0.0, 1.0),
        generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient descent on the loss (ascent), in the L∞ or L2 ball of budget ``eps``.

    Args:
        model, x, y, eps, norm, value_range: as :func:`fgsm`.
        steps: gradient steps per restart (>= 1).
        step_size: step length as a multiple of the radius (default ``2.5 / steps``).
        random_start: start from a uniform point of the ball instead of ``x``.
        restarts: independent runs; per example the strongest result is kept.
        generator: CPU generator of the random starts (default: a fresh one seeded 0).

    Returns:
        The adversarial inputs: per example the iterate that misclassifies, else the one of
        largest loss, over all steps and restarts (all inside the ball and the range).
    """
    _check_budget(eps, value_range)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be > 0 (a multiple of the radius), got {step_size!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    r = radius(eps, norm, value_range, _features(x))
    alpha = r * (step_size if step_size is not None else 2.5 / steps)
    x = x.detach()
    best = x.clone()
    best_score = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    view = (-1,) + (1,) * (x.dim() - 1)

    def keep(candidate: Tensor, loss: Tensor, pred: Tensor) -> None:
        # Misclassified iterates beat every correctly classified one; then the larger loss.
        score = loss + (pred != y).double() * 1e6
        better = score > best_score
        best_score.copy_(torch.where(better, score, best_score))
        best.copy_(torch.where(better.view(view), candidate, best))

    for _ in range(restarts):
        delta = _random_start(x, r, norm, generator) if random_start and r > 0 else 0 * x
        adv = _clip(x + delta, value_range)
        for _ in range(steps):
            loss, grad, pred = _loss_grad(model, adv, y)
            keep(adv, loss, pred)
            delta = _project(adv + _step(grad, alpha, norm) - x, r, norm)
            adv = _clip(x + delta, value_range)
        with torch.no_grad():
            out = model(adv)
        keep(adv, F.cross_entropy(out.double(), y, reduction="none"), out.argmax(1))
    return best


# ---------------------------------------------------------------------------------------------
# Corruptions


def _corruption_generator(name: str, seed: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, CORRUPTIONS.index(name) + 1]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _gaussian_kernel(sigma: float) -> Tensor:
    half = max(1, math.ceil(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur_last(x: Tensor, kernel: Tensor) -> Tensor:
    """Convolve along the last dimension with replicate padding."""
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    half = (kernel.numel() - 1) // 2
    flat = F.pad(flat, (half, half), mode="replicate")
    out = F.conv1d(flat, kernel.to(x.dtype).view(1, 1, -1).to(x.device))
    return out.reshape(shape)


def corrupt(x: Tensor, name: str, severity: int, *, seed: int = 0,
            value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """A corrupted copy of ``x`` (``[B, ...]``); ``x`` itself is not changed.

    Args:
        x: inputs within ``value_range``: images ``[B, C, H, W]`` (or ``[B, C, L]`` signals for
            ``blur``).
        name: one of :data:`CORRUPTIONS`.
        severity: 1 (mild) to 5 (strong); the parameters are :data:`SEVERITIES`.
        seed: seed of the random corruptions; the draws depend on ``seed`` and ``name`` only
            (not on ``severity``, and they are made on the CPU), so the result is deterministic
            and the distortion of every example grows with the severity.
        value_range: ``(lo, hi)`` of valid inputs; results are clipped to it.

    Example:
        >>> import torch
        >>> x = torch.full((2, 1, 8, 8), 0.5)
        >>> torch.equal(corrupt(x, "gaussian-noise", 3, seed=1),
        ...             corrupt(x, "gaussian-noise", 3, seed=1))
        True
    """
    (name,) = _choose([name], CORRUPTIONS, "corruption", "--corruptions")
    if isinstance(severity, bool) or severity not in range(1, 6):
        raise ValueError(f"severity must be an int from 1 to 5, got {severity!r}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    level = SEVERITIES[name][severity - 1]
    span = hi - lo
    if name == "gaussian-noise":
        z = torch.randn(x.shape, generator=_corruption_generator(name, seed))
        return _clip(x + (level * span) * z.to(x.device, x.dtype), value_range)
    if name == "impulse-noise":
        gen = _corruption_generator(name, seed)
        u = torch.rand(x.shape, generator=gen).to(x.device)
        salt = torch.rand(x.shape, generator=gen).to(x.device) < 0.5
        hit = u < level
        out = x.clone()
        out[hit & salt] = hi
        out[hit & ~salt] = lo
        return out
    if name == "blur":
        if x.dim() not in (3, 4):
            raise ValueError(f"blur needs images [B, C, H, W] or signals [B, C, L], got inputs "
                             f"of shape {tuple(x.shape)}")
        kernel = _gaussian_kernel(level)
        out = _blur_last(x, kernel)
        if x.dim() == 4:
            out = _blur_last(out.transpose(-1, -2), kernel).transpose(-1, -2)
        return _clip(out.contiguous(), value_range)
    mean = x.flatten(1).mean(1).view(-1, *([1] * (x.dim() - 1)))
    return _clip(mean + level * (x - mean), value_range)


# ---------------------------------------------------------------------------------------------
# Evaluation


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> int:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


def _check_differentiable(model: nn.Module, x: Tensor, y: Tensor, what: str) -> None:
    suspects = sorted({type(m).__name__ for m in model.modules()
                       if type(m).__name__ in _SUSPECTS})
    hint = (f" It contains {', '.join(suspects)} (non-differentiable units)." if suspects
            else "")
    fix = (" Evaluate corruptions only (--attacks none), or use a transfer attack from a "
           "differentiable surrogate, e.g. the same architecture trained by backprop "
           "(--transfer-from RUN, or surrogate= in Python).")
    try:
        _, grad, _ = _loss_grad(model, x, y)
    except NotDifferentiableError as e:
        raise NotDifferentiableError(
            f"{what} cannot be attacked by gradient: {e}.{hint}{fix}") from None
    if not bool(grad.ne(0).any()) or not bool(torch.isfinite(grad).all()):
        raise NotDifferentiableError(
            f"{what} cannot be attacked by gradient: the gradient of its loss with respect to "
            f"the input is {'zero' if torch.isfinite(grad).all() else 'not finite'} on every "
            f"example checked.{hint}{fix}")


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
    attacks = _choose(attacks, ATTACKS, "attack", "--attacks")
    corruptions = _choose(corruptions, CORRUPTIONS, "corruption", "--corruptions")
    for e in eps:
        _check_budget(e, value_range)
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
    source = surrogate if surrogate is not None else model
    modes = {m: m.training for m in {id(model): model, id(source): source}.values()}
    for m in modes:
        m.eval()
    try:
        if attacks:
            _check_differentiable(source, x[:batch_size], y[:batch_size],
                                  "the surrogate" if surrogate is not None else "this model")
        n = len(x)
        rows = [_row("clean", "clean", 0, sum(_accuracy(model, x[i:i + batch_size],
                                                           y[i:i + batch_size])
                                                 for i in range(0, n, batch_size)), n)]
        d = _features(x)
        for name in attacks:
            kind, norm = name.split("-")
            for e in eps:
                gen = torch.Generator().manual_seed(seed)
                correct, largest = 0, 0.0
                for i in range(0, n, batch_size):
                    xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                    if kind == "fgsm":
                        adv = fgsm(source, xb, yb, e, norm=norm, value_range=value_range)
                    else:
                        adv = pgd(source, xb, yb, e, norm=norm, steps=steps,
                                  step_size=step_size, random_start=random_start,
                                  restarts=restarts, value_range=value_range, generator=gen)
                    correct += _accuracy(model, adv, yb)
                    delta = (adv - xb).flatten(1)
                    size = (delta.abs().amax(1) if norm == "linf"
                            else delta.norm(dim=1) / math.sqrt(d))
                    largest = max(largest, float(size.max()) / (hi - lo))
                row = _row(f"{name} eps={e:g}", "attack", e, correct, n, name=name)
                row.update(max_perturbation=largest, transfer=surrogate is not None)
                rows.append(row)
        for name in corruptions:
            for s in severities:
                xc = corrupt(x, name, s, seed=seed, value_range=value_range)
                correct = sum(_accuracy(model, xc[i:i + batch_size], y[i:i + batch_size])
                              for i in range(0, n, batch_size))
                rows.append(_row(f"{name} s={s}", "corruption", s, correct, n, name=name))
        return rows
    finally:
        for m, training in modes.items():
            m.train(training)


def _row(condition: str, kind: str, level: float, correct: int, n: int,
         name: str = "clean") -> dict[str, Any]:
    return {"condition": condition, "kind": kind, "name": name, "level": level,
            "accuracy": correct / n, "correct": correct, "n": n}


# ---------------------------------------------------------------------------------------------
# Run directories


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


#: which weights of a run directory: the last epoch's, or the best validation epoch's
WEIGHTS = {"last": "checkpoint.pt", "best": "best.pt"}


def _checkpoint_path(path: Path, weights: str = "last") -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory written by "
                                f"ulr train (or its checkpoint.pt)")
    if path.is_dir():
        ckpt = path / WEIGHTS[weights]
        if weights == "best" and not ckpt.is_file() and (path / "checkpoint.pt").is_file():
            raise FileNotFoundError(
                f"{path} has no best.pt: runs written before ulr kept the best-validation "
                f"weights, or stopped before their first epoch ended; use --weights last")
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{path} is not a run directory of ulr train: it has no checkpoint.pt (runs "
                f"write one after every epoch; a directory of runs from ulr compare is "
                f"expanded only when its runs have one)")
        return ckpt
    return path


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Checkpoint files for ``paths``: run directories, ``checkpoint.pt`` files, or directories
    of runs (``ulr train`` with several methods, ``ulr compare``), which stand for their runs.

    Raises:
        FileNotFoundError: a path that does not exist or holds no checkpoint.
    """
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not (p / "checkpoint.pt").is_file():
            group = p / "group.json"
            if group.is_file():
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    subs = [p / r["dir"] for r in json.loads(group.read_text())["runs"]]
                    found.extend(s / "checkpoint.pt" for s in subs
                                 if (s / "checkpoint.pt").is_file())
                    continue
            subs = sorted(d for d in p.iterdir() if (d / "checkpoint.pt").is_file())
            if subs:
                found.extend(s / "checkpoint.pt" for s in subs)
                continue
        found.append(_checkpoint_path(p))
    return found


_DATA_CACHE: dict[tuple, Any] = {}


def _dataset(name: str, root: str | None, seed: int, val_fraction: float) -> Any:
    from .. import data

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
    from ..config import RunConfig
    from ..train import _build_model

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    ckpt_path = _checkpoint_path(Path(path), weights)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        config = RunConfig.from_dict(ckpt["config"], source=f"{ckpt_path} config")
        weights = ckpt["model"]
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"{ckpt_path} is not a readable ulr train checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         ) from None
    ds = _dataset(config.data, config.data_dir, config.seed if split == "val" else 0,
                  config.val_fraction if split == "val" else 0.1)
    from ..data import Dataset

    if not isinstance(ds, Dataset) or ds.task != "classification":
        raise ValueError(f"{ckpt_path}: dataset {config.data!r} is not a classification task "
                         f"of in-memory (x, y) examples; ulr robust measures accuracy")
    model = _build_model(config, ds)
    model.load_state_dict(weights)
    model.eval()
    x, y = ds.test if split == "test" else ds.val
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if len(x) == 0:
        raise ValueError(f"{ckpt_path}: the {split} split of {config.data!r} is empty")
    run_dir = ckpt_path.parent
    summary = None
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((run_dir / "summary.json").read_text())
    return Loaded(label or run_dir.name, run_dir, model, config.to_dict(), x, y,
                  value_range(ds), summary)


# ---------------------------------------------------------------------------------------------
# Reports


def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float]) -> str:
    mean, std = _stats(values)
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _conditions(results: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["condition"] for res in results for r in res["rows"]))


def _grid(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["condition", *(res["label"] for res in results)]
    body = []
    for cond in _conditions(results):
        line = [cond]
        for res in results:
            vals = [r["accuracy"] for r in res["rows"] if r["condition"] == cond]
            line.append(_cell(vals) if vals else "-")
        body.append(line)
    return head, body


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: one row per condition, one column per result (accuracy in %).

    ``results`` are dicts ``{"label": str, "rows": [rows of evaluate()]}``; a label with rows
    from several runs (seeds) shows mean ± sample standard deviation.
    """
    head, body = _grid(results)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def format_markdown(results: Sequence[dict[str, Any]]) -> str:
    """The table of :func:`format_table` in markdown."""
    head, body = _grid(results)
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """PNG of accuracy against eps (one panel per attack) and severity (one per corruption),
    one line per result (mean ± std over its runs); the clean accuracy is drawn at 0."""
    from .plots import _figure

    panels = list(dict.fromkeys(r["name"] for res in results for r in res["rows"]
                                if r["kind"] != "clean"))
    if not panels:
        panels = ["clean"]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(ncols=ncols, nrows=nrows, width=4.0, height=3.3)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, panel in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        for j, res in enumerate(results):
            pts: dict[float, list[float]] = {}
            for r in res["rows"]:
                if r["name"] == panel or r["kind"] == "clean":
                    pts.setdefault(float(r["level"]), []).append(100 * r["accuracy"])
            xs = sorted(pts)
            means = [statistics.fmean(pts[v]) for v in xs]
            stds = [statistics.stdev(pts[v]) if len(pts[v]) > 1 else 0.0 for v in xs]
            ax.errorbar(xs, means, yerr=stds if any(stds) else None, marker="o", ms=3,
                        capsize=2, color=f"C{j % 10}", label=res["label"])
        attack = panel in ATTACKS
        ax.set(title=panel, xlabel="eps (fraction of value range)" if attack else "severity",
               ylabel="accuracy (%)" if k % ncols == 0 else None, ylim=(-2, 102))
        ax.grid(alpha=0.3)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# Command line

_DESCRIPTION = """\
Evaluate trained models (run directories of ulr train, their checkpoint.pt, or directories of
runs) under adversarial attacks and natural corruptions, and write a table (printed, robust.md,
robust.json) and a plot (robust.png) of accuracy against eps and severity, one column/line per run.

Attacks: fgsm-linf, fgsm-l2, pgd-linf, pgd-l2 (white box, on the model in eval mode). eps is a
fraction of the data's value range ([0, 1] for the image datasets): L-inf eps moves every input
feature by at most eps*(hi-lo); L2 eps allows a perturbation of length eps*(hi-lo)*sqrt(d), an RMS
of eps*(hi-lo) per feature. Corruptions: gaussian-noise, impulse-noise, blur, contrast at
severities 1-5 (docs/robustness.md lists their parameters), deterministic given --seed.

Models without an input gradient (sign units, spiking nets, numpy black boxes) cannot be attacked
by gradient: use --attacks none, or --transfer-from RUN to craft the attacks on a differentiable
surrogate (e.g. the same architecture trained by backprop) and evaluate the target on them.
"""

_EPILOG = """\
examples:
  ulr robust runs/demo                       # every run of a ulr train comparison directory
  ulr robust runs/a/ulr runs/a/bp --attacks pgd-linf --eps 0.05 0.1 --steps 20 --limit 1000
  ulr robust runs/snn --attacks pgd-linf --transfer-from runs/mlp-bp
  ulr robust runs/a/ulr --attacks none --corruptions blur contrast --out robust-a
"""


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``ulr robust``."""
    p = argparse.ArgumentParser(
        prog="ulr robust", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=30, width=100))
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories, checkpoint.pt files, or directories of runs")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), metavar="NAME",
                   help=f"attacks: {', '.join(ATTACKS)}, or none (default: all)")
    p.add_argument("--eps", nargs="+", type=float, default=list(DEFAULT_EPS), metavar="EPS",
                   help="budgets as fractions of the value range (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default: 10)")
    p.add_argument("--step-size", type=float, default=None, metavar="FACTOR",
                   help="PGD step as a multiple of the radius (default: 2.5/steps)")
    p.add_argument("--restarts", type=int, default=1, help="PGD restarts (default: 1)")
    p.add_argument("--no-random-start", dest="random_start", action="store_false",
                   help="start PGD at the clean input instead of a random point of the ball")
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), metavar="NAME",
                   help=f"corruptions: {', '.join(CORRUPTIONS)}, or none (default: all)")
    p.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5],
                   metavar="S", help="corruption severities 1-5 (default: all)")
    p.add_argument("--weights", choices=list(WEIGHTS), default="last",
                   help="of each run directory: the last epoch's weights (checkpoint.pt) or "
                        "those of the best validation accuracy (best.pt)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="evaluation split (default: test, the same examples for every seed)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N examples of the split (default: all)")
    p.add_argument("--range", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="valid input range (default: [0, 1] for the image datasets, else the "
                        "observed training range)")
    p.add_argument("--transfer-from", metavar="RUN", default=None,
                   help="craft the attacks on this run's model (a transfer attack) instead of "
                        "on each evaluated model; it must take the same inputs")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the PGD random starts and the corruptions (default: 0)")
    p.add_argument("--batch-size", type=int, default=500, help="examples per batch")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; 0 keeps torch's default)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where robust.{json,md,png} go (default: the first run directory; "
                        "earlier robust.* files there are replaced)")
    p.add_argument("--no-plots", "--no-plot", dest="plot", action="store_false",
                   help="skip robust.png")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    return p


def _names(values: list[str]) -> list[str]:
    return [] if [v.lower() for v in values] == ["none"] else values


def _labels(paths: list[Path]) -> list[str]:
    names = [p.parent.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.parent.name}/{p.parent.name}" for p in paths]
    return names


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the runs of parsed ``args`` and write the reports; returns the JSON record."""
    attacks = _choose(_names(args.attacks), ATTACKS, "attack", "--attacks")
    corruptions = _choose(_names(args.corruptions), CORRUPTIONS, "corruption",
                          "--corruptions")
    if not attacks and not corruptions:
        raise ValueError("nothing to evaluate: --attacks none and --corruptions none")
    paths = expand(args.runs)
    surrogate = None
    if args.transfer_from:
        surrogate = load(args.transfer_from, split=args.split, limit=args.limit)
    results = []
    t0 = time.perf_counter()
    for path, label in zip(paths, _labels(paths)):
        loaded = load(path.parent if path.name == "checkpoint.pt" else path, split=args.split,
                      limit=args.limit, label=label, weights=args.weights)
        if surrogate is not None and (surrogate.x.shape != loaded.x.shape
                                      or not torch.equal(surrogate.x, loaded.x)):
            raise ValueError(f"--transfer-from {args.transfer_from} was trained on other "
                             f"inputs ({surrogate.config['data']}) than {label} "
                             f"({loaded.config['data']}); a surrogate must see the same data")
        vr = tuple(args.range) if args.range else loaded.value_range
        if not args.quiet:
            print(f"[{label}] {loaded.config['model']} on {loaded.config['data']} "
                  f"({loaded.config['method']}), {len(loaded.x)} {args.split} examples, "
                  f"range [{vr[0]:g}, {vr[1]:g}]", file=sys.stderr, flush=True)
        rows = evaluate(loaded.model, loaded.x, loaded.y, attacks=attacks, eps=args.eps,
                        corruptions=corruptions, severities=args.severities, steps=args.steps,
                        step_size=args.step_size, random_start=args.random_start,
                        restarts=args.restarts, value_range=vr, seed=args.seed,
                        batch_size=args.batch_size,
                        surrogate=surrogate.model if surrogate is not None else None)
        results.append({"label": label, "run_dir": str(loaded.path),
                        "method": loaded.config["method"], "model": loaded.config["model"],
                        "data": loaded.config["data"], "seed": loaded.config["seed"],
                        "value_range": list(vr), "rows": rows})
    from .. import __version__
    from ..train import environment

    record = {
        "command": "ulr robust " + " ".join(args.argv),
        "settings": {"attacks": attacks, "eps": args.eps, "steps": args.steps,
                     "step_size": args.step_size if args.step_size is not None
                     else 2.5 / args.steps, "restarts": args.restarts,
                     "random_start": args.random_start, "corruptions": corruptions,
                     "severities": args.severities, "split": args.split, "limit": args.limit,
                     "seed": args.seed, "transfer_from": args.transfer_from,
                     "eps_units": "fraction of the value range (L2: times sqrt(d))"},
        "ulr": __version__,
        "environment": environment("cpu"),
        "eval_time_s": time.perf_counter() - t0,
        "results": results,
    }
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robust.json").write_text(json.dumps(record, indent=2))
    note = (f"Accuracy (%) on {args.split} examples{f' (first {args.limit})' if args.limit else ''}"
            f". eps: fraction of the value range (L2: RMS per feature). Command: "
            f"`{record['command']}`")
    (out / "robust.md").write_text(f"# Robustness\n\n{note}\n\n{format_markdown(results)}\n")
    written = [out / "robust.json", out / "robust.md"]
    if args.plot:
        written.append(plot(results, out / "robust.png"))
    print(format_table(results))
    if not args.quiet:
        print(f"\nwrote {', '.join(str(w) for w in written)}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``ulr robust`` entry point; returns the exit code (2 with a one-line message on bad
    input; ``ULR_TRACEBACK=1`` shows the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    previous = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        run(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        if os.environ.get("ULR_TRACEBACK"):
            raise
        print(f"ulr robust: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
