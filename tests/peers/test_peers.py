"""ulr.peers: the registry, and the contract every peer keeps (a generic suite over
every peer: gradients, rows, the model unchanged, accumulation, determinism, state, errors).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from peer_cases import (
    PEERS,
    RANDOM,
    ROWS_PER_EXAMPLE,
    assert_unchanged,
    batch,
    gen,
    grads,
    snapshot,
)
from torch import nn

import ulr
import ulr.peers as peers
from ulr.peers import SPSA, EvolutionStrategies, ForwardGradient


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


def test_arguments_lists_what_build_accepts():
    from ulr import peers

    assert peers.arguments("es")[:2] == ["sigma", "population"]
    for name in peers.available():
        assert "generator" in peers.arguments(name) and "model" not in peers.arguments(name)
    with pytest.raises(ValueError, match="unknown peer estimator 'nope'"):
        peers.arguments("nope")
