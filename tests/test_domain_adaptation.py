"""DANN rearranged by ULR (examples/domain_adaptation.py): the gradient reversal acts on the LR
signal at the feature extractor's boundary site.

* Exact: with the same noise, F's gradient from the per-row weights ``L_y - λ L_d`` equals the
  gradient from ``L_y`` minus λ times the one from ``L_d`` (the signal is linear in the weights,
  the leave-one-out baseline too), and it is backprop inside F of that one signal.
* Statistical: with many copies, F's ULR gradient points where backprop with a gradient-reversal
  layer points; C's and D's gradients likewise.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ulr

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("domain_adaptation",
                                               ROOT / "examples" / "domain_adaptation.py")
da = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(da)


def _batch(n=8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2 * n, 1, 8, 8, generator=g)
    y = torch.cat([torch.randint(0, 10, (n,), generator=g), torch.full((n,), -1)])
    domain = torch.cat([torch.zeros(n), torch.ones(n)])
    return x, (y, domain)


def _feature_grads(model, loss, x, t, k=8, seed=0):
    est = ulr.LikelihoodRatio(model, sites=["features"], exclude=["classifier.*", "domain.*"],
                              noise=ulr.Gaussian(0.1), num_copies=k,
                              baseline=ulr.baselines.leave_one_out(),
                              generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    est.loss_and_grads(loss, x, t)
    return [p.grad.clone() for p in model.features.parameters()]


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_reversal_is_applied_to_the_lr_signal(float64):
    torch.manual_seed(0)
    model = da.DANN()
    x, t = _batch()
    lam = 0.7
    both = _feature_grads(model, lambda o, t: da.row_losses(o, t)[0] - lam * da.row_losses(o, t)[1],
                          x, t)
    label = _feature_grads(model, lambda o, t: da.row_losses(o, t)[0], x, t)
    domain = _feature_grads(model, lambda o, t: da.row_losses(o, t)[1], x, t)
    for b, gy, gd in zip(both, label, domain):
        assert gd.abs().sum() > 0 and gy.abs().sum() > 0
        torch.testing.assert_close(b, gy - lam * gd, rtol=1e-10, atol=1e-13)


def test_feature_gradient_is_backprop_inside_f_of_the_reversed_signal(float64):
    """Rebuild the boundary signal by hand from the same noise and backprop it through F."""
    torch.manual_seed(0)
    model = da.DANN()
    x, t = _batch()
    lam, k, rows = 0.5, 4, 4 * x.shape[0]

    def loss(o, t):
        ly, ld = da.row_losses(o, t)
        return ly - lam * ld

    got = _feature_grads(model, loss, x, t, k=k, seed=3)
    gen = torch.Generator().manual_seed(3)
    f = model.features(x.repeat(k, 1, 1, 1))
    z = ulr.iid().sample(ulr.Gaussian(0.1), k, torch.Size((x.shape[0], f.shape[1])),
                         generator=gen, device=f.device).reshape(rows, -1)
    xi = f.detach() + z
    with torch.no_grad():
        w = loss((model.classifier(xi), model.domain(xi).squeeze(1)),
                 tuple(v.repeat(k) for v in t)).view(k, -1)
        w = (w - (w.sum(0, keepdim=True) - w) / (k - 1)).reshape(rows, 1)  # leave-one-out
    signal = w * ulr.Gaussian(0.1).score(z) / rows
    want = torch.autograd.grad(f, list(model.features.parameters()), signal)
    for g, v in zip(got, want):
        torch.testing.assert_close(g, v, rtol=1e-10, atol=1e-13)


def test_ulr_dann_gradients_point_like_backprop_with_gradient_reversal():
    torch.manual_seed(0)
    model = da.DANN()
    x, (y, domain) = _batch(16)
    lam = 0.5
    n = 16
    # backprop with the gradient-reversal layer
    f = model.features(x)
    ly = F.cross_entropy(model.classifier(f[:n]), y[:n])
    dom = model.domain(da._Reverse.apply(f, lam)).squeeze(1)
    (ly + F.binary_cross_entropy_with_logits(dom, domain)).backward()
    bp = {name: p.grad.clone() for name, p in model.named_parameters()}
    # ULR: the two estimators of the example, many copies
    model.zero_grad(set_to_none=True)
    heads = [m for m in ulr.hybrid.layers(model) if not m.startswith("features")]
    common = dict(noise=ulr.Gaussian(0.05), num_copies=4000, sampler=ulr.antithetic(),
                  baseline=ulr.baselines.leave_one_out(), plan=ulr.plans.layerwise())
    gen = torch.Generator().manual_seed(1)
    ulr.LikelihoodRatio(model, sites=["features"], exclude=["classifier.*", "domain.*"],
                        generator=gen, **common).loss_and_grads(
        lambda o, t: da.row_losses(o, t)[0] - lam * da.row_losses(o, t)[1], x, (y, domain))
    ulr.LikelihoodRatio(model, sites=heads, exclude=["features.*"], generator=gen,
                        **common).loss_and_grads(
        lambda o, t: sum(da.row_losses(o, t)), x, (y, domain))
    for name, p in model.named_parameters():
        cos = F.cosine_similarity(p.grad.flatten(), bp[name].flatten(), dim=0)
        assert cos > 0.85, (name, float(cos))  # measured 0.90-1.00 at these seeds


def test_reversed_domain_signal_alone_points_like_the_reversal_layer():
    """The domain term alone (the part the reversal acts on, small next to L_y in the full
    objective): F's ULR gradient from the weights ``-λ L_d`` against backprop through the
    gradient-reversal layer. A wrong sign gives a cosine near -1."""
    torch.manual_seed(0)
    model = da.DANN()
    x, (y, domain) = _batch(16)
    lam = 0.5
    dom = model.domain(da._Reverse.apply(model.features(x), lam)).squeeze(1)
    F.binary_cross_entropy_with_logits(dom, domain).backward()
    bp = [p.grad.clone() for p in model.features.parameters()]
    est = ulr.LikelihoodRatio(model, sites=["features"], exclude=["classifier.*", "domain.*"],
                              noise=ulr.Gaussian(0.05), num_copies=4000,
                              sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                              generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    est.loss_and_grads(lambda o, t: -lam * da.row_losses(o, t)[1], x, (y, domain))
    for p, b in zip(model.features.parameters(), bp):
        cos = F.cosine_similarity(p.grad.flatten(), b.flatten(), dim=0)
        assert cos > 0.85, float(cos)
