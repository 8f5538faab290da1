"""Recurrent nets that ULR trains without backpropagation through time.

A recurrent net applies the same cell at every time step. When the estimator sees each step's
value (a site on a module that is *called once per step*), each call is an independent noise
site: the step's noise is added, the value is cut from the previous steps' graph, and the cell's
parameters get the sum over steps of the per-step local gradients. No gradient ever flows from
step ``t`` back to step ``t-1``: there is no backward pass through time.

Three implementations of the same three cells (``impl=``):

- ``"cell"`` (default): each cell owns one ``nn.Linear`` on ``[x_t, h_{t-1}]`` whose output *is*
  the pre-activation of the step (all gates of an LSTM, the two gates of a GRU). Output noise on
  that Linear is noise on the pre-activation, and its gradient has the closed form
  ``Σ_t g_t [x_t, h_{t-1}]^T``: the whole estimate runs without any autograd graph.
  The GRU is the original formulation of Cho et al. (2014) (reset gate applied *before* the
  candidate's matrix product, ``reset_after=False`` in Keras), so that its candidate is also a
  Linear of one concatenated input.
- ``"torch"``: ``nn.RNNCell`` / ``nn.GRUCell`` / ``nn.LSTMCell`` stepped in a Python loop; the
  site is the cell's output (``h``, or both ``h`` and ``c`` for the LSTM), and the cell's
  gradient is the autograd VJP of one step, summed over steps.
- ``"fused"``: one ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` call over the whole sequence. The
  estimator sees a single value (all outputs), so the local VJP of that site is the VJP of the
  whole sequence: **backprop through time inside the module**. It still works, but it is
  BPTT, not ULR-through-time; use a cell implementation to avoid it.

All map ``(B, T, F)`` batch-first sequences to ``(B, num_classes)`` from the last hidden state.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..sites import named_param_owners
from ._common import ULRConfig, check_positive

Kind = Literal["rnn", "gru", "lstm"]
Impl = Literal["cell", "torch", "fused"]
KINDS: tuple[str, ...] = ("rnn", "gru", "lstm")
IMPLS: tuple[str, ...] = ("cell", "torch", "fused")

# Starting points: the cell's pre-activations are O(1) (tanh/sigmoid range); per-step noise of
# 0.05 keeps the tanh/sigmoid near-linear at the noise scale. The recurrent site has T x gates
# noise dimensions per example, so it gets more copies than the head.
_SIGMA = 0.05
_CELL_COPIES = 128
_HEAD_COPIES = 32


class ElmanCell(nn.Module):
    """``h_t = tanh(W [x_t, h_{t-1}] + b)``; the site ``lin`` is the pre-activation.

    Shapes: ``x [N, input_size]``, ``h [N, hidden_size]`` -> ``h [N, hidden_size]``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.lin = nn.Linear(input_size + hidden_size, hidden_size)

    def initial_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.lin(torch.cat([x, h], dim=1)))

    @staticmethod
    def output(state: Tensor) -> Tensor:
        return state


class LSTMCell(nn.Module):
    """LSTM with the four gate pre-activations from one Linear on ``[x_t, h_{t-1}]``.

    ``i, f, g, o = split(W [x_t, h_{t-1}] + b)``; ``c_t = σ(f) c_{t-1} + σ(i) tanh(g)``;
    ``h_t = σ(o) tanh(c_t)``. The forget-gate bias starts at 1. State ``(h, c)``, each
    ``[N, hidden_size]``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.lin = nn.Linear(input_size + hidden_size, 4 * hidden_size)
        with torch.no_grad():
            self.lin.bias[hidden_size : 2 * hidden_size].add_(1.0)

    def initial_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = x.new_zeros(x.shape[0], self.hidden_size)
        return z, z

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, g, o = self.lin(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    @staticmethod
    def output(state: tuple[Tensor, Tensor]) -> Tensor:
        return state[0]


class GRUCell(nn.Module):
    """GRU (Cho et al. 2014) with both pre-activations as Linears of concatenated inputs.

    ``r, z = σ(split(W_g [x_t, h_{t-1}] + b_g))``; ``n = tanh(W_n [x_t, r ⊙ h_{t-1}] + b_n)``;
    ``h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}``. Sites ``gates`` and ``cand``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.gates = nn.Linear(input_size + hidden_size, 2 * hidden_size)
        self.cand = nn.Linear(input_size + hidden_size, hidden_size)

    def initial_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        r, z = torch.sigmoid(self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        n = torch.tanh(self.cand(torch.cat([x, r * h], dim=1)))
        return (1 - z) * n + z * h

    @staticmethod
    def output(state: Tensor) -> Tensor:
        return state


_CELLS = {"rnn": ElmanCell, "gru": GRUCell, "lstm": LSTMCell}
_TORCH_CELLS = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}


