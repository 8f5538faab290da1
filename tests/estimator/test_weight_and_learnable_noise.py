"""Weight-noise sites against a hand computation and autograd; the learnable-σ gradient against
a finite difference of the smoothed loss; σ schedules."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from torch import nn

import ulr


def test_weight_noise_matches_a_hand_computation():
    """Per-example weights W + E_n: the estimate is mean_n L_n E_n/σ² under the same draws."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x, t = torch.randn(4, 3), torch.randn(4, 2)
    sigma, k = 0.2, 3
    est = ulr.LikelihoodRatio(layer, noise=ulr.weight_noise(ulr.Gaussian(sigma)), num_copies=k,
                              baseline=ulr.baselines.none(),  # the hand computation's weights
                              generator=torch.Generator().manual_seed(0))
    est.loss_and_grads(lambda o, y: ((o - y) ** 2).sum(1), x, t)
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")  # the draws of the estimator's sampler, iid()
    e = ulr.iid().sample(ulr.Gaussian(sigma), k, torch.Size((4, 2, 3)), generator=gen,
                         device=cpu).view(k * 4, 2, 3)
    eb = ulr.iid().sample(ulr.Gaussian(sigma), k, torch.Size((4, 2)), generator=gen,
                          device=cpu).view(k * 4, 2)
    rows, targets = x.repeat(k, 1), t.repeat(k, 1)
    with torch.no_grad():
        out = layer(rows) + torch.einsum("ri,roi->ro", rows, e) + eb
    loss = ((out - targets) ** 2).sum(1)
    want_w = (loss[:, None, None] * e / sigma**2).mean(0)
    want_b = (loss[:, None] * eb / sigma**2).mean(0)
    torch.testing.assert_close(layer.weight.grad, want_w)
    torch.testing.assert_close(layer.bias.grad, want_b)


def test_weight_noise_is_exactly_unbiased_for_a_linear_loss():
    """L = c·((W+E)x + b + e): E[L E/σ²] = c xᵀ. 150 seeded estimates within 5 SE."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(4, 2, 5, 5)
    c = torch.randn(3, 5, 5)
    conv.zero_grad()
    (conv(x) * c).sum(dim=(1, 2, 3)).mean().backward()
    truth = conv.weight.grad.clone()
    est = ulr.LikelihoodRatio(conv, noise=ulr.weight_noise(ulr.Gaussian(0.1)), num_copies=8,
                              sampler=ulr.antithetic(), generator=torch.Generator().manual_seed(1))
    samples = []
    for _ in range(150):
        conv.zero_grad(set_to_none=True)
        est.loss_and_grads(lambda o: (o * c).sum(dim=(1, 2, 3)), x)
        samples.append(conv.weight.grad.clone())
    s = torch.stack(samples)
    se = s.std(0) / len(s) ** 0.5
    assert ((s.mean(0) - truth).abs() / se).max() < 5


def test_weight_noise_mixed_with_output_noise_approaches_autograd():
    """Weight noise on the first conv, output noise after it (the ULR authors' CNN recipe):
    per-layer cosine with autograd ≥ 0.9 at K = 4000 antithetic copies, layer-wise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 5 * 5, 3))
    x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))
    ce(model(x), y).mean().backward()
    truth = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    sites = ulr.sites.by_name({"0": ulr.weight_noise(ulr.Gaussian(0.01)),
                               "3": ulr.Gaussian(0.01)})
    est = ulr.LikelihoodRatio(model, sites=sites, num_copies=4000, sampler=ulr.antithetic(),
                              baseline=ulr.baselines.leave_one_out(), plan=ulr.plans.layerwise(),
                              generator=torch.Generator().manual_seed(0))
    est.loss_and_grads(ce, x, y)
    cos = [F.cosine_similarity(p.grad.flatten(), t.flatten(), dim=0).item()
           for p, t in zip(model.parameters(), truth)]
    assert min(cos) >= 0.9, cos


