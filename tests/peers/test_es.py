"""ulr.peers.EvolutionStrategies: unbiased with raw losses on a quadratic, the direction of
the gradient with centered ranks."""

import pytest
import torch
import torch.nn.functional as F
from peer_cases import flat_grad, gen, least_squares, rel_err
from torch import nn

import ulr
from ulr.peers import EvolutionStrategies


@pytest.mark.parametrize("antithetic", [True, False])
def test_es_raw_unbiased_on_quadratic(antithetic):
    # Unbiased for the smoothed loss's gradient, which equals the true gradient for a quadratic
    # whatever sigma: sigma = 0.5 is large on purpose.
    model, x, y, sq, g = least_squares()
    pop = 4000 if antithetic else 10000
    EvolutionStrategies(model, sigma=0.5, population=pop, antithetic=antithetic, shaping=None,
                        generator=gen(0)).loss_and_grads(sq, x, y)
    # antithetic: 2000 pairs, ~0.06 expected; one-sided: variance ~E[L^2]/sigma^2, ~0.15 here.
    assert rel_err(flat_grad(model), g) < (0.15 if antithetic else 0.35)


def test_es_centered_ranks_follow_the_gradient_direction():
    # Known bias: ranks lose the scale; for a linear loss E[g_hat] is parallel to the gradient.
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    x = torch.randn(16, 6)
    linear = lambda out: out.squeeze(1)  # noqa: E731
    g = torch.cat([x.mean(0), torch.ones(1)])
    EvolutionStrategies(model, sigma=0.1, population=4000, generator=gen(0)).loss_and_grads(
        linear, x)
    est = flat_grad(model)
    assert F.cosine_similarity(est, g, dim=0) > 0.97  # ~0.99 expected at 2000 pairs
    # ... and the scale is the ranks', not the loss's: rescaling the loss changes nothing.
    for transform in (lambda out: 10 * out.squeeze(1) + 3, lambda out: out.squeeze(1) / 64 - 5):
        model.zero_grad(set_to_none=True)
        EvolutionStrategies(model, sigma=0.1, population=4000, generator=gen(0)).loss_and_grads(
            transform, x)
        # equal up to float rounding of near-tied members' losses
        torch.testing.assert_close(flat_grad(model), est, rtol=1e-3, atol=1e-3)


def test_es_takes_any_transform_that_needs_no_clean_losses():
    # leave-one-out over the population: antithetic partners share noise, so they are one group
    # and the baseline cancels in each pair's difference: the same estimate as raw losses.
    model, x, y, sq, _ = least_squares()
    EvolutionStrategies(model, population=6, shaping=None, generator=gen(0)).loss_and_grads(
        sq, x, y)
    raw = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    EvolutionStrategies(model, population=6, shaping=ulr.baselines.leave_one_out(),
                        generator=gen(0)).loss_and_grads(sq, x, y)
    torch.testing.assert_close(flat_grad(model), raw, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs the noise-free losses"):
        EvolutionStrategies(model, shaping=ulr.baselines.clean())
    with pytest.raises(ValueError, match="leave_one_out"):  # one antithetic pair: one group
        EvolutionStrategies(model, population=2, shaping=ulr.baselines.leave_one_out())
