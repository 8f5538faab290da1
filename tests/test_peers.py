"""Peer estimators (ulr.peers): the LikelihoodRatio contract, oracles, errors.

Statistical tests use fixed seeds and state their tolerance next to the assertion; the
expected relative error of a mean of n i.i.d. direction estimates in d dimensions is about
sqrt((d + 1) / n), and each tolerance is at least twice that.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from torch import nn
from torch.func import functional_call

import ulr
import ulr.peers as peers
from ulr.peers import SPSA, Backprop, EvolutionStrategies, ForwardGradient, weight_noise

PEERS = {
    "backprop": lambda m, g, **kw: Backprop(m, generator=g, **kw),
    "es": lambda m, g, **kw: EvolutionStrategies(m, sigma=0.05, population=6, generator=g, **kw),
    "es_raw_iid": lambda m, g, **kw: EvolutionStrategies(
        m, sigma=0.05, population=3, antithetic=False, shaping=None, generator=g, **kw),
    "es_standardized": lambda m, g, **kw: EvolutionStrategies(
        m, population=4, shaping=peers.standardized(), generator=g, **kw),
    "spsa": lambda m, g, **kw: SPSA(m, num_directions=2, generator=g, **kw),
    "spsa_rademacher": lambda m, g, **kw: SPSA(m, perturbation="rademacher", generator=g, **kw),
    "forward_gradient": lambda m, g, **kw: ForwardGradient(m, num_tangents=2, generator=g, **kw),
}
ROWS_PER_EXAMPLE = {"backprop": 1, "es": 6, "es_raw_iid": 3, "es_standardized": 4, "spsa": 4,
                    "spsa_rademacher": 2, "forward_gradient": 2}
RANDOM = [k for k in PEERS if k != "backprop"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def batch(model_kind, b=5):
    torch.manual_seed(1)
    x = torch.randn(b, 6) if model_kind == "mlp" else torch.randn(b, 1, 5, 5)
    y = torch.randint(0, 4 if model_kind == "mlp" else 3, (b,))
    return x, y


def snapshot(model):
    return {k: (v.detach().clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k][0]), f"{k} changed"
        assert v.data_ptr() == snap[k][1], f"{k} was re-allocated"
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, "a hook was left behind"


def grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


# -- registry -------------------------------------------------------------------------------------
def test_registry(mlp):
    assert peers.available() == ["backprop", "es", "forward-gradient", "spsa"]
    for name in peers.available():
        est = peers.build(name, mlp, generator=gen())
        assert isinstance(est, peers.GradientEstimator)
    assert isinstance(peers.build("Forward_Gradient", mlp), ForwardGradient)
    assert isinstance(ulr.LikelihoodRatio(mlp), peers.GradientEstimator)
    with pytest.raises(ValueError, match="available"):
        peers.build("adam", mlp)
    with pytest.raises(TypeError, match="num_directions"):
        peers.build("spsa", mlp, population=4)


# -- generic contract suite -----------------------------------------------------------------------
@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_grad_shapes_rows_and_model_unchanged(name, model_kind, request):
    model = request.getfixturevalue(model_kind)
    x, y = batch(model_kind)
    snap = snapshot(model)
    est = PEERS[name](model, gen())
    loss = est.loss_and_grads(ce, x, y)
    assert loss.shape == () and not loss.requires_grad
    with torch.no_grad():
        clean = float(ce(model(x), y).mean())
    assert abs(float(loss) - clean) < 0.1 * clean + 0.05
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype
        assert torch.isfinite(p.grad).all()
    assert est.last_forward_rows == ROWS_PER_EXAMPLE[name] * len(x)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", PEERS)
def test_accumulates_like_backward(name, mlp):
    x, y = batch("mlp")
    est = PEERS[name](mlp, gen())
    state = est.state_dict()
    est.loss_and_grads(ce, x, y)
    first = grads(mlp)
    est.load_state_dict(state)  # the same noise again
    est.loss_and_grads(ce, x, y)
    for g1, p in zip(first, mlp.parameters(), strict=True):
        assert torch.equal(p.grad, g1 + g1)


@pytest.mark.parametrize("name", RANDOM)
def test_reproducible_from_generator(name, mlp):
    x, y = batch("mlp")
    runs = []
    for _ in range(2):
        mlp.zero_grad(set_to_none=True)
        PEERS[name](mlp, gen(7)).loss_and_grads(ce, x, y)
        runs.append(grads(mlp))
    mlp.zero_grad(set_to_none=True)
    PEERS[name](mlp, gen(8)).loss_and_grads(ce, x, y)
    other = grads(mlp)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))
    # the global RNG is neither used nor reseeded once a generator is given
    torch.manual_seed(123)
    before = torch.get_rng_state()
    PEERS[name](mlp, gen(7)).loss_and_grads(ce, x, y)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", RANDOM)
def test_state_dict_resumes_exactly(name, mlp):
    x, y = batch("mlp")
    a = PEERS[name](mlp, gen(3))
    a.loss_and_grads(ce, x, y)
    state = a.state_dict()
    mlp.zero_grad(set_to_none=True)
    a.loss_and_grads(ce, x, y)
    expected = grads(mlp)
    b = PEERS[name](mlp, gen(99))
    b.load_state_dict(state)
    mlp.zero_grad(set_to_none=True)
    b.loss_and_grads(ce, x, y)
    assert all(torch.equal(e, g) for e, g in zip(expected, grads(mlp), strict=True))
    with pytest.raises(ValueError, match="generator"):
        b.load_state_dict({})


@pytest.mark.parametrize("name", PEERS)
def test_model_unchanged_when_loss_raises(name, cnn):
    x, y = batch("cnn")
    snap = snapshot(cnn)
    calls = []

    def flaky(out, t):
        calls.append(1)
        if len(calls) == 2 or name == "backprop":
            raise RuntimeError("boom")
        return ce(out, t)

    with pytest.raises(RuntimeError, match="boom"):
        PEERS[name](cnn, gen()).loss_and_grads(flaky, x, y)
    assert_unchanged(cnn, snap)
    assert all(p.grad is None for p in cnn.parameters())


@pytest.mark.parametrize("name", PEERS)
def test_model_unchanged_when_forward_raises(name):
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            self.a(x)
            raise RuntimeError("forward failed after a ran")

    model = Fails()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="forward failed"):
        PEERS[name](model, gen()).loss_and_grads(ce, torch.randn(4, 3), torch.zeros(4).long())
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", PEERS)
def test_inputs_tuple_dict_and_no_targets(name):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    model = Two()
    u, v = torch.randn(5, 3), torch.randn(5, 4)

    def row_loss(out):
        return out.pow(2).sum(1)

    est = PEERS[name](model, gen())
    est.loss_and_grads(row_loss, (u, v))
    est.loss_and_grads(row_loss, {"u": u, "v": v})
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", PEERS)
def test_errors(name, mlp):
    x, y = batch("mlp")
    est = PEERS[name](mlp, gen())
    with pytest.raises(ValueError, match="reduction='none'"):
        est.loss_and_grads(lambda o, t: F.cross_entropy(o, t), x, y)
    with pytest.raises(ValueError, match="non-finite"):
        est.loss_and_grads(lambda o, t: ce(o, t) * float("nan"), x, y)
    with pytest.raises(TypeError, match="one loss per row"):
        est.loss_and_grads(lambda o, t: 1.0, x, y)
    with pytest.raises(TypeError, match="callable"):
        est.loss_and_grads(None, x, y)
    assert all(p.grad is None for p in mlp.parameters())
    with pytest.raises(TypeError, match="generator"):
        PEERS[name](mlp, 0)
    with pytest.raises(TypeError, match="nn.Module"):
        PEERS[name](lambda x: x, gen())


@pytest.mark.parametrize("name", PEERS)
def test_exclude_and_frozen(name, mlp):
    x, y = batch("mlp")
    mlp[0].bias.requires_grad_(False)
    est = PEERS[name](mlp, gen(), exclude=["4.*"])
    est.loss_and_grads(ce, x, y)
    assert mlp[0].bias.grad is None and mlp[4].weight.grad is None and mlp[4].bias.grad is None
    assert mlp[0].weight.grad is not None and mlp[2].weight.grad is not None
    with pytest.raises(ValueError, match="matches no parameter"):
        PEERS[name](mlp, gen(), exclude=["nope"])
    with pytest.raises(ValueError, match="no trainable parameter"):
        PEERS[name](mlp, gen(), exclude=["*"])


def test_constructor_errors(mlp):
    with pytest.raises(ValueError, match="sigma"):
        EvolutionStrategies(mlp, sigma=0.0)
    with pytest.raises(ValueError, match="even"):
        EvolutionStrategies(mlp, population=5)
    with pytest.raises(TypeError, match="shaping"):
        EvolutionStrategies(mlp, shaping="ranks")
    with pytest.raises(ValueError, match="eps"):
        SPSA(mlp, eps=-1.0)
    with pytest.raises(ValueError, match="num_directions"):
        SPSA(mlp, num_directions=0)
    with pytest.raises(ValueError, match="perturbation"):
        SPSA(mlp, perturbation="uniform")
    with pytest.raises(ValueError, match="num_tangents"):
        ForwardGradient(mlp, num_tangents=1.5)


# -- oracles --------------------------------------------------------------------------------------
def test_backprop_is_autograd(cnn):
    x, y = batch("cnn")
    ce(cnn(x), y).mean().backward()
    expected = grads(cnn)
    cnn.zero_grad(set_to_none=True)
    loss = Backprop(cnn).loss_and_grads(ce, x, y)
    assert all(torch.equal(e, g) for e, g in zip(expected, grads(cnn), strict=True))
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(ce(cnn(x), y).mean()))
    with pytest.raises(ValueError, match="differentiable"):
        Backprop(cnn).loss_and_grads(lambda o, t: (o.argmax(1) != t).float(), x, y)


def least_squares(seed=0, d=6, b=16, dtype=torch.float32):
    """A model whose mean loss is an exact quadratic in its weights, and that gradient."""
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).to(dtype)
    x, y = torch.randn(b, d, dtype=dtype), torch.randn(b, dtype=dtype)

    def sq(out, t):
        return (out.squeeze(1) - t) ** 2

    sq(model(x), y).mean().backward()
    g = torch.cat([model.weight.grad.flatten(), model.bias.grad])
    model.zero_grad(set_to_none=True)
    return model, x, y, sq, g


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("perturbation", ["gaussian", "rademacher"])
def test_spsa_unbiased_on_quadratic(perturbation):
    model, x, y, sq, g = least_squares()
    SPSA(model, eps=0.3, num_directions=2000, perturbation=perturbation,
         generator=gen(0)).loss_and_grads(sq, x, y)
    # d + 1 = 8, n = 2000: expected relative error ~0.06 (Gaussian), less for Rademacher.
    assert rel_err(flat_grad(model), g) < 0.15


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


def test_forward_gradient_unbiased_on_nonlinear_loss():
    # (The exact check is test_forward_gradient_matches_naive_reference; this one checks
    # E[v vᵀ] = I end to end.)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))  # d = 9

    def logistic(out, t):
        return F.softplus(-out.squeeze(1) * t)

    x, y = torch.randn(16, 2), torch.randn(16).sign()
    logistic(model(x), y).mean().backward()
    g = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    ForwardGradient(model, num_tangents=800, generator=gen(0)).loss_and_grads(logistic, x, y)
    # d + 1 = 10, n = 800: expected relative error ~0.11.
    assert rel_err(flat_grad(model), g) < 0.3


def seeds_of(generator, n):
    return torch.randint(0, 2**62, (n,), generator=generator).tolist()


def perturbed_loss(model, loss_fn, x, y, seed, scale):
    params = dict(model.named_parameters())
    with torch.no_grad():
        w = {k: p + scale * weight_noise(p, seed, j) for j, (k, p) in enumerate(params.items())}
        return float(loss_fn(functional_call(model, w, (x,)), y).double().mean())


class RootAndTied(nn.Module):
    """A root-owned parameter used across the whole forward, and a weight shared by two
    modules (named_parameters lists it once)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x * self.scale)))) * self.scale)


