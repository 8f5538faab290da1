"""Networks with parts that backprop cannot train: hard thresholds, binarised weights, and a
black box computed in numpy.

- :class:`Heaviside` / :class:`ulr.models.Sign`: hard-threshold activations (zero gradient
  almost everywhere). ``relaxation="ste"`` gives the backprop reference a straight-through
  estimator (identity gradient clipped to ``|x| <= 1``, Hubara et al. 2016);
  ``relaxation="tanh"`` replaces the threshold by ``tanh`` (a differentiable relaxation).
- :class:`BinaryLinear`: weights ``sign(W)·s`` in the forward pass (``s = 1/sqrt(in)``). ULR
  puts noise on its output and estimates the gradient with respect to the *binary* weights;
  like BinaryConnect (Courbariaux et al. 2015) that gradient updates the latent real weights
  ``W``. This is the only straight-through step, and it is local to the layer: nothing is
  back-propagated through the thresholds of other layers.
- :class:`NumpyBlackBox`: any ``numpy`` function of the rows, called on a ``.numpy()`` copy
  (no autograd can pass through it). Here a non-differentiable "hardware" nonlinearity: a
  4-bit quantised ``tanh`` lookup table.

The models :class:`BinaryMLP` and :class:`BlackBoxMLP` are built from these. Both can be
trained on any per-row loss, including the 0-1 loss (``argmax != y``) itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._common import Sign, ULRConfig, as_widths, check_positive

Relaxation = Literal["none", "ste", "tanh"]
RELAXATIONS: tuple[str, ...] = ("none", "ste", "tanh")

__all__ = ["Heaviside", "SignActivation", "BinaryLinear", "NumpyBlackBox", "quantized_tanh",
           "BinaryMLP", "BlackBoxMLP", "zero_one_loss"]


def zero_one_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The classification error per row, ``1[argmax(logits) != y]`` (``float``, ``[N]``)."""
    return (logits.argmax(dim=1) != y).to(logits.dtype if logits.is_floating_point()
                                          else torch.float32)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, hard: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return hard

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype), None


class SignActivation(nn.Module):
    """``±1`` hard threshold (``Sign``) with an optional relaxation for backprop references:
    ``"none"`` (zero gradient), ``"ste"`` (straight-through, clipped) or ``"tanh"``."""

    def __init__(self, relaxation: Relaxation = "none") -> None:
        super().__init__()
        if relaxation not in RELAXATIONS:
            raise ValueError(f"unknown relaxation {relaxation!r}; choose one of "
                             f"{list(RELAXATIONS)}")
        self.relaxation = relaxation
        self.sign = Sign()

    def forward(self, x: Tensor) -> Tensor:
        if self.relaxation == "tanh":
            return torch.tanh(x)
        hard = self.sign(x)
        return _STE.apply(x, hard) if self.relaxation == "ste" else hard


class Heaviside(nn.Module):
    """``1[x >= 0]`` (a 0/1 step); ``relaxation="tanh"`` uses ``(1 + tanh(x)) / 2`` and
    ``"ste"`` the clipped straight-through gradient."""

    def __init__(self, relaxation: Relaxation = "none") -> None:
        super().__init__()
        self.inner = SignActivation(relaxation)

    def forward(self, x: Tensor) -> Tensor:
        return (self.inner(x) + 1) / 2


class BinaryLinear(nn.Linear):
    """Linear layer with binarised weights ``sign(W) / sqrt(in_features)`` in the forward pass.

    The latent real weights ``W`` are the trainable parameters (keep them in ``[-1, 1]``, e.g.
    with :meth:`clip_`, as BinaryConnect does). The layer's gradient with respect to its binary
    weights is passed to ``W`` unchanged (BinaryConnect's rule); under ULR this is the
    layer-local VJP of the site on this layer's output. The bias stays real.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = 1.0 / math.sqrt(self.in_features)
        hard = torch.where(self.weight >= 0, scale, -scale)
        weight = self.weight + (hard - self.weight).detach()  # value: hard; gradient: to W
        return nn.functional.linear(x, weight, self.bias)

    @torch.no_grad()
    def clip_(self, bound: float = 1.0) -> None:
        """Clip the latent weights to ``[-bound, bound]`` (call after each optimiser step)."""
        self.weight.clamp_(-bound, bound)


def quantized_tanh(x: np.ndarray, levels: int = 16) -> np.ndarray:
    """``tanh`` rounded to ``levels`` equally spaced values in ``[-1, 1]`` (a lookup table, as a
    low-precision analogue or digital unit would compute it). Piecewise constant."""
    step = 2.0 / (levels - 1)
    return (np.round((np.tanh(x) + 1.0) / step) * step - 1.0).astype(x.dtype)


class NumpyBlackBox(nn.Module):
    """Apply a ``numpy`` function to the input: ``torch -> numpy -> torch``, no autograd.

    ``fn`` maps an array ``[N, ...]`` to an array with the same first dimension; rows must not
    interact (each example is processed on its own). The output is a new tensor with no
    autograd history, on the input's device and dtype.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray] = quantized_tanh) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        out = np.asarray(self.fn(x.detach().cpu().numpy()))
        if out.shape[:1] != tuple(x.shape[:1]):
            raise ValueError(f"black box returned shape {out.shape} for input "
                             f"{tuple(x.shape)}; the first (row) dimension must be kept")
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device, x.dtype)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)!r}"


