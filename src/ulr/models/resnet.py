"""ResNet-5: the small residual CNN of the ULR authors' experiments."""

from __future__ import annotations

import torch
from torch import nn

from ._common import Activation, ULRConfig, check_input_size, check_positive, make_activation

# docs/method.md §3 (authors' CIFAR-10 code): weight noise 1e-3 on conv1-2, output noise 0.1 after,
# copies [100, 200, 200, 100, 50].
_SIGMA = 0.1
_WEIGHT_SIGMA = 1e-3
_WEIGHT_LAYERS = ("conv1", "conv2")
_COPIES = {"conv1": 100, "conv2": 200, "conv3": 200, "conv4": 100, "fc": 50}


class ResNet5(nn.Module):
    """Five-layer residual CNN (docs/method.md §3).

    Layers: conv3x3 ``in_channels -> 8``, act, conv3x3 ``8 -> 16``, act, maxpool2,
    conv3x3 ``16 -> 32``, act (= ``h``), conv3x3 ``32 -> 32``, add ``h``, act, maxpool4, flatten,
    linear ``32 * (input_size // 8) ** 2 -> num_classes``. All convs have padding 1, so only the
    pools shrink the maps: 3x32x32 gives ``32*4*4 = 512`` linear in-features (the reference's
    512 -> 10); 1x28x28 gives 28 -> 14 -> 3 (floor), i.e. ``32*3*3 = 288``; 1x8x8 gives 32.
    Any ``input_size >= 8`` works.

    Shapes: input ``(B, in_channels, input_size, input_size)`` -> logits ``(B, num_classes)``.

    No BatchNorm (it mixes statistics across noise copies). Parameters keep torch's default
    initialisation. Parametrised layers (the ULR sites): ``conv1``..``conv4``, ``fc``; ULR
    output noise on ``conv4`` enters before the residual add.

    Args:
        in_channels: input channels (1 for MNIST, 3 for CIFAR-10).
        num_classes: number of output logits.
        input_size: side of the square input.
        activation: ``"relu"`` (reference), ``"tanh"``, ``"sigmoid"`` or ``"sign"``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        activation: Activation = "relu",
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes)
        check_input_size("ResNet5", input_size, 8)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size
        side = input_size // 2 // 4
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = make_activation(activation)
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.act3 = make_activation(activation)
        self.conv4 = nn.Conv2d(32, 32, 3, padding=1)
        self.act4 = make_activation(activation)
        self.pool2 = nn.MaxPool2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, S, S)`` images to ``(B, num_classes)`` logits."""
        x = self.act1(self.conv1(x))
        x = self.pool1(self.act2(self.conv2(x)))
        h = self.act3(self.conv3(x))
        x = self.act4(self.conv4(h) + h)
        return self.fc(self.flatten(self.pool2(x)))

    def ulr_config(self) -> ULRConfig:
        """Recommended ULR configuration, from the authors' CIFAR-10 code (docs/method.md §3).

        Returns:
            per-example *weight* noise 1e-3 on ``conv1`` and ``conv2`` (large maps, few
            weights), output noise 0.1 on ``conv3``, ``conv4`` and ``fc``; ``num_copies`` conv1
            100, conv2 200, conv3 200, conv4 100, fc 50 (for a layer-wise plan).
        """
        return {
            "sigma": {n: _SIGMA for n in _COPIES if n not in _WEIGHT_LAYERS},
            "weight_sigma": dict.fromkeys(_WEIGHT_LAYERS, _WEIGHT_SIGMA),
            "num_copies": dict(_COPIES),
        }
