"""ulr.peers.Backprop: exactly autograd, and as backward() for unreached parameters."""

import pytest
import torch
from conftest import ce
from peer_cases import batch, grads
from torch import nn

from ulr.peers import Backprop


def test_backprop_is_autograd(cnn):
    x, y = batch("cnn")
    ce(cnn(x), y).mean().backward()
    expected = grads(cnn)
    cnn.zero_grad(set_to_none=True)
    loss = Backprop(cnn).loss_and_grads(ce, x, y)
    assert all(torch.equal(e, g) for e, g in zip(expected, grads(cnn), strict=True))
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(ce(cnn(x), y).mean()))
    with pytest.raises(ValueError, match="differentiable"):
        Backprop(cnn).loss_and_grads(lambda o, t: (o.argmax(1) != t).float(), x, y)


def test_backprop_leaves_unreached_parameters_alone():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x)

    model = Unused()
    Backprop(model).loss_and_grads(lambda o: o.pow(2).sum(1), torch.randn(4, 3))
    assert model.a.weight.grad is not None and model.unused.weight.grad is None  # as backward()
