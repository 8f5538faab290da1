"""Multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import Activation, ULRConfig, as_widths, check_positive, make_activation

# Starting points, not tuned: sigma in docs/method.md's 1e-2..0.1 output-noise range, and copy
# counts at the low end of the authors' 50-800 (hidden layers, with more noise dimensions, get
# more).
_SIGMA = 0.1
_HIDDEN_COPIES = 64
_OUTPUT_COPIES = 32


class MLP(nn.Module):
    """Fully connected net ``Flatten -> [Linear -> act] * len(hidden) -> Linear``.

    Shapes: input ``(B, *in_shape)`` with ``prod(in_shape) == in_features`` (flattened from dim 1;
    a ``(B, in_features)`` input passes through unchanged) -> logits ``(B, num_classes)``.

    Parametrised layers (the ULR sites) are ``hidden.0 .. hidden.{n-1}`` and ``out``; each hidden
    Linear is followed by its own activation module ``acts.i``. Parameters keep torch's default
    initialisation (Kaiming-uniform weights, ``a=sqrt(5)``; uniform biases).

    Args:
        in_features: number of input features after flattening.
        num_classes: number of output logits.
        hidden: widths of the hidden layers; ``()`` gives a linear (softmax-regression) model.
        activation: ``"relu"``, ``"tanh"``, ``"sigmoid"`` or ``"sign"`` (hard threshold to
            ``+-1``; zero gradient under backprop, for likelihood-ratio training only).

    Example:
        >>> MLP(784, 10, hidden=(50,), activation="sign")(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128,),
        activation: Activation = "relu",
    ) -> None:
        super().__init__()
        hidden = as_widths(hidden)
        check_positive(in_features=in_features, num_classes=num_classes)
        for i, width in enumerate(hidden):
            check_positive(**{f"hidden[{i}]": width})
        self.in_features = in_features
        self.num_classes = num_classes
        self.activation = activation
        widths = (in_features, *hidden)
        self.flatten = nn.Flatten()
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.acts = nn.ModuleList(make_activation(activation) for _ in hidden)
        self.out = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, *in_shape)`` inputs to ``(B, num_classes)`` logits."""
        x = self.flatten(x)
        for linear, act in zip(self.hidden, self.acts):
            x = act(linear(x))
        return self.out(x)

    def ulr_config(self) -> ULRConfig:
        """Recommended starting ULR configuration (output noise on every Linear).

        Returns:
            ``{"sigma": {name: 0.1}, "num_copies": {name: 64 for hidden layers, 32 for out}}``
            keyed by the qualified names of the Linear layers. Starting points, not tuned values.
        """
        names = [f"hidden.{i}" for i in range(len(self.hidden))]
        return {
            "sigma": {name: _SIGMA for name in [*names, "out"]},
            "num_copies": {**{name: _HIDDEN_COPIES for name in names}, "out": _OUTPUT_COPIES},
        }
