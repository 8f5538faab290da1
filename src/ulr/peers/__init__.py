"""Peer gradient estimators under the contract of :class:`ulr.LikelihoodRatio`.

Each peer has ``loss_and_grads(loss_fn, inputs, targets) -> mean loss``, accumulates its estimate
into ``p.grad`` (as ``Tensor.backward`` does, so any ``torch.optim`` optimizer works), exposes
``last_forward_rows`` (examples × forward evaluations of the last call), draws randomness only
from its ``generator=`` and checkpoints it with ``state_dict()`` / ``load_state_dict()``. The
model is left unchanged by every call, bit-exactly, also when the forward or the loss raises.

============================  ==========================================  ====================
estimator                     estimate of ∇L per call                      forward rows / call
============================  ==========================================  ====================
:class:`Backprop`             exact minibatch gradient (reference)         ``B`` (+ backward)
:class:`EvolutionStrategies`  ``(1/Pσ) Σ u(L_i) ε_i``, weights ``θ+σε_i``  ``P·B``
:class:`SPSA`                 ``(1/n) Σ (L(θ+εz)-L(θ-εz))/(2ε) z``         ``2n·B``
:class:`ForwardGradient`      ``(1/T) Σ (∇L·v) v`` by ``torch.func.jvp``   ``T·B`` JVP rows
============================  ==========================================  ====================

:func:`available` and :func:`build` make them by name (for ``ulr train --method``).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from torch import nn
    >>> import ulr.peers
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> est = ulr.peers.build("spsa", model, num_directions=4,
    ...                       generator=torch.Generator().manual_seed(0))
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> opt.zero_grad()
    >>> loss = est.loss_and_grads(lambda o, t: F.cross_entropy(o, t, reduction="none"),
    ...                           torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> opt.step()
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from torch import nn

from ..contract import GradientEstimator
from . import shaping
from ._weights import seeded_noise
from .backprop import Backprop
from .es import EvolutionStrategies
from .forward_gradient import ForwardGradient
from .shaping import centered_ranks, standardized
from .spsa import SPSA

__all__ = [
    "Backprop",
    "EvolutionStrategies",
    "ForwardGradient",
    "GradientEstimator",
    "SPSA",
    "arguments",
    "available",
    "build",
    "centered_ranks",
    "seeded_noise",
    "shaping",
    "standardized",
    "weight_noise",
]

_REGISTRY: dict[str, type] = {
    "backprop": Backprop,
    "es": EvolutionStrategies,
    "forward-gradient": ForwardGradient,
    "spsa": SPSA,
}


def available() -> list[str]:
    """Names accepted by :func:`build`: ``["backprop", "es", "forward-gradient", "spsa"]``."""
    return sorted(_REGISTRY)


def _class(name: str) -> type:
    key = str(name).lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ValueError(f"unknown peer estimator {name!r}; available: {available()} "
                         f"(the likelihood-ratio estimator itself is ulr.LikelihoodRatio)")
    return _REGISTRY[key]


def arguments(name: str) -> list[str]:
    """The keyword arguments the peer estimator ``name`` takes (besides ``model``), in its
    signature's order, e.g. ``["sigma", "population", ...]`` for ``"es"``.

    Raises:
        ValueError: unknown ``name`` (the message lists the names).
    """
    return [p for p in inspect.signature(_class(name)).parameters if p != "model"]


def build(name: str, model: nn.Module, **kwargs: Any) -> GradientEstimator:
    """Build the peer estimator ``name`` for ``model``.

    Args:
        name: one of :func:`available` (case-insensitive; ``_`` and ``-`` are the same).
        model: the network.
        **kwargs: the estimator's keyword arguments, e.g. ``generator=``, ``sigma=`` and
            ``population=`` for ``"es"``, ``eps=`` and ``num_directions=`` for ``"spsa"``,
            ``num_tangents=`` for ``"forward-gradient"``. Every peer accepts ``generator=`` and
            ``exclude=``.

    Raises:
        ValueError: unknown ``name`` (the message lists the names).
        TypeError: a keyword the estimator does not take (the message lists those it takes).
    """
    cls, accepted = _class(name), arguments(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        key = str(name).lower().replace("_", "-")
        raise TypeError(f"{cls.__name__} ({key!r}) takes no argument {unknown}; it takes "
                        f"{accepted}")
    return cls(model, **kwargs)


def weight_noise(*args: Any, **kwargs: Any) -> Any:
    """Deprecated name of :func:`seeded_noise` (kept for one release): ``ulr.weight_noise`` is
    something else, the LR estimator's noise on a layer's weights."""
    warnings.warn("ulr.peers.weight_noise is deprecated and will be removed in the next release; "
                  "use ulr.peers.seeded_noise (ulr.weight_noise is the LR estimator's weight "
                  "noise, a different thing)", DeprecationWarning, stacklevel=2)
    return seeded_noise(*args, **kwargs)
