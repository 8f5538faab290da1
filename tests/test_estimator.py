"""The estimator against oracles: a naive loop reference (identical noise, float tolerance), an
exactly unbiased case (statistical, fixed seeds), and autograd on an MLP and a CNN."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from reference import reference_grads
from torch import nn

import ulr


def _estimate(model, x, y, seed, **kw):
    model.zero_grad(set_to_none=True)
    est = ulr.LikelihoodRatio(model, generator=torch.Generator().manual_seed(seed), **kw)
    est.loss_and_grads(ce, x, y)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize(
    "sampler,baseline,layerwise",
    [("iid", "none", False), ("antithetic", "leave_one_out", False), ("iid", "clean", True),
     ("antithetic", "none", True), ("iid", "leave_one_out", True)],
)
@pytest.mark.parametrize("noise", [ulr.Gaussian(0.2), ulr.Laplace(0.1)], ids=["gauss", "laplace"])
def test_matches_naive_reference(request, which, sampler, baseline, layerwise, noise):
    model = request.getfixturevalue(which)
    torch.manual_seed(1)
    x = torch.randn(3, 6) if which == "mlp" else torch.randn(3, 1, 6, 6)
    y = torch.randint(0, 4 if which == "mlp" else 3, (3,))
    k = 4
    samplers = {"iid": ulr.iid, "antithetic": ulr.antithetic}
    baselines = {"none": ulr.baselines.none, "leave_one_out": ulr.baselines.leave_one_out,
                 "clean": ulr.baselines.clean}
    got = _estimate(model, x, y, 7, noise=noise, num_copies=k, sampler=samplers[sampler](),
                    baseline=baselines[baseline](),
                    plan=ulr.plans.layerwise() if layerwise else ulr.plans.all_sites())
    want = reference_grads(model, ce, x, y, noise=noise, sampler=samplers[sampler](),
                           num_copies=k, generator=torch.Generator().manual_seed(7),
                           baseline=baseline, layerwise=layerwise)
    for name in want:
        # float32 sums over rows in another order: tolerance relative to the gradient's scale
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5 * scale, msg=name)


def test_exactly_unbiased_linear_loss():
    """A Gaussian site followed by a loss linear in its output: E[estimate] = gradient exactly.

    L = c·(Wx + b + z), so E[L z/σ²] = c and ∇W = mean_b c x_b^T. We average R = 400 seeded
    estimates and require every entry within 5 standard errors (SE from the same estimates);
    the seeds are fixed, so the test is deterministic.
    """
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(8, 5)
    c = torch.tensor([0.5, -1.0, 2.0])
    true_w = (c[:, None] * x.mean(0)[None, :])
    true_b = c
    est = ulr.LikelihoodRatio(layer, noise=ulr.Gaussian(0.3), num_copies=16,
                              generator=torch.Generator().manual_seed(123))
    ws, bs = [], []
    for _ in range(400):
        layer.zero_grad(set_to_none=True)
        est.loss_and_grads(lambda out: out @ c, x)
        ws.append(layer.weight.grad.clone())
        bs.append(layer.bias.grad.clone())
    for samples, truth in ((torch.stack(ws), true_w), (torch.stack(bs), true_b)):
        se = samples.std(0) / len(samples) ** 0.5
        assert ((samples.mean(0) - truth).abs() / se).max() < 5


def test_exactly_unbiased_quadratic_loss_all_noises():
    """MSE on a Linear site: the smoothed loss differs from the clean one by a constant, so the
    LR estimate is unbiased for the plain gradient, for every symmetric noise."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 2)
    x, t = torch.randn(6, 4), torch.randn(6, 2)
    layer.zero_grad()
    F.mse_loss(layer(x), t, reduction="none").sum(1).mean().backward()
    truth = layer.weight.grad.clone()
    for noise in (ulr.Gaussian(0.2), ulr.Laplace(0.2), ulr.Logistic(0.1)):
        est = ulr.LikelihoodRatio(layer, noise=noise, num_copies=64,
                                  baseline=ulr.baselines.leave_one_out(),
                                  generator=torch.Generator().manual_seed(5))
        samples = []
        for _ in range(200):
            layer.zero_grad(set_to_none=True)
            est.loss_and_grads(lambda out, tt: ((out - tt) ** 2).sum(1), x, t)
            samples.append(layer.weight.grad.clone())
        samples = torch.stack(samples)
        se = samples.std(0) / len(samples) ** 0.5
        assert ((samples.mean(0) - truth).abs() / se).max() < 5, noise


def _cosines(model, x, y, **kw):
    model.zero_grad()
    ce(model(x), y).mean().backward()
    truth = {n: p.grad.clone() for n, p in model.named_parameters()}
    got = _estimate(model, x, y, 3, **kw)
    return {n: F.cosine_similarity(got[n].flatten(), truth[n].flatten(), dim=0).item()
            for n in truth}


def test_cosine_with_autograd_mlp(mlp):
    """σ = 0.01, K = 1000 antithetic copies, leave-one-out baseline, layer-wise passes."""
    torch.manual_seed(2)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    cos = _cosines(mlp, x, y, noise=ulr.Gaussian(0.01), num_copies=1000,
                   sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                   plan=ulr.plans.layerwise())
    assert min(cos.values()) >= 0.95, cos


def test_cosine_with_autograd_cnn(cnn):
    """σ = 0.01, K = 16000 antithetic copies (the first conv has 144 noise dimensions per
    example, so it needs more copies than the MLP), leave-one-out baseline, layer-wise passes."""
    torch.manual_seed(2)
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    cos = _cosines(cnn, x, y, noise=ulr.Gaussian(0.01), num_copies=16000,
                   sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                   plan=ulr.plans.layerwise())
    assert min(cos.values()) >= 0.95, cos
