"""Samplers, baselines and plans: exact values of the small transforms, and variance reduction
measured against plain iid noise without a baseline at equal forward rows (fixed seeds)."""

import pytest
import torch
from conftest import ce

import ulr
from ulr.baselines import Context


def test_antithetic_layout_and_groups():
    z = ulr.antithetic().sample(ulr.Gaussian(1.0), 6, torch.Size([2, 3]),
                                generator=torch.Generator().manual_seed(0),
                                device=torch.device("cpu"))
    assert z.shape == (6, 2, 3)
    torch.testing.assert_close(z[3:], -z[:3])
    assert ulr.antithetic().copy_groups(6).tolist() == [0, 1, 2, 0, 1, 2]
    assert ulr.iid().copy_groups(3).tolist() == [0, 1, 2]


def test_leave_one_out_values():
    losses = torch.tensor([[1.0, 10.0], [2.0, 20.0], [6.0, 60.0]])
    out = ulr.baselines.leave_one_out()(losses, Context(torch.arange(3)))
    torch.testing.assert_close(out, torch.tensor([[-3.0, -30.0], [-1.5, -15.0], [4.5, 45.0]]))
    # antithetic partners (same group) are not each other's baseline
    losses = torch.tensor([[1.0], [2.0], [5.0], [8.0]])
    out = ulr.baselines.leave_one_out()(losses, Context(torch.tensor([0, 1, 0, 1])))
    torch.testing.assert_close(out, torch.tensor([[1 - 5.0], [2 - 3.0], [5 - 5.0], [8 - 3.0]]))


def test_clean_and_running_average_and_chain():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ctx = Context(torch.arange(2), clean_losses=torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(ulr.baselines.clean()(losses, ctx),
                               torch.tensor([[0.5, 1.0], [2.5, 3.0]]))
    ra = ulr.baselines.running_average(0.5)
    torch.testing.assert_close(ra(losses, ctx), losses)  # first step: nothing to subtract
    torch.testing.assert_close(ra(losses + 1, ctx), losses + 1 - 2.5)
    assert ra.state_dict() == {"values": {"all": 0.5 * 2.5 + 0.5 * 3.5}}
    fresh = ulr.baselines.running_average(0.5)
    fresh.load_state_dict(ra.state_dict())
    torch.testing.assert_close(fresh(losses, ctx), losses - 3.0)
    chained = ulr.baselines.chain(ulr.baselines.clean(), ulr.baselines.leave_one_out())
    assert chained.needs_clean
    with pytest.raises(ValueError):
        ulr.baselines.running_average(1.0)


def _spread(mlp, x, y, sampler, baseline, plan, k, repeats=40):
    """Mean squared deviation of repeated estimates from their mean, summed over params."""
    est = ulr.LikelihoodRatio(mlp, noise=ulr.Gaussian(0.05), num_copies=k, sampler=sampler,
                              baseline=baseline, plan=plan,
                              generator=torch.Generator().manual_seed(0))
    samples = []
    for _ in range(repeats):
        mlp.zero_grad(set_to_none=True)
        est.loss_and_grads(ce, x, y)
        samples.append(torch.cat([p.grad.flatten() for p in mlp.parameters()]))
    s = torch.stack(samples)
    return (s - s.mean(0)).pow(2).sum(1).mean().item()


def test_variance_reduction_at_equal_forward_rows(mlp):
    """Each technique lowers the empirical variance of the estimate at the same number of
    perturbed forward rows (3 layers x 8 copies for layer-wise = 24 copies all-sites)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    all_sites, layerwise = ulr.plans.all_sites(), ulr.plans.layerwise()
    none, loo = ulr.baselines.none(), ulr.baselines.leave_one_out()
    plain = _spread(mlp, x, y, ulr.iid(), none, all_sites, 24)
    with_loo = _spread(mlp, x, y, ulr.iid(), loo, all_sites, 24)
    anti = _spread(mlp, x, y, ulr.antithetic(), none, all_sites, 24)
    best = _spread(mlp, x, y, ulr.antithetic(), loo, layerwise, 8)
    assert with_loo < plain / 2
    assert anti < plain / 2
    assert best < plain / 4, (plain, with_loo, anti, best)


def test_sobol_rows_are_distributed_as_the_noise():
    """KS distance of each of 3 coordinates over 64 copies x 512 examples below 0.02."""
    z = ulr.sobol().sample(ulr.Laplace(0.5), 64, torch.Size([512, 3]),
                           generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    u = torch.distributions.Laplace(0.0, 0.5).cdf(z.double().reshape(-1, 3)).sort(0).values
    ecdf = torch.arange(1, u.shape[0] + 1, dtype=torch.float64).unsqueeze(1) / u.shape[0]
    assert (u - ecdf).abs().max() < 0.02


def _one_per_shifted_stratum(u, k):
    """Whether some grid {a + j/k} (mod 1) has exactly one of the k points in each cell; the
    valid offsets a form an interval whose upper end is one of the points' offsets."""
    for a in (u % (1 / k)).tolist():
        cells = torch.floor(((u - a + 1e-9) % 1.0) * k).long()
        if sorted(cells.tolist()) == list(range(k)):
            return True
    return False


def test_sobol_copies_are_evenly_spread():
    """The K = 16 copies of an example put one point in each of 16 equal cells of every
    coordinate (cells shifted by the example's random shift), unlike iid draws."""
    def spread(sampler):
        z = sampler.sample(ulr.Gaussian(1.0), 16, torch.Size([4, 5]),
                           generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))
        u = torch.distributions.Normal(0.0, 1.0).cdf(z.double())
        return [_one_per_shifted_stratum(u[:, b, d], 16) for b in range(4) for d in range(5)]

    assert all(spread(ulr.sobol()))
    assert not any(spread(ulr.iid()))


