"""Noise densities: scores against autograd of the log-density, samples against the
distribution's moments and CDF, inverse CDFs, per-unit scales and argument checks."""

import math

import pytest
import torch

import ulr


def log_density(noise, z):
    s = noise.scale
    if isinstance(noise, ulr.Gaussian):
        return torch.distributions.Normal(0.0, s).log_prob(z)
    if isinstance(noise, ulr.Laplace):
        return torch.distributions.Laplace(0.0, s).log_prob(z)
    return -z / s - 2 * torch.nn.functional.softplus(-z / s) - math.log(s)  # logistic


def cdf(noise, z):
    s = noise.scale
    if isinstance(noise, ulr.Gaussian):
        return torch.distributions.Normal(0.0, s).cdf(z)
    if isinstance(noise, ulr.Laplace):
        return torch.distributions.Laplace(0.0, s).cdf(z)
    return torch.sigmoid(z / s)


NOISES = [ulr.Gaussian(0.3), ulr.Laplace(0.2), ulr.Logistic(0.4)]


@pytest.mark.parametrize("noise", NOISES, ids=repr)
def test_score_is_minus_grad_log_density(noise):
    z = torch.linspace(-2, 2, 41, dtype=torch.float64).requires_grad_()
    z = z[z.abs() > 1e-6].detach().requires_grad_()  # Laplace is not differentiable at 0
    (grad,) = torch.autograd.grad(log_density(noise, z).sum(), z)
    torch.testing.assert_close(noise.score(z.detach()), -grad)


@pytest.mark.parametrize("noise", NOISES, ids=repr)
def test_samples_follow_the_density(noise):
    """Kolmogorov–Smirnov distance of 200k samples to the CDF below 0.005 (expected ~0.002)."""
    g = torch.Generator().manual_seed(0)
    z = noise.sample((200_000,), generator=g, dtype=torch.float64).sort().values
    empirical = torch.arange(1, len(z) + 1, dtype=torch.float64) / len(z)
    assert (cdf(noise, z) - empirical).abs().max() < 0.005
    assert abs(z.mean().item()) < 0.01


@pytest.mark.parametrize("noise", NOISES, ids=repr)
def test_icdf_inverts_cdf(noise):
    u = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    torch.testing.assert_close(cdf(noise, noise.icdf(u)), u)


@pytest.mark.parametrize("noise", NOISES, ids=repr)
def test_score_has_zero_mean_and_is_odd(noise):
    z = noise.sample((100_000,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = noise.score(z)
    assert abs(s.mean().item()) < 5 * s.std().item() / math.sqrt(len(s))
    torch.testing.assert_close(noise.score(-z), -s)


def test_per_unit_scale_broadcasts_and_scores():
    sigma = torch.tensor([0.1, 0.2, 0.4])
    noise = ulr.Gaussian(sigma)
    z = noise.sample((50_000, 3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.std(0), sigma, rtol=0.02, atol=0)
    torch.testing.assert_close(noise.score(z), z / sigma**2)
    noise.check_shape(torch.Size([3]), "s")
    with pytest.raises(ValueError, match="does not broadcast"):
        noise.check_shape(torch.Size([4]), "s")


def test_score_is_float32_under_low_precision():
    z = torch.tensor([0.1, -0.2], dtype=torch.bfloat16)
    assert ulr.Gaussian(0.1).score(z).dtype == torch.float32


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_is_rejected(bad):
    with pytest.raises(ValueError, match="sigma must be"):
        ulr.Gaussian(bad)
    with pytest.raises(ValueError, match="scale must be"):
        ulr.Laplace(bad)


def test_bad_scale_type_is_rejected():
    with pytest.raises(TypeError):
        ulr.Gaussian("0.1")
    with pytest.raises(ValueError, match="> 0 everywhere"):
        ulr.Gaussian(torch.tensor([0.1, 0.0]))
    with pytest.raises(TypeError):
        ulr.Gaussian(torch.tensor([1, 2]))
