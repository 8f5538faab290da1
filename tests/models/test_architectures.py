"""One estimator for every architecture: recurrent (no BPTT), graph, spiking, Transformer,
BatchNorm with copies, binarised / black-box parts.

Gradient checks compare the ULR estimate (antithetic, leave-one-out, layer-wise) with
autograd's gradient of the plain loss, which the smoothed loss approaches at the small sigma
used here; each states its K and sigma and asserts a per-parameter cosine >= 0.9.
"""

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from torch import nn

import ulr
from ulr.data import graphs
from ulr.models import gnn
from ulr.models.binary import (
    BinaryLinear,
    BinaryMLP,
    BlackBoxMLP,
    NumpyBlackBox,
    SignActivation,
    zero_one_loss,
)
from ulr.models.norm import CopyBatchNorm, whole_batch
from ulr.models.rnn import RecurrentClassifier
from ulr.models.snn import LIF, SpikingMLP, encode, spike
from ulr.models.transformer import TransformerClassifier

NEW_MODELS = {  # registry name -> an example shape it takes
    "rnn": (6, 3), "gru": (6, 3), "lstm": (6, 3), "transformer": (6, 3), "gcn": (5,),
    "snn": (1, 8, 8), "binary-mlp": (1, 8, 8), "blackbox-mlp": (64,), "resnet5-bn": (1, 8, 8),
}


def _autograd(model, inputs, targets, loss):
    model.zero_grad(set_to_none=True)
    loss(model(*inputs), targets).backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()}


def _ulr(model, inputs, targets, loss, *, k, sigma, sites=None, **kwargs):
    model.zero_grad(set_to_none=True)
    est = ulr.LikelihoodRatio(model, sites=sites, noise=ulr.Gaussian(sigma), num_copies=k,
                              sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                              plan=ulr.plans.layerwise(),
                              generator=torch.Generator().manual_seed(0), **kwargs)
    est.loss_and_grads(loss, inputs, targets)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _cos(a, b):
    return {n: F.cosine_similarity(a[n].flatten(), b[n].flatten(), dim=0).item() for n in a}


def _mean_ce(out, y):
    return ce(out, y).mean()


# -- recurrent nets: per-step sites, no backprop through time ----------------------------------

@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_recurrent_cells_match_bptt_gradient(kind):
    """K = 3000 antithetic copies, sigma = 0.01, T = 5 steps, hidden 8, batch 16."""
    torch.manual_seed(0)
    model = RecurrentClassifier(kind, 3, 4, hidden_size=8)
    x, y = torch.randn(16, 5, 3), torch.randint(0, 4, (16,))
    truth = _autograd(model, (x,), y, _mean_ce)
    cos = _cos(_ulr(model, (x,), y, ce, k=3000, sigma=0.01), truth)
    assert min(cos.values()) > 0.9, cos