def test_weight_noise_estimators_match_naive_reference():
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
                expected[j] += c * weight_noise(p, s, j)
        for e, p in zip(expected, model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9)


def test_forward_gradient_matches_naive_reference():
    torch.manual_seed(0)
    model = RootAndTied()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ce(model(x), y).mean().backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ForwardGradient(model, num_tangents=2, generator=gen(4)).loss_and_grads(ce, x, y)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for s in seeds_of(gen(4), 2):
        v = [weight_noise(p, s, j) for j, p in enumerate(model.parameters())]
        slope = sum(float((gj * vj).sum()) for gj, vj in zip(g, v, strict=True))
        for e, vj in zip(expected, v, strict=True):
            e += slope / 2 * vj
    for e, p in zip(expected, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


def test_weight_noise_is_regenerable_and_standard():
    p = torch.empty(200, 50)
    a, b = weight_noise(p, 11, 3), weight_noise(p, 11, 3)
    assert torch.equal(a, b) and not torch.equal(a, weight_noise(p, 11, 4))
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02  # 10^4 samples
    r = weight_noise(p, 11, 3, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert weight_noise(p.half(), 1, 0).dtype == torch.float16


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


def test_forward_gradient_limitations_are_explained():
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    snap = snapshot(bn)
    x, y = torch.randn(5, 3), torch.zeros(5).long()
    with pytest.raises(RuntimeError, match="BatchNorm in training mode"):
        ForwardGradient(bn, generator=gen()).loss_and_grads(ce, x, y)
    assert_unchanged(bn, snap)
    bn.eval()
    ForwardGradient(bn, generator=gen()).loss_and_grads(ce, x, y)  # frozen statistics: fine

    class LSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    with pytest.raises(RuntimeError, match="nn.LSTM"):
        ForwardGradient(LSTM(), generator=gen()).loss_and_grads(ce, torch.randn(5, 2, 3), y)


def test_weights_are_swapped_not_rewritten():
    # During a module's forward it sees a perturbed copy of its own weights only; the original
    # storage is never written to and is put back afterwards.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    ptrs = [p.data_ptr() for p in model.parameters()]
    seen = []

    def spy(module, args, output):
        seen.append((model[0].weight.data_ptr(), model[1].weight.data_ptr()))

    model[1].register_forward_hook(spy)  # runs before the estimator's restoring hook
    SPSA(model, generator=gen()).loss_and_grads(ce, torch.randn(4, 3), torch.zeros(4).long())
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert len(seen) == 2
    assert all(a == ptrs[0] and b != ptrs[2] for a, b in seen)  # layer 0 restored, 1 perturbed


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


def test_backprop_leaves_unreached_parameters_alone():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x)

    model = Unused()
    Backprop(model).loss_and_grads(lambda o: o.pow(2).sum(1), torch.randn(4, 3))
    assert model.a.weight.grad is not None and model.unused.weight.grad is None  # as backward()