def _fused(kind: str) -> type[nn.Module]:
    base = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]

    class Fused(base):  # type: ignore[valid-type, misc]
        """``nn.{RNN,GRU,LSTM}(batch_first=True)`` returning only the outputs ``[N, T, H]``
        (the final state ``[layers, N, H]`` is not batch-first, so it cannot be a site)."""

        def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    Fused.__name__ = Fused.__qualname__ = f"Fused{base.__name__}"
    return Fused


class RecurrentClassifier(nn.Module):
    """A one-layer recurrent net read out from its last hidden state.

    Shapes: ``(B, T, input_size)`` batch-first sequences -> ``(B, num_classes)``
    (``num_classes=1`` for a regression target such as the adding problem).

    Sites (the modules that own parameters, i.e. ``ulr.sites.param_owners()``):

    - ``impl="cell"``: ``cell.lin`` (Elman, LSTM) or ``cell.gates`` + ``cell.cand`` (GRU), one
      closed-form Linear site per step, and ``head``;
    - ``impl="torch"``: ``cell`` (the torch cell's output per step) and ``head``;
    - ``impl="fused"``: ``rnn`` (all outputs at once: BPTT inside the module) and ``head``.

    Args:
        kind: ``"rnn"`` (Elman, tanh), ``"gru"`` or ``"lstm"``.
        input_size: features per time step.
        num_classes: output units.
        hidden_size: state width.
        impl: ``"cell"``, ``"torch"`` or ``"fused"`` (see the module docstring).

    Example:
        >>> RecurrentClassifier("lstm", 8, 10, hidden_size=16)(torch.zeros(2, 5, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, kind: Kind, input_size: int, num_classes: int, hidden_size: int = 64,
                 impl: Impl = "cell") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown recurrent kind {kind!r}; choose one of {list(KINDS)}")
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; choose one of {list(IMPLS)}")
        check_positive(input_size=input_size, num_classes=num_classes, hidden_size=hidden_size)
        self.kind, self.impl = kind, impl
        self.input_size, self.hidden_size, self.num_classes = input_size, hidden_size, num_classes
        if impl == "cell":
            self.cell = _CELLS[kind](input_size, hidden_size)
        elif impl == "torch":
            self.cell = _TORCH_CELLS[kind](input_size, hidden_size)
        else:
            self.rnn = _fused(kind)(input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, T, F)`` to ``(B, num_classes)``."""
        if x.dim() != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"expected batch-first sequences (B, T, {self.input_size}), got "
                             f"shape {tuple(x.shape)}")
        if self.impl == "fused":
            return self.head(self.rnn(x)[:, -1])
        if self.impl == "cell":
            state = self.cell.initial_state(x)
            for t in range(x.shape[1]):
                state = self.cell(x[:, t], state)
            return self.head(self.cell.output(state))
        h = x.new_zeros(x.shape[0], self.hidden_size)
        state = (h, h) if self.kind == "lstm" else h
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if self.kind == "lstm" else state)

    def ulr_config(self) -> ULRConfig:
        """Starting ULR configuration: ``sigma`` 0.05 everywhere; ``num_copies`` 128 for the
        recurrent site(s) (``T × gates`` noise dimensions per example), 32 for ``head``."""
        owners = [n for n, _ in named_param_owners(self, trainable=False)]
        return {"sigma": dict.fromkeys(owners, _SIGMA),
                "num_copies": {n: _HEAD_COPIES if n == "head" else _CELL_COPIES for n in owners}}
