"""LeNet-5-style convolutional net."""

from __future__ import annotations

import torch
from torch import nn

from ._common import Activation, ULRConfig, check_input_size, check_positive, make_activation

_SIGMA = 0.05
# Starting points, not tuned: more copies where the noise has more dimensions (conv2's maps and
# fc1's 120 units), fewer at the 10-logit output.
_COPIES = {"conv1": 64, "conv2": 128, "fc1": 128, "fc2": 64, "fc3": 32}


def lenet5_paddings(input_size: int) -> tuple[int, int]:
    """Zero padding of ``(conv1, conv2)`` for a square input of side ``input_size``.

    The classic net takes 32x32 inputs with unpadded 5x5 convs. Smaller inputs keep their size
    through a conv instead (padding 2), so that: 28x28 (MNIST) follows the usual 28 -> 14 -> 10
    -> 5 path; and 8x8 (scikit-learn digits) runs 8 -> 4 -> 4 -> 2 with both convs padded.
    """
    pad1 = 0 if input_size >= 32 else 2
    pooled = (input_size - 4 + 2 * pad1) // 2
    pad2 = 0 if pooled >= 10 else 2
    return pad1, pad2


def lenet5_feature_size(input_size: int) -> int:
    """Side of the 16-channel feature map that feeds ``fc1`` (see :func:`lenet5_paddings`)."""
    pad1, pad2 = lenet5_paddings(input_size)
    side = (input_size - 4 + 2 * pad1) // 2
    return (side - 4 + 2 * pad2) // 2


class LeNet5(nn.Module):
    """LeNet-5-style CNN: conv5(6), maxpool2, conv5(16), maxpool2, fc 120, fc 84, fc classes.

    Shapes: input ``(B, in_channels, input_size, input_size)`` -> logits ``(B, num_classes)``.
    Conv paddings and map sides (input, conv1, pool1, conv2, pool2; 16 channels reach ``fc1``):

    - 8 (scikit-learn digits): paddings (2, 2), sides 8-8-4-4-2, fc1 in-features 64.
    - 28 (MNIST): paddings (2, 0), sides 28-28-14-10-5, fc1 in-features 400.
    - 32 (CIFAR-10, the classic net): paddings (0, 0), sides 32-28-14-10-5, fc1 in-features 400.

    Any ``input_size >= 4`` works (:func:`lenet5_paddings` gives the rule). Pooling is max
    pooling and the activation is a module after every layer but the last (ReLU by default,
    instead of the original tanh and subsampling). No BatchNorm. Parameters keep torch's default
    initialisation.

    Parametrised layers (the ULR sites): ``conv1``, ``conv2``, ``fc1``, ``fc2``, ``fc3``.

    Args:
        in_channels: input channels (1 for MNIST/digits, 3 for CIFAR).
        num_classes: number of output logits.
        input_size: side of the square input.
        activation: ``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``"sign"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        activation: Activation = "relu",
    ) -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes)
        check_input_size("LeNet5", input_size, 4)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size
        pad1, pad2 = lenet5_paddings(input_size)
        side = lenet5_feature_size(input_size)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad1)
        self.act1 = make_activation(activation)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad2)
        self.act2 = make_activation(activation)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.act3 = make_activation(activation)
        self.fc2 = nn.Linear(120, 84)
        self.act4 = make_activation(activation)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, S, S)`` images to ``(B, num_classes)`` logits."""
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        x = self.flatten(x)
        x = self.act3(self.fc1(x))
        x = self.act4(self.fc2(x))
        return self.fc3(x)

    def ulr_config(self) -> ULRConfig:
        """Recommended starting ULR configuration (output noise on every conv and linear).

        Returns:
            ``sigma`` 0.05 for every layer; ``num_copies`` conv1 64, conv2 128, fc1 128, fc2 64,
            fc3 32. Starting points, not tuned values.
        """
        return {"sigma": dict.fromkeys(_COPIES, _SIGMA), "num_copies": dict(_COPIES)}