class BinaryMLP(nn.Module):
    """MLP with binarised hidden weights and ``±1`` hard-threshold hidden units.

    ``Flatten -> [BinaryLinear -> Sign] * len(hidden) -> Linear`` (the output layer is real so
    that logits have a useful scale). Shapes ``(B, *in_shape) -> (B, num_classes)``.

    Sites (param owners): ``hidden.0`` ... (binary layers, autograd VJP of the layer) and ``out``
    (closed form).

    Args:
        in_features, num_classes, hidden: as :class:`ulr.models.MLP`.
        relaxation: ``"none"`` for ULR; ``"ste"`` or ``"tanh"`` for the backprop reference
            (the hidden activations; the binary weights always pass their gradient to ``W``).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256,),
                 relaxation: Relaxation = "none") -> None:
        super().__init__()
        hidden = as_widths(hidden)
        check_positive(in_features=in_features, num_classes=num_classes)
        self.in_features, self.num_classes = in_features, num_classes
        widths = (in_features, *hidden)
        self.flatten = nn.Flatten()
        self.hidden = nn.ModuleList(BinaryLinear(a, b) for a, b in zip(widths, widths[1:]))
        for layer in self.hidden:
            nn.init.uniform_(layer.weight, -1, 1)
            nn.init.zeros_(layer.bias)
        self.acts = nn.ModuleList(SignActivation(relaxation) for _ in hidden)
        self.out = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        for layer, act in zip(self.hidden, self.acts):
            x = act(layer(x))
        return self.out(x)

    def clip_(self) -> None:
        """Clip the latent binary weights to ``[-1, 1]`` (after each optimiser step)."""
        for layer in self.hidden:
            layer.clip_()

    def after_step(self) -> None:
        """Called by ``ulr train`` after every optimiser step: :meth:`clip_`."""
        self.clip_()

    def ulr_config(self) -> ULRConfig:
        """``sigma`` 0.3 (units flip only when the noise crosses the threshold) for the binary
        layers and 0.1 for ``out``; ``num_copies`` 64 / 32."""
        names = [f"hidden.{i}" for i in range(len(self.hidden))]
        return {"sigma": {**dict.fromkeys(names, 0.3), "out": 0.1},
                "num_copies": {**dict.fromkeys(names, 64), "out": 32}}


class BlackBoxMLP(nn.Module):
    """``Flatten -> Linear -> NumpyBlackBox -> Linear``: a hidden nonlinearity computed in numpy.

    Backprop cannot pass the black box: its reference (``relaxation="tanh"``) replaces it with
    the ``tanh`` it quantises. Sites: ``fc1`` and ``out`` (closed form; the whole estimate runs
    without an autograd graph).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128,
                 relaxation: Literal["none", "tanh"] = "none", levels: int = 16) -> None:
        super().__init__()
        check_positive(in_features=in_features, num_classes=num_classes, hidden=hidden)
        if relaxation not in ("none", "tanh"):
            raise ValueError(f"BlackBoxMLP relaxation must be 'none' or 'tanh', got "
                             f"{relaxation!r}")
        self.in_features, self.num_classes, self.relaxation = in_features, num_classes, relaxation
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)

        def table(a: np.ndarray) -> np.ndarray:
            return quantized_tanh(a, levels)

        table.__name__ = f"quantized_tanh_{levels}"
        self.box: nn.Module = nn.Tanh() if relaxation == "tanh" else NumpyBlackBox(table)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.box(self.fc1(self.flatten(x))))

    def ulr_config(self) -> ULRConfig:
        """``sigma`` 0.1 and ``num_copies`` 64 / 32 (starting points)."""
        return {"sigma": {"fc1": 0.1, "out": 0.1}, "num_copies": {"fc1": 64, "out": 32}}
