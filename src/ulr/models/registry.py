"""Build reference models by name from a data shape; look up their ULR configurations."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._common import ULRConfig
from .binary import BinaryMLP, BlackBoxMLP
from .gnn import GCN
from .lenet import LeNet5
from .mlp import MLP
from .norm import ResNet5BN
from .resnet import ResNet5
from .rnn import RecurrentClassifier
from .snn import SpikingMLP
from .transformer import TransformerClassifier
from .vgg import VGG8


@dataclass(frozen=True)
class _Entry:
    cls: Callable[..., nn.Module]
    # Maps a validated in_shape to the constructor's shape arguments, or None if it does not fit.
    shape_kwargs: Callable[[tuple[int, ...]], dict[str, int] | None]
    shapes: str


def _mlp_kwargs(in_shape: tuple[int, ...]) -> dict[str, int] | None:
    return {"in_features": math.prod(in_shape)}


def _image_kwargs(minimum: int) -> Callable[[tuple[int, ...]], dict[str, int] | None]:
    def shape_kwargs(in_shape: tuple[int, ...]) -> dict[str, int] | None:
        if len(in_shape) != 3 or in_shape[1] != in_shape[2] or in_shape[1] < minimum:
            return None
        return {"in_channels": in_shape[0], "input_size": in_shape[1]}

    return shape_kwargs


def _image_shapes(minimum: int) -> str:
    return (
        f"(C, S, S) images with S >= {minimum}, e.g. (1, 8, 8) digits, (1, 28, 28) MNIST, "
        "(3, 32, 32) CIFAR-10"
    )


def _sequence_kwargs(in_shape: tuple[int, ...]) -> dict[str, int] | None:
    return {"input_size": in_shape[1]} if len(in_shape) == 2 else None


def _transformer_kwargs(in_shape: tuple[int, ...]) -> dict[str, int] | None:
    return {"in_features": in_shape[1], "max_len": in_shape[0]} if len(in_shape) == 2 else None


def _node_kwargs(in_shape: tuple[int, ...]) -> dict[str, int] | None:
    return {"in_features": in_shape[0]} if len(in_shape) == 1 else None


def _recurrent(kind: str) -> Callable[..., nn.Module]:
    def make(**kwargs: Any) -> nn.Module:
        return RecurrentClassifier(kind, **kwargs)  # type: ignore[arg-type]

    return make


_SEQUENCES = "(T, F) batch-first sequences, e.g. (8, 8) sequential-digits, (50, 2) adding"

_REGISTRY: dict[str, _Entry] = {
    "mlp": _Entry(MLP, _mlp_kwargs, "any shape; inputs are flattened, e.g. (64,) or (1, 28, 28)"),
    "lenet5": _Entry(LeNet5, _image_kwargs(4), _image_shapes(4)),
    "resnet5": _Entry(ResNet5, _image_kwargs(8), _image_shapes(8)),
    "vgg8": _Entry(VGG8, _image_kwargs(8), _image_shapes(8)),
    "resnet5-bn": _Entry(ResNet5BN, _image_kwargs(8), _image_shapes(8)),
    "rnn": _Entry(_recurrent("rnn"), _sequence_kwargs, _SEQUENCES),
    "gru": _Entry(_recurrent("gru"), _sequence_kwargs, _SEQUENCES),
    "lstm": _Entry(_recurrent("lstm"), _sequence_kwargs, _SEQUENCES),
    "transformer": _Entry(TransformerClassifier, _transformer_kwargs, _SEQUENCES),
    "gcn": _Entry(GCN, _node_kwargs, "(F,) features per node, e.g. (34,) karate, (32,) sbm"),
    "snn": _Entry(SpikingMLP, _mlp_kwargs,
                  "any shape of intensities in [0, 1]; flattened, e.g. (1, 8, 8) digits"),
    "binary-mlp": _Entry(BinaryMLP, _mlp_kwargs, "any shape; inputs are flattened"),
    "blackbox-mlp": _Entry(BlackBoxMLP, _mlp_kwargs, "any shape; inputs are flattened"),
}


def available() -> list[str]:
    """Names accepted by :func:`build`, sorted.

    Image/vector models: ``"mlp"``, ``"lenet5"``, ``"resnet5"``, ``"vgg8"``, ``"resnet5-bn"``
    (copy-aware BatchNorm), ``"snn"`` (spiking), ``"binary-mlp"`` (binary weights, sign units),
    ``"blackbox-mlp"`` (a numpy nonlinearity); sequence models ``"rnn"``, ``"gru"``,
    ``"lstm"``, ``"transformer"``; graph model ``"gcn"`` (see :mod:`ulr.models.gnn` for the
    replicate hook and the per-node loss it needs).
    """
    return sorted(_REGISTRY)


def build(name: str, *, in_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a reference model for inputs of shape ``(B, *in_shape)``.

    Args:
        name: one of :func:`available` (case-insensitive).
        in_shape: shape of one example, without the batch dimension: ``(C, S, S)`` for the CNNs,
            anything for ``"mlp"``.
        num_classes: number of output logits.
        **kwargs: other constructor arguments, e.g. ``hidden=(256, 128)`` and
            ``activation="tanh"`` for ``"mlp"``. The shape arguments (``in_features``,
            ``in_channels``, ``input_size``) come from ``in_shape`` and may not be given.

    Returns:
        A fresh model with torch's default initialisation, mapping ``(B, *in_shape)`` to
        ``(B, num_classes)``.

    Raises:
        ValueError: unknown ``name``, or ``in_shape`` that the model cannot take (the message
            says which shapes work).
        TypeError: a shape argument passed in ``kwargs``.
    """
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available()}")
    entry = _REGISTRY[key]
    shape = tuple(in_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            f"in_shape must be a non-empty tuple of positive ints, got {in_shape!r}; "
            f"{key} takes {entry.shapes}"
        )
    shape_kwargs = entry.shape_kwargs(shape)
    if shape_kwargs is None:
        raise ValueError(f"{key} cannot take in_shape {shape}; it takes {entry.shapes}")
    clash = sorted(set(shape_kwargs) & set(kwargs))
    if clash:
        raise TypeError(f"{clash} are derived from in_shape={shape}; do not pass them to build()")
    return entry.cls(num_classes=num_classes, **shape_kwargs, **kwargs)


def recommended_config(model: nn.Module) -> ULRConfig:
    """Recommended ULR configuration of a reference model (delegates to ``model.ulr_config()``).

    Args:
        model: an :class:`MLP`, :class:`LeNet5`, :class:`ResNet5` or :class:`VGG8` (or any module
            with an ``ulr_config()`` method).

    Returns:
        A fresh dict ``{"sigma": {name: float}, "num_copies": {name: int}}`` whose inner keys are
        exactly the qualified names (as in ``model.named_modules()``) of the modules that own
        parameters. ``sigma`` is the output-noise standard deviation of that layer;
        ``num_copies`` its copy count in a layer-wise plan (one perturbed pass per layer).
        Output noise is used everywhere for now, also where the reference uses weight noise.

    Raises:
        TypeError: the model has no ``ulr_config()`` method.
    """
    config = getattr(model, "ulr_config", None)
    if not callable(config):
        raise TypeError(
            f"{type(model).__name__} has no recommended ULR configuration (no ulr_config() "
            f"method); build one of {available()} or choose sigma and num_copies yourself"
        )
    return config()
