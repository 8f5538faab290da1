"""VGG-8: the small VGG-style CNN of the ULR authors' experiments."""

from __future__ import annotations

import torch
from torch import nn

from ._common import Activation, ULRConfig, check_input_size, check_positive, make_activation

# docs/method.md §3 (authors' CIFAR-10 code): weight noise 1e-3 on conv1-4, output noise 1e-2
# after, copies [100, 200, 400, 800, 400, 200, 100, 50] in layer order.
_SIGMA = 1e-2
_WEIGHT_SIGMA = 1e-3
_WEIGHT_LAYERS = ("conv1", "conv2", "conv3", "conv4")
_COPIES = {
    "conv1": 100,
    "conv2": 200,
    "conv3": 400,
    "conv4": 800,
    "conv5": 400,
    "conv6": 200,
    "fc1": 100,
    "fc2": 50,
}


class VGG8(nn.Module):
    """Eight-layer VGG-style CNN (docs/method.md §3).

    Layers (every conv 3x3 with padding 1, followed by its activation):
    conv 16, conv 16, maxpool2, conv 32, conv 32, maxpool2, conv 64, conv 64, maxpool2, flatten,
    linear ``64 * (input_size // 8) ** 2 -> 256``, act, linear ``256 -> num_classes``.
    3x32x32 gives ``64*4*4 = 1024`` in-features (the reference's 1024 -> 256); 1x28x28 gives
    28 -> 14 -> 7 -> 3 (floor), i.e. ``64*3*3 = 576``; 1x8x8 gives 64. Any ``input_size >= 8``
    works.

    Shapes: input ``(B, in_channels, input_size, input_size)`` -> logits ``(B, num_classes)``.

    No BatchNorm (it mixes statistics across noise copies). Parameters keep torch's default
    initialisation. Parametrised layers (the ULR sites): ``conv1``..``conv6``, ``fc1``, ``fc2``.

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
        check_input_size("VGG8", input_size, 8)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size
        side = input_size // 2 // 2 // 2
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.act2 = make_activation(activation)
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.act3 = make_activation(activation)
        self.conv4 = nn.Conv2d(32, 32, 3, padding=1)
        self.act4 = make_activation(activation)
        self.pool2 = nn.MaxPool2d(2)
        self.conv5 = nn.Conv2d(32, 64, 3, padding=1)
        self.act5 = make_activation(activation)
        self.conv6 = nn.Conv2d(64, 64, 3, padding=1)
        self.act6 = make_activation(activation)
        self.pool3 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * side * side, 256)
        self.act7 = make_activation(activation)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, S, S)`` images to ``(B, num_classes)`` logits."""
        x = self.pool1(self.act2(self.conv2(self.act1(self.conv1(x)))))
        x = self.pool2(self.act4(self.conv4(self.act3(self.conv3(x)))))
        x = self.pool3(self.act6(self.conv6(self.act5(self.conv5(x)))))
        x = self.act7(self.fc1(self.flatten(x)))
        return self.fc2(x)

    def ulr_config(self) -> ULRConfig:
        """Recommended ULR configuration, from the authors' CIFAR-10 code (docs/method.md §3).

        Returns:
            per-example *weight* noise 1e-3 on ``conv1``..``conv4``, output noise 1e-2 on
            ``conv5``, ``conv6``, ``fc1``, ``fc2``; ``num_copies`` conv1 100, conv2 200, conv3 400,
            conv4 800, conv5 400, conv6 200, fc1 100, fc2 50 (for a layer-wise plan).
        """
        return {
            "sigma": {n: _SIGMA for n in _COPIES if n not in _WEIGHT_LAYERS},
            "weight_sigma": dict.fromkeys(_WEIGHT_LAYERS, _WEIGHT_SIGMA),
            "num_copies": dict(_COPIES),
        }
