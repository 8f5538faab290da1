"""Reference models for ULR training: plain ``nn.Module``s made of standard, hookable layers.

The four reference CNN/MLP models are built from ``nn.Linear``, ``nn.Conv2d``, activation
modules, ``nn.MaxPool2d`` and ``nn.Flatten`` (no BatchNorm: it mixes statistics across noise
copies), keep torch's default parameter initialisation and map ``(B, *in_shape)`` inputs to
``(B, num_classes)`` logits.

- :class:`MLP`, :class:`LeNet5`, :class:`ResNet5`, :class:`VGG8` (the last two as in the ULR
  authors' CIFAR-10 code, docs/method.md §3).
- :func:`build` makes one by name from an example shape; :func:`available` lists the names.
- Each model's ``ulr_config()`` method (also reachable as :func:`recommended_config`) returns its
  recommended per-layer output-noise ``sigma`` and layer-wise ``num_copies``, keyed by qualified
  module name.
- :class:`Sign` is the hard-threshold activation behind ``activation="sign"``.

Beyond feedforward nets (``docs/architectures.md``): recurrent nets trained without BPTT
(:class:`RecurrentClassifier`, :mod:`ulr.models.rnn`), graph convolutional nets
(:class:`GCN`, :mod:`ulr.models.gnn`), spiking nets with a true Heaviside spike
(:class:`SpikingMLP`, :mod:`ulr.models.snn`), a Transformer encoder
(:class:`TransformerClassifier`), BatchNorm that keeps noise copies apart
(:class:`CopyBatchNorm`, :class:`ResNet5BN`, :mod:`ulr.models.norm`), and non-differentiable
parts: binarised weights, hard thresholds and a numpy black box (:mod:`ulr.models.binary`).
"""

from ._common import Sign, ULRConfig
from .binary import BinaryLinear, BinaryMLP, BlackBoxMLP, NumpyBlackBox
from .gnn import GCN, GraphConv, NodeLoss, tile_graph
from .lenet import LeNet5
from .mlp import MLP
from .norm import CopyBatchNorm, ResNet5BN, whole_batch
from .registry import available, build, recommended_config
from .resnet import ResNet5
from .rnn import RecurrentClassifier
from .snn import LIF, SpikingMLP
from .transformer import TransformerClassifier
from .vgg import VGG8

__all__ = [
    "GCN",
    "LIF",
    "BinaryLinear",
    "BinaryMLP",
    "BlackBoxMLP",
    "CopyBatchNorm",
    "GraphConv",
    "NodeLoss",
    "NumpyBlackBox",
    "RecurrentClassifier",
    "ResNet5BN",
    "SpikingMLP",
    "TransformerClassifier",
    "tile_graph",
    "whole_batch",
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