def test_antithetic_sobol_layout_and_wide_sites():
    sampler = ulr.antithetic(ulr.sobol())
    z = sampler.sample(ulr.Gaussian(1.0), 8, torch.Size([2, 21201 + 5]),
                       generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert z.shape == (8, 2, 21206)
    torch.testing.assert_close(z[4:], -z[:4])
    assert sampler.copy_groups(8).tolist() == [0] * 8
    with pytest.raises(ValueError, match="leave_one_out"):
        ulr.baselines.leave_one_out().check(8, sampler.copy_groups(8))


def test_sobol_is_unbiased_and_reduces_variance_on_the_linear_oracle():
    """Loss linear in a Gaussian site: the estimate's mean equals the exact gradient (within 5
    standard errors over 300 seeded estimates) and its variance is far below iid noise."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(8, 5)
    c = torch.tensor([0.5, -1.0, 2.0])
    truth = c[:, None] * x.mean(0)[None, :]
    spreads = {}
    for name, sampler in (("iid", ulr.iid()), ("sobol", ulr.sobol())):
        est = ulr.LikelihoodRatio(layer, noise=ulr.Gaussian(0.3), num_copies=16, sampler=sampler,
                                  baseline=ulr.baselines.none(),  # the same for both samplers
                                  generator=torch.Generator().manual_seed(3))
        samples = []
        for _ in range(300):
            layer.zero_grad(set_to_none=True)
            est.loss_and_grads(lambda out: out @ c, x)
            samples.append(layer.weight.grad.clone())
        s = torch.stack(samples)
        se = s.std(0) / len(s) ** 0.5
        assert ((s.mean(0) - truth).abs() / se).max() < 5, name
        spreads[name] = s.var(0).sum().item()
    assert spreads["sobol"] < spreads["iid"] / 2, spreads


def test_sobol_with_a_per_channel_scale():
    # the scale broadcasts over the site's dimensions, not over the flattened points
    sigma = torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1)
    z = ulr.sobol().sample(ulr.Gaussian(sigma), 64, torch.Size((50, 3, 2, 2)),
                           generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert z.shape == (64, 50, 3, 2, 2)
    std = z.transpose(0, 2).reshape(3, -1).std(dim=1)
    torch.testing.assert_close(std, sigma.flatten(), rtol=0.05, atol=0)
