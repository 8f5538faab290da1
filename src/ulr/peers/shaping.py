"""Fitness shaping for evolution strategies: population losses ``[P]`` -> weights ``[P]``.

Each shaping is one small object (as evosax's ``FitnessShaper``, OpenAI-ES's
``compute_centered_ranks``); :class:`ulr.peers.EvolutionStrategies` takes one, or ``None`` for
the raw losses (the plain, unbiased Gaussian-smoothing estimator).

This module is the familiar spelling of the shapings of :mod:`ulr.transforms`, the one family of
loss transforms (``Shaping`` is :class:`ulr.transforms.Transform`): ``EvolutionStrategies``
accepts any member that needs no clean losses, e.g. ``ulr.baselines.leave_one_out()``.
"""

from __future__ import annotations

from ..transforms import Transform as Shaping
from ..transforms import centered_ranks, standardized

__all__ = ["Shaping", "centered_ranks", "standardized"]