def test_weight_noise_needs_a_linear_or_conv():
    with pytest.raises(ValueError, match="weight noise needs a plain nn.Linear"):
        ulr.LikelihoodRatio(nn.Sequential(nn.LayerNorm(3)),
                            noise=ulr.weight_noise(ulr.Gaussian(0.1)))
    with pytest.raises(TypeError):
        ulr.weight_noise(0.1)


def _smoothed(model, x, t, eps, log_sigma):
    """Monte Carlo smoothed loss with common random numbers eps [M, B, out]."""
    with torch.no_grad():
        v = model[0](x)
        out = model[2](torch.tanh(v.unsqueeze(0) + eps * log_sigma.exp()))
        return ((out - t) ** 2).sum(-1).mean()


@pytest.mark.parametrize("baseline", [ulr.baselines.none, ulr.baselines.leave_one_out])
@pytest.mark.parametrize("noise_cls", [ulr.Gaussian, ulr.Laplace, ulr.Logistic])
def test_learnable_scale_gradient_matches_finite_difference(noise_cls, baseline):
    """∂F/∂ln σ per unit: the LR estimate (K = 40000 copies, 3 seeds averaged) against a central
    finite difference of the smoothed loss with common random numbers (200k draws). Tolerance:
    10% of the largest entry, well above both estimates' standard errors (≈2-3%)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    for p in model[2].parameters():
        p.requires_grad_(False)
    x, t = torch.randn(2, 3), torch.randn(2, 2)
    sigma = torch.tensor([0.3, 0.5, 0.8, 1.0])
    noise = noise_cls(sigma, learnable=True)
    est = ulr.LikelihoodRatio(model, sites=["0"], noise=noise, num_copies=40000,
                              sampler=ulr.antithetic(), baseline=baseline(),
                              generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        est.loss_and_grads(lambda o, y: ((o - y) ** 2).sum(1), x, t)
    assert est.noise_parameters() == [noise.log_scale]
    got = noise.log_scale.grad / 3
    unit = noise_cls(1.0)
    eps = unit.sample((200_000, 2, 4), generator=torch.Generator().manual_seed(9))
    want = torch.zeros(4)
    h = 1e-2
    for i in range(4):
        up, down = noise.log_scale.detach().clone(), noise.log_scale.detach().clone()
        up[i] += h
        down[i] -= h
        want[i] = (_smoothed(model, x, t, eps, up) - _smoothed(model, x, t, eps, down)) / (2 * h)
    assert (got - want).abs().max() < 0.1 * want.abs().max(), (got, want)


def test_learnable_scale_round_trips_through_state_dict():
    model = nn.Linear(3, 2)
    noise = ulr.Gaussian(0.2, learnable=True)
    est = ulr.LikelihoodRatio(model, noise=noise, num_copies=4)
    est.loss_and_grads(lambda o: o.sum(1), torch.randn(2, 3))
    with torch.no_grad():
        noise.log_scale.fill_(-3.0)
    state = est.state_dict()
    other_noise = ulr.Gaussian(0.2, learnable=True)
    other = ulr.LikelihoodRatio(model, noise=other_noise, num_copies=4)
    other.load_state_dict(state)
    assert other_noise.sigma.item() == pytest.approx(torch.exp(torch.tensor(-3.0)).item())


def test_noise_schedule():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    noises = {"0": ulr.Gaussian(0.2), "2": ulr.Laplace(torch.tensor([0.1, 0.3]))}
    est = ulr.LikelihoodRatio(model, noise=noises)
    sched = ulr.NoiseSchedule(est, lambda step: 0.5**step)
    sched.step()
    sched.step()
    assert noises["0"].sigma == pytest.approx(0.05)
    torch.testing.assert_close(noises["2"].scale, torch.tensor([0.025, 0.075]))
    again = ulr.NoiseSchedule([noises["0"]], lambda step: 1.0)
    assert again.initial == [pytest.approx(0.05)]
    with pytest.raises(ValueError, match="learnable"):
        ulr.NoiseSchedule([ulr.Gaussian(0.1, learnable=True)], lambda s: 1.0)
