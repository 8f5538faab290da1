"""Shared cases of the peer tests (tests/peers): each peer with small settings, batches, model
snapshots, a least-squares oracle and a naive reference for the weight perturbations.

Statistical tests use fixed seeds and state their tolerance next to the assertion; the
expected relative error of a mean of n i.i.d. direction estimates in d dimensions is about
sqrt((d + 1) / n), and each tolerance is at least twice that.
"""

import torch
from torch import nn
from torch.func import functional_call

import ulr.peers as peers
from ulr.peers import SPSA, Backprop, EvolutionStrategies, ForwardGradient, seeded_noise

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


def seeds_of(generator, n):
    return torch.randint(0, 2**62, (n,), generator=generator).tolist()


def perturbed_loss(model, loss_fn, x, y, seed, scale):
    params = dict(model.named_parameters())
    with torch.no_grad():
        w = {k: p + scale * seeded_noise(p, seed, j) for j, (k, p) in enumerate(params.items())}
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
