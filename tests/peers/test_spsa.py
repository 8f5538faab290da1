"""ulr.peers.SPSA: unbiased on a quadratic, Gaussian and Rademacher directions."""

import pytest
from peer_cases import flat_grad, gen, least_squares, rel_err

from ulr.peers import SPSA


@pytest.mark.parametrize("perturbation", ["gaussian", "rademacher"])
def test_spsa_unbiased_on_quadratic(perturbation):
    model, x, y, sq, g = least_squares()
    SPSA(model, eps=0.3, num_directions=2000, perturbation=perturbation,
         generator=gen(0)).loss_and_grads(sq, x, y)
    # d + 1 = 8, n = 2000: expected relative error ~0.06 (Gaussian), less for Rademacher.
    assert rel_err(flat_grad(model), g) < 0.15