def test_cell_sites_fire_once_per_step_and_need_no_autograd():
    """Each step's pre-activation is its own site event (T + 1 records for T steps), and with
    only closed-form Linear sites the whole estimate runs under no_grad (after the first
    call's clean probe, which follows the graph with autograd)."""
    torch.manual_seed(0)
    model = RecurrentClassifier("lstm", 3, 4, hidden_size=8)
    calls = []
    model.cell.lin.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    est = ulr.LikelihoodRatio(model, num_copies=4, plan=ulr.plans.all_sites(),
                              generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(2, 7, 3), torch.randint(0, 4, (2,))
    est.loss_and_grads(ce, x, y)
    # the clean probe with autograd, then the noisy pass (after one try with the noise-free
    # prefix on the B examples, which a recurrence across the first site cannot use)
    assert all(calls[:7]) and not any(calls[7:]) and len(calls) > 14
    calls.clear()
    est.loss_and_grads(ce, x, y)
    assert len(calls) == 7 and not any(calls)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_torch_cells_and_fused_lstm(impl):
    """nn.LSTMCell stepped (site on (h, c) per step) and the fused nn.LSTM (one site on all
    outputs: the local VJP is BPTT inside the module). K = 3000, sigma = 0.01."""
    torch.manual_seed(0)
    model = RecurrentClassifier("lstm", 3, 4, hidden_size=8, impl=impl)
    x, y = torch.randn(16, 5, 3), torch.randint(0, 4, (16,))
    truth = _autograd(model, (x,), y, _mean_ce)
    cos = _cos(_ulr(model, (x,), y, ce, k=3000, sigma=0.01), truth)
    assert min(cos.values()) > 0.9, cos


def test_recurrent_errors():
    with pytest.raises(ValueError, match="unknown recurrent kind"):
        RecurrentClassifier("elman", 3, 2)
    with pytest.raises(ValueError, match=r"\(B, T, 3\)"):
        RecurrentClassifier("rnn", 3, 2)(torch.zeros(2, 3))


# -- graph nets -----------------------------------------------------------------------------------

def _small_sbm():
    return ulr.data.load("sbm", num_nodes=200, num_val=20, num_test=50, average_degree=6)


def _masked_mean(out, targets):
    y, mask = targets
    return (ce(out, y) * mask).sum() / mask.sum()


def test_gcn_matches_autograd():
    """2-layer GCN on a 200-node SBM graph, each row weighted by the loss of its 1-hop
    receptive field (NodeLoss). K = 1000, sigma = 0.01."""
    ds = _small_sbm()
    (x, adj), (y, mask) = ds.train
    torch.manual_seed(0)
    model = gnn.GCN(ds.input_shape[0], ds.num_classes)
    truth = _autograd(model, (x, adj), (y, mask), _masked_mean)
    cos = _cos(_ulr(model, (x, adj), (y, mask), gnn.NodeLoss(adj, hops=model.loss_hops),
                    k=1000, sigma=0.01, replicate=gnn.tile_graph), truth)
    assert min(cos.values()) > 0.9, cos


def test_gcn_own_node_loss_is_biased():
    """With each node's own loss as its weight the first layer's estimate misses the node's
    effect on its neighbours (karate club: cosine ~0.7 however many copies); the receptive-field
    loss removes the bias. K = 2000, sigma = 0.01."""
    ds = ulr.data.load("karate")
    (x, adj), (y, mask) = ds.train
    torch.manual_seed(0)
    model = gnn.GCN(34, 2)
    truth = _autograd(model, (x, adj), (y, mask), _masked_mean)["convs.0.weight"]

    def first_layer(hops):
        g = _ulr(model, (x, adj), (y, mask), gnn.NodeLoss(adj, hops=hops), k=2000, sigma=0.01,
                 replicate=gnn.tile_graph)["convs.0.weight"]
        return F.cosine_similarity(g.flatten(), truth.flatten(), dim=0).item()

    own, field = first_layer(0), first_layer(1)
    assert own < 0.85 and field > 0.95, (own, field)


def test_shared_and_block_diagonal_adjacency_give_the_same_estimate():
    ds = ulr.data.load("karate")
    (x, adj), (y, mask) = ds.train
    torch.manual_seed(0)
    model = gnn.GCN(34, 2)
    loss = gnn.NodeLoss(adj, hops=1)
    a = _ulr(model, (x, adj), (y, mask), loss, k=8, sigma=0.1, replicate=gnn.tile_graph)
    b = _ulr(model, (x, adj), (y, mask), loss, k=8, sigma=0.1,
             replicate=gnn.block_diagonal_graph)
    for n in a:
        torch.testing.assert_close(a[n], b[n])
    tiled_x, shared = gnn.tile_graph((x, adj), 3)
    assert tiled_x.shape == (102, 34)
    torch.testing.assert_close(gnn.propagate(shared, tiled_x)[34:68], adj @ x)


def test_receptive_field_and_node_loss_scaling():
    ds = ulr.data.load("karate")
    adj = ds.adjacency()
    r0, r1 = gnn.receptive_field(adj, 0).to_dense(), gnn.receptive_field(adj, 1).to_dense()
    assert torch.equal(r0, torch.eye(34))
    assert r1.sum() == 34 + 2 * 78 and torch.equal(r1, r1.T)
    # hops = 0: the weights are the per-node losses over the labelled nodes, scaled N / |T|
    out, (y, mask) = torch.randn(68, 2), ds.train[1]
    w = gnn.NodeLoss(adj, hops=0)(out, (y.repeat(2), mask.repeat(2)))
    want = ce(out, y.repeat(2)) * mask.repeat(2) * 34 / mask.sum()
    torch.testing.assert_close(w, want)


@pytest.mark.skipif(importlib.util.find_spec("torch_geometric") is None,
                    reason="torch_geometric is not installed (optional extra 'ulr[graphs]')")
def test_torch_geometric_gcnconv_through_module_hooks():
    """PyG's GCNConv, unchanged, as sites (its output) with copies as disjoint graphs
    (tile_edge_index). K = 1000, sigma = 0.01."""
    from torch_geometric.nn import GCNConv

    class PyGNet(nn.Module):
        def __init__(self, f, c):
            super().__init__()
            self.conv1, self.conv2 = GCNConv(f, 16), GCNConv(16, c)

        def forward(self, x, edge_index):
            return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)

    ds = _small_sbm()
    (_, adj), (y, mask) = ds.train
    torch.manual_seed(0)
    model = PyGNet(ds.input_shape[0], ds.num_classes)
    inputs = (ds.x, ds.edge_index)
    truth = _autograd(model, inputs, (y, mask), _masked_mean)
    est = _ulr(model, inputs, (y, mask), gnn.NodeLoss(adj, hops=1), k=1000, sigma=0.01,
               sites=ulr.sites.by_type(GCNConv), replicate=gnn.tile_edge_index)
    cos = _cos(est, truth)
    assert min(cos.values()) > 0.9, cos


