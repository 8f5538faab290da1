"""ulr.peers.EvolutionStrategies: unbiased with raw losses on a quadratic, the direction of
the gradient with centered ranks; the vectorised population against one forward per member."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from peer_cases import RootAndTied, batch, flat_grad, gen, grads, least_squares, rel_err
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


def _both(model, x, y, steps=2, **kw):
    """The gradients of ``steps`` calls of ES vectorised (default) and one member per forward,
    from the same generator, and the vectorised estimator."""
    out, ests = [], []
    for mpf in (None, 1):
        est = EvolutionStrategies(model, members_per_forward=mpf, generator=gen(3), **kw)
        got = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            est.loss_and_grads(ce, x, y)
            got.append(grads(model))
        out.append(got)
        ests.append(est)
    return out, ests[0]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_es_vectorised_population_gives_the_one_by_one_estimate(kind, request):
    model = request.getfixturevalue(kind)
    x, y = batch(kind, b=7)
    # Centered ranks: the same weights, losses equal to rounding, so the same ranks and the
    # same sums: bit-identical.
    (vec, seq), est = _both(model, x, y, population=8)
    assert est.vectorize_error is None and est.last_forward_rows == 8 * 7
    assert all(torch.equal(a, b) for va, vb in zip(vec, seq) for a, b in zip(va, vb))
    # Raw losses enter the estimate: equal to float rounding.
    (vec, seq), _ = _both(model, x, y, population=6, antithetic=False, shaping=None)
    for va, vb in zip(vec, seq):
        for a, b in zip(va, vb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_es_vectorised_in_chunks_and_with_tied_and_root_parameters():
    torch.manual_seed(0)
    model = RootAndTied()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    full, _ = _both(model, x, y, population=10)
    for chunk in (3, 4):
        est = EvolutionStrategies(model, population=10, members_per_forward=chunk,
                                  generator=gen(3))
        model.zero_grad(set_to_none=True)
        est.loss_and_grads(ce, x, y)
        assert all(torch.equal(a, b) for a, b in zip(grads(model), full[1][0]))


def test_es_falls_back_where_vmap_cannot_run():
    # Dropout draws per member from the global RNG on the hook path; vmap refuses random
    # operations, so ES falls back (and stays there) with the same estimate.
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    x, y = batch("mlp")
    results = []
    for mpf in (None, 1):
        torch.manual_seed(5)
        est = EvolutionStrategies(model, population=4, members_per_forward=mpf, generator=gen())
        model.zero_grad(set_to_none=True)
        est.loss_and_grads(ce, x, y)
        results.append(grads(model))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    est = EvolutionStrategies(model, population=4, generator=gen())
    est.loss_and_grads(ce, x, y)
    assert est.vectorize_error is not None and "random" in est.vectorize_error.lower()
    assert not est._vectorize
    model.eval()  # no randomness: vectorised again
    est = EvolutionStrategies(model, population=4, generator=gen())
    est.loss_and_grads(ce, x, y)
    assert est.vectorize_error is None


def test_es_members_per_forward_is_checked(mlp):
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="members_per_forward"):
            EvolutionStrategies(mlp, members_per_forward=bad)


def test_population_runs_vectorised_by_default_only_without_convolutions():
    # benchmarks/es_cost.py: vectorised is 2.3x faster on the digits MLP, no faster for LeNet-5
    # at 28x28, so convolutional models keep one forward per member unless asked.
    def calls(model, **kw):
        count = [0]
        model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        est = EvolutionStrategies(model, population=8,
                                  generator=torch.Generator().manual_seed(0), **kw)
        x = torch.randn(4, 1, 6, 6)
        est.loss_and_grads(lambda o, t: F.cross_entropy(o, t, reduction="none"), x,
                           torch.tensor([0, 1, 0, 1]))
        return count[0]

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 2))
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    assert calls(mlp) == 1
    assert calls(cnn) == 8
    assert calls(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)),
                 members_per_forward=8) == 1
