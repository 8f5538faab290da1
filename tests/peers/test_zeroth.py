"""The weight-perturbation driver shared by ES and SPSA (ulr.peers._zeroth): a naive
reference under the same seeds, modules that must run, BatchNorm in training mode."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from peer_cases import PEERS, RootAndTied, gen, perturbed_loss, seeds_of
from torch import nn

from ulr.peers import SPSA, EvolutionStrategies, ForwardGradient, seeded_noise


def test_weight_perturbation_estimators_match_naive_reference():
    torch.manual_seed(0)
    model = RootAndTied().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    names = [k for k, _ in model.named_parameters()]
    assert len(names) == 6 and "b.weight" not in names  # the tied weight once

    for make, scale, coef in [
        (lambda g: SPSA(model, eps=1e-2, num_directions=3, generator=g), 1e-2,
         lambda lp, lm: (lp - lm) / (2e-2 * 3)),
        (lambda g: EvolutionStrategies(model, sigma=0.05, population=6, shaping=None,
                                       generator=g), 0.05, lambda lp, lm: (lp - lm) / (6 * 0.05)),
    ]:
        model.zero_grad(set_to_none=True)
        make(gen(5)).loss_and_grads(ce, x, y)
        seeds = seeds_of(gen(5), 3)
        expected = [torch.zeros_like(p) for p in model.parameters()]
        for s in seeds:
            c = coef(perturbed_loss(model, ce, x, y, s, scale),
                     perturbed_loss(model, ce, x, y, s, -scale))
            for j, p in enumerate(model.parameters()):
                expected[j] += c * seeded_noise(p, s, j)
        for e, p in zip(expected, model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9)


def test_weight_perturbation_needs_modules_to_run():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return F.linear(x, self.lin.weight, self.lin.bias)  # lin's forward never runs

    model = Functional()
    x, y = torch.randn(4, 3), torch.zeros(4).long()
    for est in (SPSA(model, generator=gen()), EvolutionStrategies(model, generator=gen())):
        with pytest.raises(ValueError, match="never ran"):
            est.loss_and_grads(ce, x, y)
        assert model.lin.weight.grad is None
    ForwardGradient(model, generator=gen()).loss_and_grads(ce, x, y)  # functional_call: fine
    assert model.lin.weight.grad is not None


@pytest.mark.parametrize("name", ["es", "spsa"])
def test_weight_perturbation_warns_about_batchnorm_in_training_mode(name):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.zeros(5).long()
    with pytest.warns(UserWarning, match="running statistics"):
        PEERS[name](model, gen()).loss_and_grads(ce, x, y)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PEERS[name](model, gen()).loss_and_grads(ce, x, y)