def test_graph_datasets():
    k = ulr.data.load("karate")
    assert (k.num_nodes, k.edge_index.shape, k.num_classes) == (34, (2, 156), 2)
    assert not (k.train_mask & k.test_mask).any() and (k.train_mask | k.val_mask |
                                                       k.test_mask).all()
    s1, s2 = ulr.data.load("sbm"), ulr.data.load("sbm")
    assert s1.num_nodes == 3000 and torch.equal(s1.edge_index, s2.edge_index)
    assert int(s1.train_mask.sum()) == 100 and int(s1.test_mask.sum()) == 1000
    src, dst = s1.edge_index
    assert (src != dst).all()
    homophily = (s1.y[src] == s1.y[dst]).float().mean()
    assert 0.7 < homophily < 0.9
    assert not torch.equal(ulr.data.load("sbm", seed=1).train_mask, s1.train_mask)


@pytest.mark.skipif(importlib.util.find_spec("networkx") is None,
                    reason="networkx is not installed; the embedded karate edge list is used")
def test_embedded_karate_club_matches_networkx():
    import networkx as nx

    g = nx.karate_club_graph()
    edges = {tuple(sorted(e)) for e in g.edges()}
    assert edges == set(graphs.KARATE_EDGES)
    assert [int(g.nodes[i]["club"] != "Mr. Hi") for i in range(34)] == list(
        graphs.KARATE_FACTION)


# -- spiking nets ---------------------------------------------------------------------------------

def test_heaviside_spike_has_no_gradient_but_ulr_trains_every_layer():
    torch.manual_seed(0)
    model = SpikingMLP(64, 10, hidden=(32,), num_steps=6)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    grads = _autograd(model, (x,), y, _mean_ce)
    assert grads["fcs.0.weight"].abs().max() == 0  # nothing flows through the spike
    est = _ulr(model, (x,), y, ce, k=8, sigma=0.1)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in est.values())
    surrogate = SpikingMLP(64, 10, hidden=(32,), num_steps=6, surrogate="fast-sigmoid")
    surrogate.load_state_dict(model.state_dict())
    torch.testing.assert_close(surrogate(x), model(x))  # same forward
    assert _autograd(surrogate, (x,), y, _mean_ce)["fcs.0.weight"].abs().max() > 0


def test_lif_and_encoders():
    current = torch.tensor([[[0.6], [0.6], [0.0], [2.5]]])  # [N=1, T=4, H=1]
    spikes = LIF(beta=1.0, threshold=1.0)(current)
    assert spikes.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]  # 0.6, 1.2 -> fire, 0.2, 2.7
    x = torch.tensor([[1.0, 0.5, 0.0]])
    lat = encode(x, 5, "latency")
    assert lat.sum(1).tolist() == [[1.0, 1.0, 0.0]] and lat[0, 0, 0] == 1 and lat[0, 2, 1] == 1
    rate = encode(x.expand(2000, 3), 4, "rate", torch.Generator().manual_seed(0))
    assert abs(rate[:, :, 1].mean().item() - 0.5) < 0.03 and rate[:, :, 2].sum() == 0
    assert spike(torch.tensor([-0.1, 0.0])).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="surrogate"):
        spike(torch.zeros(1), "arctan")


