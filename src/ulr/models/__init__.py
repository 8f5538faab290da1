"""Reference models for ULR training: plain ``nn.Module``s made of standard, hookable layers.

Every model is built from ``nn.Linear``, ``nn.Conv2d``, activation modules, ``nn.MaxPool2d`` and
``nn.Flatten`` (no BatchNorm: it mixes statistics across noise copies), keeps torch's default
parameter initialisation and maps ``(B, *in_shape)`` inputs to ``(B, num_classes)`` logits.

- :class:`MLP`, :class:`LeNet5`, :class:`ResNet5`, :class:`VGG8` (the last two as in the ULR
  authors' CIFAR-10 code, METHOD.md §3).
- :func:`build` makes one by name from an example shape; :func:`available` lists the names.
- Each model's ``ulr_config()`` method (also reachable as :func:`recommended_config`) returns its
  recommended per-layer output-noise ``sigma`` and layer-wise ``num_copies``, keyed by qualified
  module name.
- :class:`Sign` is the hard-threshold activation behind ``activation="sign"``.
"""

from ._common import Sign, ULRConfig
from .lenet import LeNet5
from .mlp import MLP
from .registry import available, build, recommended_config
from .resnet import ResNet5
from .vgg import VGG8

__all__ = [
    "MLP",
    "VGG8",
    "LeNet5",
    "ResNet5",
    "Sign",
    "ULRConfig",
    "available",
    "build",
    "recommended_config",
]
