"""Samplers (ulr.samplers): copy layouts and groups, the noise blocks, and the quasi-Monte Carlo
sampler's distribution, stratification, unbiasedness and variance (fixed seeds)."""

import pytest
import torch

import ulr


def test_antithetic_layout_and_groups():
    z = ulr.antithetic().sample(ulr.Gaussian(1.0), 6, torch.Size([2, 3]),
                                generator=torch.Generator().manual_seed(0),
                                device=torch.device("cpu"))
    assert z.shape == (6, 2, 3)
    torch.testing.assert_close(z[3:], -z[:3])
    assert ulr.antithetic().copy_groups(6).tolist() == [0, 1, 2, 0, 1, 2]
    assert ulr.iid().copy_groups(3).tolist() == [0, 1, 2]


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


@pytest.mark.parametrize("make", [ulr.iid, ulr.antithetic, ulr.sobol], ids=lambda f: f.__name__)
def test_blocks_hold_every_copy_once_and_equal_sample(make):
    shape = torch.Size([3, 2])
    kw = {"device": torch.device("cpu")}
    whole = make().sample(ulr.Gaussian(1.0), 8, shape, generator=torch.Generator().manual_seed(0),
                           **kw)
    blocks = list(make().blocks(ulr.Gaussian(1.0), 8, shape,
                                 generator=torch.Generator().manual_seed(0), **kw))
    covered = torch.zeros(8, dtype=torch.long)
    for k, z in blocks:  # in an order of the sampler's choosing
        covered[k:k + len(z)] += 1
        assert torch.equal(z, whole[k:k + len(z)])
    assert covered.tolist() == [1] * 8


def test_check_num_copies_and_state_round_trip():
    with pytest.raises(ValueError, match="num_copies must be >= 1"):
        ulr.iid().check_num_copies(0)
    with pytest.raises(ValueError):
        ulr.antithetic().check_num_copies(3)  # pairs need an even count
    sampler = ulr.sobol()
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    sampler.sample(ulr.Gaussian(1.0), 4, torch.Size([2, 3]), generator=gen, device=cpu)
    state, gen_state = sampler.state_dict(), gen.get_state()
    want = sampler.sample(ulr.Gaussian(1.0), 4, torch.Size([2, 3]), generator=gen, device=cpu)
    other = ulr.sobol()
    other.load_state_dict(state)
    gen.set_state(gen_state)
    got = other.sample(ulr.Gaussian(1.0), 4, torch.Size([2, 3]), generator=gen, device=cpu)
    assert torch.equal(got, want)