# -- Transformer ----------------------------------------------------------------------------------

def test_transformer_every_site_matches_autograd():
    """Projections (closed form), LayerNorms and the position table (local VJPs).
    K = 1500, sigma = 0.01, d_model 8, 2 heads, 4 tokens, batch 8."""
    torch.manual_seed(0)
    model = TransformerClassifier(3, 4, max_len=4, d_model=8, num_heads=2)
    x, y = torch.randn(8, 4, 3), torch.randint(0, 4, (8,))
    truth = _autograd(model, (x,), y, _mean_ce)
    cos = _cos(_ulr(model, (x,), y, ce, k=1500, sigma=0.01), truth)
    assert min(cos.values()) > 0.9, cos


# -- BatchNorm with copies ------------------------------------------------------------------------

def test_copy_batchnorm_is_batchnorm_outside_a_perturbed_pass():
    torch.manual_seed(0)
    ours, ref = CopyBatchNorm(3), nn.BatchNorm2d(3)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_copy_batchnorm_normalises_each_copy_on_its_own():
    """Inside a K-copy pass the rows of copy k are normalised with copy k's statistics only,
    and the estimator does not warn."""
    torch.manual_seed(0)
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 3), CopyBatchNorm(3, affine=False)

        def forward(self, x):
            v = self.lin(x)
            seen["in"], seen["out"] = v, self.bn(v)
            return seen["out"]

    model = Probe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ulr.LikelihoodRatio(model, sites=["lin"], num_copies=3).loss_and_grads(
            lambda o: o.pow(2).sum(1), torch.randn(5, 4))
    v = seen["in"].view(3, 5, 3)  # the last forward: the noisy pass
    want = (v - v.mean(1, keepdim=True)) / torch.sqrt(v.var(1, unbiased=False, keepdim=True)
                                                      + 1e-5)
    torch.testing.assert_close(seen["out"], want.reshape(15, 3), atol=1e-5, rtol=1e-4)


def _bn_net():
    torch.manual_seed(0)
    # No bias before the BatchNorm: its gradient is exactly zero (the mean is subtracted).
    return nn.Sequential(nn.Linear(4, 6, bias=False), CopyBatchNorm(6), nn.Tanh(),
                         nn.Linear(6, 3))


def test_whole_batch_weights_give_the_training_mode_gradient():
    """Examples interact through the batch statistics. With each row weighted by the loss of
    its whole copy of the batch the estimate matches autograd's training-mode gradient
    (K = 20000, sigma = 0.01, batch 4); per-example weights estimate the gradient with the
    statistics held fixed instead."""
    model = _bn_net()
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    truth = _autograd(model, (x,), y, _mean_ce)
    est = _ulr(model, (x,), y, whole_batch(ce, 4), k=20000, sigma=0.01)
    cos = _cos(est, truth)
    assert min(cos.values()) > 0.9, cos


@pytest.mark.slow
def test_resnet5_bn_matches_the_fixed_statistics_gradient():
    """ResNet-5 with CopyBatchNorm on digits: the per-example estimate targets the gradient with
    the batch statistics held fixed (CopyBatchNorm.detach_statistics gives it by autograd).
    Weight noise 1e-3 on conv1/conv2 (the ResNet-5 recommendation), output noise 0.01 elsewhere,
    K = 4000 antithetic copies, batch 64: every parameter's cosine >= 0.9."""
    ds = ulr.data.load("digits", seed=0)
    x, y = ds.train[0][:64], ds.train[1][:64]
    torch.manual_seed(0)
    model = ulr.models.build("resnet5-bn", in_shape=ds.input_shape, num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, CopyBatchNorm)]
    for m in bns:
        m.detach_statistics = True
    truth = _autograd(model, (x,), y, _mean_ce)
    for m in bns:
        m.detach_statistics = False
    model.zero_grad(set_to_none=True)
    wn = ulr.weight_noise(ulr.Gaussian(1e-3))
    est = ulr.LikelihoodRatio(model, noise={"conv1": wn, "conv2": wn, "*": ulr.Gaussian(0.01)},
                              num_copies=4000, sampler=ulr.antithetic(),
                              baseline=ulr.baselines.leave_one_out(), plan=ulr.plans.layerwise(),
                              generator=torch.Generator().manual_seed(0), memory="chunked",
                              chunk_size=500)
    est.loss_and_grads(ce, x, y)
    cos = _cos({n: p.grad for n, p in model.named_parameters()}, truth)
    assert min(cos.values()) >= 0.9, cos


