"""ulr.peers.ForwardGradient: a naive reference with the same tangents, unbiasedness
end to end, and the limitations it explains."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from peer_cases import RootAndTied, assert_unchanged, flat_grad, gen, rel_err, seeds_of, snapshot
from torch import nn

from ulr.peers import ForwardGradient, seeded_noise


def test_forward_gradient_matches_naive_reference():
    torch.manual_seed(0)
    model = RootAndTied()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ce(model(x), y).mean().backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ForwardGradient(model, num_tangents=2, generator=gen(4)).loss_and_grads(ce, x, y)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for s in seeds_of(gen(4), 2):
        v = [seeded_noise(p, s, j) for j, p in enumerate(model.parameters())]
        slope = sum(float((gj * vj).sum()) for gj, vj in zip(g, v, strict=True))
        for e, vj in zip(expected, v, strict=True):
            e += slope / 2 * vj
    for e, p in zip(expected, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


def test_forward_gradient_unbiased_on_nonlinear_loss():
    # (The exact check is test_forward_gradient_matches_naive_reference; this one checks
    # E[v vᵀ] = I end to end.)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))  # d = 9

    def logistic(out, t):
        return F.softplus(-out.squeeze(1) * t)

    x, y = torch.randn(16, 2), torch.randn(16).sign()
    logistic(model(x), y).mean().backward()
    g = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    ForwardGradient(model, num_tangents=800, generator=gen(0)).loss_and_grads(logistic, x, y)
    # d + 1 = 10, n = 800: expected relative error ~0.11.
    assert rel_err(flat_grad(model), g) < 0.3


def test_forward_gradient_limitations_are_explained():
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    snap = snapshot(bn)
    x, y = torch.randn(5, 3), torch.zeros(5).long()
    with pytest.raises(RuntimeError, match="BatchNorm in training mode"):
        ForwardGradient(bn, generator=gen()).loss_and_grads(ce, x, y)
    assert_unchanged(bn, snap)
    bn.eval()
    ForwardGradient(bn, generator=gen()).loss_and_grads(ce, x, y)  # frozen statistics: fine

    class LSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    with pytest.raises(RuntimeError, match="nn.LSTM"):
        ForwardGradient(LSTM(), generator=gen()).loss_and_grads(ce, torch.randn(5, 2, 3), y)
