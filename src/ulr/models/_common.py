"""Shared pieces of the reference models: activations, sizes, the ULR configuration type."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import torch
from torch import nn

Activation = Literal["relu", "tanh", "sigmoid", "sign"]
ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "sigmoid", "sign")


class _ULRConfigRequired(TypedDict):
    sigma: dict[str, float]
    num_copies: dict[str, int]


class ULRConfig(_ULRConfigRequired, total=False):
    """A recommended ULR configuration, keyed by qualified module name.

    Attributes:
        sigma: output-noise standard deviation of each layer that gets output noise.
        weight_sigma: per-example weight-noise standard deviation of each layer that gets
            weight noise instead (:func:`ulr.weight_noise`); absent or empty if none. Together
            with ``sigma`` it covers every parametrised layer exactly once.
        num_copies: noise copies per layer for a layer-wise plan (one perturbed pass per layer).
    """

    weight_sigma: dict[str, float]


class Sign(nn.Module):
    """Hard threshold ``x -> +1 if x >= 0 else -1``, elementwise; shape ``(*) -> (*)``.

    Meant for likelihood-ratio training, which never differentiates an activation. Under plain
    backprop its gradient is zero everywhere (it stays in the graph, so ``backward`` works but
    layers below it learn nothing). ``x = 0`` maps to ``+1`` so the output is always binary.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sign(x)
        return torch.where(s == 0, torch.ones_like(s), s)


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (one of :data:`ACTIVATIONS`).

    Every call returns a new instance so that each layer owns its activation module (a hook on one
    of them then fires once per forward pass).
    """
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "sign":
        return Sign()
    raise ValueError(f"unknown activation {name!r}; choose one of {list(ACTIVATIONS)}")


def as_widths(hidden: Any) -> tuple[int, ...]:
    """Hidden-layer widths: a list/tuple of ints, or one int for a single hidden layer
    (``--model-arg hidden=32`` as well as ``hidden=[32, 32]``)."""
    if isinstance(hidden, bool):
        raise TypeError(f"hidden must be an int or a list of ints, got {hidden!r}")
    if isinstance(hidden, int):
        return (hidden,)
    try:
        widths = tuple(hidden)
    except TypeError:
        raise TypeError(f"hidden must be an int or a list of ints (the widths of the hidden "
                        f"layers), got {hidden!r}") from None
    if not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        raise TypeError(f"hidden must be an int or a list of ints, got {hidden!r}")
    return widths


def check_positive(**values: int) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive ``int``."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")


def check_input_size(model: str, input_size: int, minimum: int) -> None:
    """Raise ``ValueError`` if a square input of side ``input_size`` is too small for ``model``."""
    check_positive(input_size=input_size)
    if input_size < minimum:
        raise ValueError(f"{model} needs input_size >= {minimum} (square inputs), got {input_size}")