# -- non-differentiable parts ---------------------------------------------------------------------

def test_binary_layer_and_sign_units():
    torch.manual_seed(0)
    layer = BinaryLinear(4, 3)
    x = torch.randn(5, 4)
    hard = torch.where(layer.weight >= 0, 0.5, -0.5)
    torch.testing.assert_close(layer(x), x @ hard.T + layer.bias)
    model = BinaryMLP(16, 3, hidden=(8,))
    x, y = torch.randn(6, 16), torch.randint(0, 3, (6,))
    bp = _autograd(model, (x,), y, _mean_ce)
    assert bp["hidden.0.weight"].abs().max() == 0  # the sign units stop backprop
    est = _ulr(model, (x,), y, zero_one_loss, k=16, sigma=0.5)
    assert est["hidden.0.weight"].abs().sum() > 0
    model.hidden[0].weight.data.mul_(5)
    model.clip_()
    assert model.hidden[0].weight.abs().max() <= 1
    ste = SignActivation("ste")
    u = torch.tensor([-2.0, 0.5], requires_grad=True)
    ste(u).sum().backward()
    assert u.grad.tolist() == [0.0, 1.0]


def test_numpy_black_box_inside_the_network():
    box = NumpyBlackBox()
    x = torch.linspace(-3, 3, 7).view(7, 1).requires_grad_()
    out = box(x)
    assert not out.requires_grad and len(torch.unique(box(torch.randn(1000, 1)))) <= 16
    torch.manual_seed(0)
    model = BlackBoxMLP(8, 3, hidden=16)
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    est = _ulr(model, (x,), y, ce, k=8, sigma=0.1)
    assert all(g.abs().sum() > 0 for g in est.values())
    with pytest.raises(ValueError, match="first .*dimension"):
        NumpyBlackBox(lambda a: a.T)(torch.zeros(2, 3))


# -- registry -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(NEW_MODELS))
def test_registry_builds_every_architecture(name):
    shape = NEW_MODELS[name]
    model = ulr.models.build(name, in_shape=shape, num_classes=4)
    if name == "gcn":
        x = torch.randn(7, 5)
        adj = graphs.normalized_adjacency(torch.tensor([[0, 1], [1, 0]]), 7)
        assert model(x, adj).shape == (7, 4)
    else:
        assert model(torch.rand(2, *shape)).shape == (2, 4)
    config = ulr.models.recommended_config(model)
    owners = {n for n, m in model.named_modules() if any(True for _ in m.parameters(False))}
    assert set(config["sigma"]) == set(config["num_copies"]) == owners


def test_registry_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(T, F\)"):
        ulr.models.build("lstm", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ValueError, match="features per node"):
        ulr.models.build("gcn", in_shape=(3, 4), num_classes=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rnn", "snn"])
def test_short_training_learns(name):
    """A few epochs of ULR on the digits (rows as time steps for the RNN) go far above the
    10% chance level."""
    torch.set_num_threads(2)
    data = "sequential-digits" if name == "rnn" else "digits"
    ds = ulr.data.load(data)
    torch.manual_seed(0)
    model = ulr.models.build(name, in_shape=ds.input_shape, num_classes=10)
    est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.05 if name == "rnn" else 0.1),
                              num_copies=16, sampler=ulr.antithetic(),
                              baseline=ulr.baselines.leave_one_out(),
                              plan=ulr.plans.layerwise(),
                              generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(4):
        for xb, yb in ulr.data.batches(*ds.train, 64, shuffle=True, generator=order):
            opt.zero_grad()
            est.loss_and_grads(ce, xb, yb)
            opt.step()
    with torch.no_grad():
        acc = (model(ds.test[0]).argmax(1) == ds.test[1]).float().mean().item()
    assert acc > 0.5, acc
