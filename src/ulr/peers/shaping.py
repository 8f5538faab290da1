"""Fitness shaping for evolution strategies: population losses ``[P]`` -> weights ``[P]``.

Each shaping is one small object (as evosax's ``FitnessShaper``, OpenAI-ES's
``compute_centered_ranks``); :class:`ulr.peers.EvolutionStrategies` takes one, or ``None`` for
the raw losses (the plain, unbiased Gaussian-smoothing estimator).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Shaping", "centered_ranks", "standardized"]


class Shaping:
    """Base class: ``shaping(losses) -> weights``, both ``[P]`` (one per population member,
    lower loss is better; a larger weight pushes the estimate towards that member's noise)."""

    def __call__(self, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _CenteredRanks(Shaping):
    def __call__(self, losses: Tensor) -> Tensor:
        n = losses.numel()
        if n < 2:
            return torch.zeros_like(losses)
        ranks = torch.empty(n, dtype=torch.float32, device=losses.device)
        ranks[torch.argsort(losses, stable=True)] = torch.arange(
            n, dtype=torch.float32, device=losses.device)
        return ranks / (n - 1) - 0.5

    def __repr__(self) -> str:
        return "centered_ranks()"


class _Standardized(Shaping):
    def __call__(self, losses: Tensor) -> Tensor:
        if losses.numel() < 2:
            return torch.zeros_like(losses)
        std = losses.std()
        centered = losses - losses.mean()
        return centered / std if float(std) > 0 else centered

    def __repr__(self) -> str:
        return "standardized()"


def centered_ranks() -> Shaping:
    """Rank the ``P`` losses (0 = lowest) and map ranks linearly onto ``[-0.5, 0.5]``.

    OpenAI-ES's ``compute_centered_ranks`` (Salimans et al. 2017, after Wierstra et al. 2014):
    invariant to any increasing transform of the loss and robust to outliers, at the price of a
    bias — the estimate follows the gradient's direction only approximately and loses its scale
    (for a linear loss ``E[ĝ] ∝ ∇L``). Ties are ranked in population order.
    """
    return _CenteredRanks()


def standardized() -> Shaping:
    """``(L - mean(L)) / std(L)`` over the population (EvoTorch's ``"normalized"`` ranking):
    a baseline plus a scale; biased by ``O(1/P)`` since mean and std use every member."""
    return _Standardized()
