"""White-box gradient attacks (FGSM, PGD in the L∞ and L2 balls) and the check that a model
has an input gradient to attack; budgets are fractions of the value range (see
:mod:`ulr.evaluate.robust`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conditions import check_range, clip

_NO_GRAPH = ("the model's output does not depend on its input through autograd (a part such as "
             "a numpy black box cuts the graph)")
_SUSPECTS = ("NumpyBlackBox", "Sign", "SignActivation", "Heaviside", "LIF", "BinaryLinear")


class NotDifferentiableError(ValueError):
    """A gradient attack was asked of a model without a usable input gradient."""



def count_features(x: Tensor) -> int:
    """The number of input features of one example of the batch `x`."""
    return math.prod(x.shape[1:])


def radius(eps: float, norm: str, value_range: tuple[float, float], num_features: int) -> float:
    """The absolute radius of a relative budget ``eps`` (see :mod:`ulr.evaluate.robust`).

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


def check_budget(eps: float, value_range: tuple[float, float]) -> None:
    """Raise ``ValueError`` unless ``eps`` is a finite budget >= 0 and the range is valid."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (a fraction of the value range), "
                         f"got {eps!r}")
    check_range(value_range)


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example cross-entropy (in float64, so confident examples keep a gradient), its
    gradient with respect to ``x``, and the predictions."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = model(x)
        if not out.requires_grad:
            raise NotDifferentiableError(_NO_GRAPH)
        loss = F.cross_entropy(out.double(), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    if grad is None:
        raise NotDifferentiableError(_NO_GRAPH)
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

def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: str = "linf",
         value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Fast gradient (sign) method: one step of budget ``eps`` up the loss.

    Args:
        model: the attacked classifier (call ``model.eval()`` first); never modified.
        x: inputs ``[B, ...]`` inside ``value_range``; y: labels ``[B]``.
        eps: budget as a fraction of the value range (see :mod:`ulr.evaluate.robust`).
        norm: ``"linf"`` (the sign of the gradient) or ``"l2"`` (the normalised gradient).
        value_range: ``(lo, hi)`` of valid inputs; the result is clipped to it.

    Returns:
        The adversarial inputs, ``|x_adv - x| <= radius(eps, ...)`` in the chosen norm.
    """
    check_budget(eps, value_range)
    r = radius(eps, norm, value_range, count_features(x))
    _, grad, _ = _loss_grad(model, x, y)
    return clip(x + _step(grad, r, norm), value_range).detach()


def _random_start(x: Tensor, r: float, norm: str, generator: torch.Generator) -> Tensor:
    shape = x.shape
    if norm == "linf":
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        return ((2 * u - 1) * r).to(x.device, x.dtype)
    g = torch.randn(shape, generator=generator, dtype=torch.float64)
    d = count_features(x)
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
    check_budget(eps, value_range)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be > 0 (a multiple of the radius), got {step_size!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    r = radius(eps, norm, value_range, count_features(x))
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
        adv = clip(x + delta, value_range)
        for _ in range(steps):
            loss, grad, pred = _loss_grad(model, adv, y)
            keep(adv, loss, pred)
            delta = _project(adv + _step(grad, alpha, norm) - x, r, norm)
            adv = clip(x + delta, value_range)
        with torch.no_grad():
            out = model(adv)
        keep(adv, F.cross_entropy(out.double(), y, reduction="none"), out.argmax(1))
    return best


def check_differentiable(model: nn.Module, x: Tensor, y: Tensor, what: str) -> None:
    """Raise :class:`NotDifferentiableError` (with the fix) unless ``model`` has a usable
    input gradient on ``(x, y)``; ``what`` names the model in the message."""
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

