"""Spiking nets of leaky integrate-and-fire (LIF) neurons with a true Heaviside spike.

ULR never differentiates the spike: the noise goes on the **synaptic input current** (the output
of each ``nn.Linear``), and each Linear's gradient is the closed form ``Σ g x^T`` over all time
steps, so no surrogate gradient and no backward through time or layers is needed. The same
model with ``surrogate="fast-sigmoid"`` is the backprop reference (surrogate-gradient BPTT;
Zenke & Ganguli 2018, the default of snntorch): forward identical, backward uses
``∂S/∂U ≈ 1 / (1 + k|U - θ|)²``.

Layers run one at a time over all steps (a feedforward SNN needs the whole spike train of layer
``l`` before layer ``l+1``), so every Linear is called once per forward on ``[N, T, F]`` and is
one site whose noise has a value per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ._common import ULRConfig, as_widths, check_positive

Encoding = Literal["latency", "rate", "current"]
Surrogate = Literal["fast-sigmoid"] | None

_SIGMA = 0.1
_HIDDEN_COPIES = 64
_OUT_COPIES = 32


class _FastSigmoidSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, slope: float) -> Tensor:
        ctx.save_for_backward(u)
        ctx.slope = slope
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (u,) = ctx.saved_tensors
        return grad / (1 + ctx.slope * u.abs()) ** 2, None


def spike(u: Tensor, surrogate: Surrogate = None, slope: float = 25.0) -> Tensor:
    """Heaviside ``S = 1[u >= 0]``. With ``surrogate=None`` its gradient is zero (ULR needs
    none); with ``"fast-sigmoid"`` backprop uses ``1 / (1 + slope·|u|)²``."""
    if surrogate is None:
        return (u >= 0).to(u.dtype)
    if surrogate == "fast-sigmoid":
        return _FastSigmoidSpike.apply(u, slope)
    raise ValueError(f"unknown surrogate {surrogate!r}; choose None or 'fast-sigmoid'")


class LIF(nn.Module):
    r"""Leaky integrate-and-fire neurons run over a whole current sequence.

    ``U_t = β U_{t-1} + I_t - θ S_{t-1}`` (reset by subtraction), ``S_t = H(U_t - θ)``.
    Shapes: current ``[N, T, H]`` -> spikes ``[N, T, H]`` (0/1). No parameters.
    """

    def __init__(self, beta: float = 0.9, threshold: float = 1.0, surrogate: Surrogate = None,
                 slope: float = 25.0) -> None:
        super().__init__()
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        spike(torch.zeros(1), surrogate)  # validates the name
        self.beta, self.threshold, self.surrogate, self.slope = beta, threshold, surrogate, slope

    def forward(self, current: Tensor) -> Tensor:
        mem = torch.zeros_like(current[:, 0])
        out = torch.zeros_like(current[:, 0])
        spikes = []
        for t in range(current.shape[1]):
            # The reset uses the detached spike (snntorch's default): the surrogate gradient
            # flows through the firing, not through the reset.
            mem = self.beta * mem + current[:, t] - self.threshold * out.detach()
            out = spike(mem - self.threshold, self.surrogate, self.slope)
            spikes.append(out)
        return torch.stack(spikes, dim=1)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, threshold={self.threshold}, surrogate={self.surrogate!r}"


def encode(x: Tensor, num_steps: int, encoding: Encoding,
           generator: torch.Generator | None = None) -> Tensor:
    """Encode intensities ``x [N, F]`` in ``[0, 1]`` as ``[N, T, F]`` input for an SNN.

    - ``"latency"``: one spike per feature at step ``round((1 - x)(T - 1))`` (bright = early);
      features below 0.05 never fire. Deterministic.
    - ``"rate"``: Bernoulli spikes with probability ``x`` at every step (``generator``).
    - ``"current"``: the intensity itself as a constant input current (direct encoding).
    """
    x = x.clamp(0, 1)
    if encoding == "current":
        return x.unsqueeze(1).expand(-1, num_steps, -1)
    if encoding == "rate":
        u = torch.rand(x.shape[0], num_steps, x.shape[1], generator=generator, device=x.device)
        return (u < x.unsqueeze(1)).to(x.dtype)
    if encoding == "latency":
        when = torch.round((1 - x) * (num_steps - 1)).long()
        steps = torch.arange(num_steps, device=x.device).view(1, -1, 1)
        return ((steps == when.unsqueeze(1)) & (x.unsqueeze(1) >= 0.05)).to(x.dtype)
    raise ValueError(f"unknown encoding {encoding!r}; choose 'latency', 'rate' or 'current'")


class SpikingMLP(nn.Module):
    """Feedforward spiking net: encode -> [Linear -> LIF] * len(hidden) -> Linear -> readout.

    The readout is a non-spiking leaky integrator of the last Linear's current; the logits are
    its membrane potential averaged over time. Shapes: ``(B, *in_shape)`` intensities in
    ``[0, 1]`` (flattened) -> ``(B, num_classes)``.

    Sites (param owners): ``fcs.0`` ... ``fcs.{n}`` (the synaptic currents; closed form).

    Args:
        in_features: input features after flattening.
        num_classes: output units.
        hidden: widths of the spiking hidden layers.
        num_steps: simulation steps ``T``.
        encoding: ``"latency"`` (default), ``"rate"`` or ``"current"`` (see :func:`encode`).
        beta: membrane decay per step.
        surrogate: ``None`` (ULR: true Heaviside) or ``"fast-sigmoid"`` (backprop reference).
        seed: seed of the rate encoder's own generator.

    Example:
        >>> SpikingMLP(64, 10, hidden=(32,), num_steps=4)(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (128,),
                 num_steps: int = 16, encoding: Encoding = "latency", beta: float = 0.9,
                 surrogate: Surrogate = None, seed: int = 0) -> None:
        super().__init__()
        hidden = as_widths(hidden)
        check_positive(in_features=in_features, num_classes=num_classes, num_steps=num_steps)
        if encoding not in ("latency", "rate", "current"):
            raise ValueError(f"unknown encoding {encoding!r}; choose 'latency', 'rate' or "
                             f"'current'")
        self.in_features, self.num_classes = in_features, num_classes
        self.num_steps, self.encoding, self.beta = num_steps, encoding, beta
        self._generator = torch.Generator().manual_seed(seed)
        widths = (in_features, *hidden, num_classes)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        # Inputs are sparse 0/1 spikes: scale the first layer up so that hidden neurons fire
        # from the start (torch's default init gives currents far below threshold).
        with torch.no_grad():
            for fc in self.fcs[:-1]:
                fc.weight.mul_(math.sqrt(3.0) * 4)
        self.lifs = nn.ModuleList(LIF(beta, surrogate=surrogate) for _ in hidden)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, *in_shape)`` to ``(B, num_classes)`` logits."""
        x = x.reshape(x.shape[0], -1)
        gen = self._generator if self._generator.device == x.device else None
        s = encode(x, self.num_steps, self.encoding, gen)
        for fc, lif in zip(self.fcs[:-1], self.lifs):
            s = lif(fc(s))
        current = self.fcs[-1](s)
        mem = torch.zeros_like(current[:, 0])
        total = torch.zeros_like(mem)
        for t in range(current.shape[1]):
            mem = self.beta * mem + current[:, t]
            total = total + mem
        return total / current.shape[1]

    def ulr_config(self) -> ULRConfig:
        """``sigma`` 0.1 on every synaptic current; ``num_copies`` 64 for hidden layers
        (``T × width`` noise dimensions), 32 for the readout."""
        names = [f"fcs.{i}" for i in range(len(self.fcs))]
        return {"sigma": dict.fromkeys(names, _SIGMA),
                "num_copies": {n: _HIDDEN_COPIES if i < len(names) - 1 else _OUT_COPIES
                               for i, n in enumerate(names)}}
