"""The contract every gradient estimator keeps, and the helpers that implement it once.

An estimator (:class:`ulr.LikelihoodRatio` and every estimator in :mod:`ulr.peers`) promises:

* **Gradients leave only through ``p.grad``, accumulating.** ``loss_and_grads(loss_fn, inputs,
  targets)`` adds its estimate to ``p.grad`` of each covered trainable parameter (creating it
  when ``None``), exactly as ``Tensor.backward`` would, and returns the mean loss as a detached
  scalar. It never steps the parameters, so any ``torch.optim`` optimizer, gradient clipping or
  accumulation works unchanged (:func:`accumulate`).
* **Per-row losses.** ``loss_fn(outputs, targets)`` (``loss_fn(outputs)`` without targets)
  returns one finite loss per row, shape ``[rows]`` — for torch losses ``reduction="none"``
  (:func:`call_loss`, :func:`check_finite`). Any callable; estimators that do not backpropagate
  never differentiate it.
* **Randomness only from the estimator's ``torch.Generator``.** The ``generator=`` argument, or
  one seeded from a single draw of the global RNG; the global RNG is never reseeded
  (:func:`make_generator`, :func:`draw_seeds`).
* **Exact resumption.** ``state_dict()`` holds the generator state and whatever else the next
  estimate depends on; ``load_state_dict(state)`` on an estimator built with the same arguments
  reproduces the next estimate bit for bit (:func:`generator_state`,
  :func:`load_generator_state`).
* The model is left as it was found, also when the forward or the loss raises.

:class:`GradientEstimator` states this as a protocol; the functions below are its shared parts
(argument checks, parameter selection, input handling, the loss check, generator state and
``.grad`` accumulation), each written once here and used by every estimator.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class GradientEstimator(Protocol):
    """What ``ulr train`` and :mod:`ulr.evaluate.bench` rely on; :class:`ulr.LikelihoodRatio`
    and every peer in :mod:`ulr.peers` satisfy it.

    Attributes:
        last_forward_rows: forward rows of the last call: examples × forward evaluations,
            summed over all evaluations (perturbed, clean or tangent passes).
    """

    last_forward_rows: int

    def loss_and_grads(self, loss_fn: Callable[..., Tensor], inputs: Any,
                       targets: Any = None) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def check_model(model: Any) -> nn.Module:
    """``model`` itself; ``TypeError`` unless it is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def check_positive_int(name: str, value: Any, *, even: bool = False) -> int:
    """``value`` if it is an int >= 1 (and even, with ``even=True``); else ``ValueError``
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if even and value % 2:
        raise ValueError(f"{name} must be even with antithetic=True (pairs +ε, -ε), got {value}; "
                         f"use {value + 1} or set antithetic=False")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite number > 0; else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def make_generator(generator: torch.Generator | None,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """The estimator's private generator: the given one, or one on ``device`` seeded from a
    single draw of torch's global RNG (so ``torch.manual_seed`` makes runs reproducible). The
    global RNG is never reseeded."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator(device=device).manual_seed(seed)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {generator!r}")
    return generator


def generator_state(generator: torch.Generator) -> dict[str, Any]:
    """The generator's part of an estimator's ``state_dict()``: its state and its device."""
    return {"generator": generator.get_state(), "generator_device": str(generator.device)}


def load_generator_state(generator: torch.Generator, state: Mapping[str, Any],
                         owner: str) -> torch.Generator:
    """Restore :func:`generator_state` into ``generator`` (a new one when the saved device
    differs) and return it; ``ValueError`` naming ``owner`` when the state has none."""
    if "generator" not in state:
        raise ValueError(f"estimator state is missing ['generator']; was it saved by "
                         f"{owner}.state_dict()?")
    device = torch.device(state.get("generator_device", str(generator.device)))
    if device != generator.device:
        generator = torch.Generator(device=device)
    generator.set_state(state["generator"])
    return generator


def draw_seeds(generator: torch.Generator, n: int) -> list[int]:
    """``n`` 62-bit seeds from the estimator's generator (one per perturbation / tangent)."""
    return torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()


def trainable(model: nn.Module, exclude: Iterable[str], *,
              required: bool = True) -> list[tuple[str, nn.Parameter]]:
    """Parameters with ``requires_grad`` whose names match no ``exclude`` pattern, in
    ``named_parameters()`` order. Raises ``ValueError`` when a pattern matches no parameter,
    or (with ``required``) when there is none."""
    exclude = tuple(exclude)
    names = [n for n, _ in model.named_parameters()]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"exclude pattern {pattern!r} matches no parameter of the model; "
                             f"the parameters are {names}")
    params = [(n, p) for n, p in model.named_parameters()
              if p.requires_grad and not any(fnmatch.fnmatchcase(n, e) for e in exclude)]
    if not params and required:
        raise ValueError(f"{type(model).__name__} has no trainable parameter to estimate a "
                         f"gradient for (all frozen or excluded)")
    return params


def as_call(inputs: Any) -> tuple[tuple, dict]:
    """``inputs`` (tensor, tuple/list of positional arguments or dict of keyword arguments)
    -> ``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, list):
        return tuple(inputs), {}
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


def _first_tensor(tree: Any) -> Tensor | None:
    if isinstance(tree, Tensor):
        return tree if tree.dim() > 0 else None
    items = tree.values() if isinstance(tree, dict) else (
        tree if isinstance(tree, (tuple, list)) else ())
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def batch_size(inputs: Any, targets: Any) -> int:
    """``B``: the leading dimension of the first input tensor (of the targets if none)."""
    first = _first_tensor(inputs)
    if first is None:
        first = _first_tensor(targets)
    if first is None:
        raise ValueError("inputs must contain at least one batch-first tensor")
    return first.shape[0]


def call_loss(loss_fn: Callable[..., Tensor], outputs: Any, targets: Any, rows: int) -> Tensor:
    """``loss_fn(outputs, targets)`` (or ``loss_fn(outputs)``) checked to be ``[rows]``."""
    losses = loss_fn(outputs) if targets is None else loss_fn(outputs, targets)
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"loss_fn must return a tensor with one loss per row (shape ({rows},)), got "
            f"{type(losses).__name__}; for torch losses pass reduction='none'")
    if losses.shape != (rows,):
        hint = (" — it looks reduced; pass reduction='none'" if losses.dim() == 0 else
                " — reduce the other dimensions per row, e.g. .mean(dim=1)"
                if losses.dim() > 1 and losses.shape[0] == rows else "")
        raise ValueError(f"loss_fn must return one loss per row, shape ({rows},), but returned "
                         f"shape {tuple(losses.shape)}{hint}")
    return losses


def check_finite(value: Tensor, rows: int | None = None, *, where: str = "") -> None:
    """Refuse non-finite losses (``value``: the losses of ``rows`` rows, default all of
    ``value``; ``where`` adds to the message, e.g. ", on all ranks together")."""
    bad = int((~torch.isfinite(value.detach())).sum())
    if bad:
        raise ValueError(
            f"loss_fn returned {bad} non-finite losses out of "
            f"{value.numel() if rows is None else rows} (NaN/inf{where}); no gradient was "
            f"written. Lower the noise (perturbation) scale or the learning rate, or check the "
            f"loss")


def accumulate(params: list[tuple[str, nn.Parameter]], grads: list[Tensor]) -> None:
    """Add ``grads`` to ``p.grad`` (creating it when ``None``), as ``Tensor.backward`` does."""
    with torch.no_grad():
        for (_, p), g in zip(params, grads, strict=True):
            g = g.to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
