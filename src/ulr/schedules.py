"""Noise-scale schedules: change σ over training, the way LR schedulers change the step size.

Example:
    >>> import torch, ulr
    >>> model = torch.nn.Linear(3, 2)
    >>> est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.1))
    >>> sched = ulr.NoiseSchedule(est, lambda step: 0.5 ** step)
    >>> sched.step()
    >>> est.noise.sigma
    0.05
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .noise import Noise

__all__ = ["NoiseSchedule"]


class NoiseSchedule:
    """Set every noise scale to ``initial_scale · factor(step)`` at each :meth:`step`.

    Args:
        noises: a :class:`~ulr.LikelihoodRatio` (all its noises, from its ``noises()``) or
            noises.
        factor: ``step -> multiplier`` (``step`` counts calls of :meth:`step`, starting at 0),
            e.g. ``lambda s: 0.99 ** s`` or a cosine decay to a floor.

    Learnable scales are refused: they follow their own gradient.
    """

    def __init__(self, noises: Any, factor: Callable[[int], float]) -> None:
        if callable(getattr(noises, "noises", None)):  # an estimator: see LikelihoodRatio.noises
            noises = noises.noises()
        unique: dict[int, Noise] = {}
        for n in noises if isinstance(noises, Iterable) else [noises]:
            if not isinstance(n, Noise):
                raise TypeError(f"NoiseSchedule takes ulr noises or an estimator, got {n!r}")
            if n.learnable:
                raise ValueError(f"{n!r} is learnable; a schedule would fight its gradient")
            unique[id(n)] = n
        if not unique:
            raise ValueError("NoiseSchedule found no noise to schedule")
        if not callable(factor):
            raise TypeError(f"factor must be a callable step -> float, got {factor!r}")
        self.noises = list(unique.values())
        self.initial = [n.scale.clone() if isinstance(n.scale, torch.Tensor) else n.scale
                        for n in self.noises]
        self.factor = factor
        self.last_step = 0

    def step(self) -> None:
        """Advance one step and set the scales."""
        self.last_step += 1
        f = float(self.factor(self.last_step))
        for noise, s0 in zip(self.noises, self.initial, strict=True):
            noise.scale = s0 * f

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"]) - 1
        self.step()
