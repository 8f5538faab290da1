"""Model shapes that once gave a silently wrong gradient (issue 13 §2): each now gives the right
gradient or a clear error, and nothing is written to ``.grad`` on an error."""

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from torch import nn

import ulr


def _mse(out, t):
    return ((out - t) ** 2).mean(1)


def _truth(model, loss_fn, x, y):
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).mean().backward()
    truth = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return truth


def _cosines(model, loss_fn, x, y, num_copies, **kw):
    truth = _truth(model, loss_fn, x, y)
    ulr.LikelihoodRatio(model, num_copies=num_copies, **kw).loss_and_grads(loss_fn, x, y)
    # a parameter whose true gradient is zero (e.g. the forward direction of an RNN whose
    # head reads only the reverse direction's final state) has no direction to compare with
    return {n: F.cosine_similarity(p.grad.flatten(), truth[n].flatten(), dim=0).item()
            for n, p in model.named_parameters() if truth[n].abs().max() > 0}


# -- a parameter used again after the last site -------------------------------------------------
class TiedOutput(nn.Module):
    """The encoder's weight again as the (transposed) output projection: no site follows."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 16)

    def forward(self, x):
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t())


class TiedEmbedding(nn.Module):
    """An embedding reused as the output projection (weight tying as in language models)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, tokens):
        return F.linear(torch.tanh(self.mix(self.emb(tokens).mean(1))), self.emb.weight)


class RootScaleAtTheEnd(nn.Module):
    """A bare parameter of a child-less block, used after the last site."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.body(x) * self.temperature


@pytest.mark.parametrize("case", ["tied-output", "tied-embedding", "root-scale"])
def test_a_use_after_the_last_site_is_refused_with_the_fix(case):
    torch.manual_seed(0)
    if case == "tied-output":
        model, x, y, loss = TiedOutput(), torch.randn(4, 6), torch.randn(4, 6), _mse
        name, sites = "enc.weight", None
    elif case == "tied-embedding":
        model, x, y, loss = TiedEmbedding(), torch.randint(0, 11, (4, 5)), torch.arange(4), ce
        name, sites = "emb.weight", None
    else:
        model, x, y, loss = RootScaleAtTheEnd(), torch.randn(4, 6), torch.arange(4), ce
        # the root owns `temperature`, so by default it is a site itself; name the body only
        name, sites = "temperature", ["body.0", "body.2"]
    est = ulr.LikelihoodRatio(model, num_copies=8, sites=sites)
    with pytest.raises(ValueError, match=rf"'{name}'.*used after the last noise site"
                                         rf"(.|\n)*by_name\(''\)"):
        est.loss_and_grads(loss, x, y)
    assert all(p.grad is None for p in model.parameters())


def test_the_fix_named_in_the_error_gives_the_right_gradient():
    """The output as a site (by_name('') is the root module) covers the second use."""
    torch.manual_seed(0)
    model, x, y = TiedOutput(), torch.randn(8, 6), torch.randn(8, 6)
    cos = _cosines(model, _mse, x, y, 2048,
                   sites=ulr.sites.param_owners() | ulr.sites.by_name(""))
    assert min(cos.values()) >= 0.9, cos


class TiedMiddle(nn.Module):
    """A Linear weight used again, transposed, before another Linear site: only Linear
    modules, so the estimator used to run without autograd and dropped the second use."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 16)
        self.dec = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return self.dec(F.linear(h, self.enc.weight.t()))


def test_a_reuse_feeding_a_linear_site_gets_its_gradient():
    torch.manual_seed(0)
    model, x, y = TiedMiddle(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    truth = _truth(model, ce, x, y)
    # average several estimates: the second use's share is a systematic part of the gradient
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    est = ulr.LikelihoodRatio(model, num_copies=1024, generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        est.loss_and_grads(ce, x, y)
        for n, p in model.named_parameters():
            total[n] += p.grad / 4
    g, t = total["enc.weight"], truth["enc.weight"]
    assert F.cosine_similarity(g.flatten(), t.flatten(), dim=0) >= 0.95
    assert 0.85 <= (g.norm() / t.norm()).item() <= 1.15


# -- modules with nested outputs -----------------------------------------------------------------
class Recurrent(nn.Module):
    """A torch recurrent module whose head reads ``out`` or the final hidden state."""

    def __init__(self, kind, read, *, batch_first=True, bidirectional=False, layers=2,
                 quantize=False):
        super().__init__()
        cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]
        self.rnn = cls(3, 6, num_layers=layers, batch_first=batch_first,
                       bidirectional=bidirectional)
        self.read, self.batch_first, self.quantize = read, batch_first, quantize
        self.head = nn.Linear(6 * (2 if bidirectional and read == "out" else 1), 4)

    def forward(self, x):  # x: [B, T, 3]
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        if self.read == "out":
            feat = (out if self.batch_first else out.transpose(0, 1)).mean(1)
        else:
            h = state[0] if isinstance(state, tuple) else state
            feat = h[-1]
        # round() is flat almost everywhere: autograd would pass no gradient through it
        return self.head(torch.round(feat * 64) / 64 if self.quantize else feat)


@pytest.mark.parametrize("kind,read,batch_first,bidirectional", [
    ("lstm", "out", True, True),
    ("lstm", "h_n", True, False),
    ("gru", "h_n", False, False),
    ("gru", "out", False, True),
    ("rnn", "h_n", True, True),
])
def test_torch_recurrent_modules_are_sites(kind, read, batch_first, bidirectional):
    torch.manual_seed(0)
    model = Recurrent(kind, read, batch_first=batch_first, bidirectional=bidirectional)
    x, y = torch.randn(8, 5, 3), torch.randint(0, 4, (8,))
    cos = _cosines(model, ce, x, y, 1024, generator=torch.Generator().manual_seed(0))
    assert min(cos.values()) >= 0.8, cos


def test_a_non_differentiable_read_of_h_n_still_trains_the_lstm():
    """The head reads a quantised h_n: h_n used to escape the site without noise, so the LSTM
    got no signal. Its gradient now matches the unquantised model's (quantised to 1/64)."""
    torch.manual_seed(0)
    model = Recurrent("lstm", "h_n", quantize=True)
    x, y = torch.randn(8, 5, 3), torch.randint(0, 4, (8,))
    model.quantize = False
    truth = _truth(model, ce, x, y)
    model.quantize = True
    ulr.LikelihoodRatio(model, num_copies=2048, generator=torch.Generator().manual_seed(0)
                        ).loss_and_grads(ce, x, y)
    for n, p in model.named_parameters():
        assert F.cosine_similarity(p.grad.flatten(), truth[n].flatten(), dim=0) >= 0.8, n


class Pair(NamedTuple):
    mean: torch.Tensor
    index: torch.Tensor


class NamedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)

    def forward(self, x):
        h = self.lin(x)
        return Pair(torch.tanh(h), h.argmax(1))


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.gate = nn.Parameter(torch.ones(8))

    def forward(self, x):
        h = self.lin(x)
        return {"value": torch.tanh(h), "gate": torch.sigmoid(h * self.gate), "note": "x"}


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.head = inner, nn.Linear(8, 3)

    def forward(self, x):
        out = self.inner(x)
        if isinstance(out, Pair):
            assert out.index.dtype == torch.long
            return self.head(out.mean)
        assert out["note"] == "x"
        return self.head(out["value"] * out["gate"])


@pytest.mark.parametrize("inner", [NamedOutput, DictOutput])
def test_namedtuple_and_dict_outputs_are_perturbed_leaf_by_leaf(inner):
    torch.manual_seed(0)
    model = Wrapper(inner())
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    cos = _cosines(model, ce, x, y, 4096, generator=torch.Generator().manual_seed(0))
    assert min(cos.values()) >= 0.9, cos


def test_a_site_output_ulr_cannot_look_into_is_refused():
    class Opaque:
        def __init__(self, t):
            self.t = t

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return Opaque(self.lin(x))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.bad = Bad()

        def forward(self, x):
            return self.bad(x).t

    est = ulr.LikelihoodRatio(Outer(), num_copies=4, sites=["bad"])
    with pytest.raises(TypeError, match="site 'bad' returned output of type Opaque"):
        est.loss_and_grads(lambda o: o.sum(1), torch.randn(3, 2))


# -- train-mode randomness in the memory modes ---------------------------------------------------
def _dropout_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 4)).train()


@pytest.mark.parametrize("memory,kw", [("replay", {}), ("chunked", {"chunk_size": 64})])
def test_memory_modes_equal_store_under_dropout(memory, kw):
    """Replay's second forward (and a single chunk's two sweeps) see the same dropout masks."""
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    grads = {}
    for mode, extra in (("store", {}), (memory, kw)):
        model = _dropout_net()
        torch.manual_seed(1)
        ulr.LikelihoodRatio(model, num_copies=64, memory=mode,
                            baseline=ulr.baselines.leave_one_out(),  # two sweeps in chunked
                            generator=torch.Generator().manual_seed(0), **extra
                            ).loss_and_grads(ce, x, y)
        grads[mode] = [p.grad for p in model.parameters()]
        grads[mode + "-rng"] = torch.get_rng_state()
    for a, b in zip(grads["store"], grads[memory]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(grads["store-rng"], grads[memory + "-rng"])


class Recorder(nn.Module):
    """Multiplies by a fresh torch.rand draw (like dropout) and remembers every draw."""

    def __init__(self):
        super().__init__()
        self.draws = []

    def forward(self, x):
        r = torch.rand(x.shape)
        self.draws.append(r)
        return x * (0.5 + r)


def test_chunked_sweeps_replay_each_chunks_model_randomness():
    """Two sweeps over two chunks: each chunk has its own draw, the same in both sweeps."""
    rec = Recorder()
    model = nn.Sequential(nn.Linear(3, 5), rec, nn.Linear(5, 2))
    est = ulr.LikelihoodRatio(model, num_copies=8, memory="chunked", chunk_size=4,
                              plan=ulr.plans.all_sites())
    est.loss_and_grads(ce, torch.randn(2, 3), torch.tensor([0, 1]))
    clean, d = rec.draws[0], rec.draws[1:]
    assert clean.shape[0] == 2 and len(d) == 4
    assert torch.equal(d[0], d[2]) and torch.equal(d[1], d[3]) and not torch.equal(d[0], d[1])


# -- BatchNorm in training mode ------------------------------------------------------------------
class MyBatchNorm(nn.BatchNorm1d):
    """A user subclass: treated like nn.BatchNorm1d."""


def _bn_net(norm=nn.BatchNorm1d):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), norm(16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(),
                         nn.Linear(8, 4)).train()


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, MyBatchNorm])
def test_batchnorm_running_statistics_update_once_from_the_clean_rows(norm):
    model = _bn_net(norm)
    reference = _bn_net(norm)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    buffers = {k: id(v) for k, v in model[1]._buffers.items()}
    ulr.LikelihoodRatio(model, num_copies=32).loss_and_grads(ce, x, y)  # layerwise: 4 sites
    with torch.no_grad():
        reference(x)  # one clean training-mode forward
    bn, ref = model[1], reference[1]
    assert bn.training and int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert {k: id(v) for k, v in bn._buffers.items()} == buffers  # the user's tensors, kept


def test_batchnorm_estimate_is_the_fixed_statistics_gradient():
    """The noisy copies are normalised with the clean batch's statistics: the estimate
    targets the gradient with those statistics held fixed (an autograd oracle)."""
    model = _bn_net()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    bn = model[1]
    h = model[0](x).detach()
    var, mean = torch.var_mean(h, dim=0, correction=0)
    fixed = nn.Sequential(model[0], nn.BatchNorm1d(16), *model[2:]).eval()
    fixed[1].load_state_dict({**bn.state_dict(), "running_mean": mean, "running_var": var})
    truth = _truth(fixed, ce, x, y)
    model.zero_grad(set_to_none=True)
    ulr.LikelihoodRatio(model, num_copies=4096, generator=torch.Generator().manual_seed(0)
                        ).loss_and_grads(ce, x, y)
    names = dict(model.named_parameters())
    for n, t in truth.items():
        assert F.cosine_similarity(names[n].grad.flatten(), t.flatten(), dim=0) >= 0.9, n


def test_batchnorm_called_twice_per_forward_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.lin(self.bn(x)))

    with pytest.raises(ValueError, match=r"BatchNorm \['bn'\] is called more than once"):
        ulr.LikelihoodRatio(Twice().train(), num_copies=4).loss_and_grads(
            lambda o: o.sum(1), torch.randn(5, 4))


# -- empty batch ---------------------------------------------------------------------------------
def test_an_empty_batch_is_refused_and_nothing_written(mlp):
    est = ulr.LikelihoodRatio(mlp, num_copies=4)
    with pytest.raises(ValueError, match=r"batch is empty \(0 rows\)"):
        est.loss_and_grads(ce, torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    assert all(p.grad is None for p in mlp.parameters())


def test_an_output_part_first_unused_gets_noise_once_it_is_read():
    """The clean pass found h_n unused (the head read ``out``); when a later call reads it,
    the step starts over with h_n perturbed instead of dropping that path."""
    torch.manual_seed(0)
    model = Recurrent("lstm", "out")
    x, y = torch.randn(8, 5, 3), torch.randint(0, 4, (8,))
    est = ulr.LikelihoodRatio(model, num_copies=1024, generator=torch.Generator().manual_seed(0))
    est.loss_and_grads(ce, x, y)
    model.read = "h_n"
    truth = _truth(model, ce, x, y)
    est.loss_and_grads(ce, x, y)
    cos = {n: F.cosine_similarity(p.grad.flatten(), truth[n].flatten(), dim=0).item()
           for n, p in model.named_parameters()}
    assert min(cos.values()) >= 0.8, cos


# -- defaults ------------------------------------------------------------------------------------
def test_defaults_are_the_best_measured_configuration(mlp):
    est = ulr.LikelihoodRatio(mlp)
    assert (repr(est.sampler), repr(est.baseline), repr(est.plan)) == (
        "iid()", "leave_one_out()", "layerwise(groups=None, num_copies=None)")
    assert est.num_copies == 32 and repr(ulr.LikelihoodRatio(mlp, num_copies=1).baseline) == (
        "none()")
    from ulr.train import RunConfig
    assert (RunConfig().sampler, RunConfig().baseline, RunConfig().plan) == (
        "iid", "leave-one-out", "layerwise")


def test_a_path_taken_only_without_autograd_is_caught_in_replay():
    """Some modules take another path under no_grad (e.g. nn.TransformerEncoderLayer's fused
    eval-mode kernel, which skips its submodules' hooks): replay's loss forward would then
    miss sites that its gradient forward meets."""
    torch.manual_seed(0)

    class GradDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.norm, self.lin2 = nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3)

        def forward(self, x):
            if torch.is_grad_enabled():
                h = self.lin1(x)
            else:  # a "fused" path: the same function, no module call, no hook
                h = F.linear(x, self.lin1.weight, self.lin1.bias)
            return self.lin2(self.norm(h))

    model = GradDependent()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="fast path"):
        ulr.LikelihoodRatio(model, num_copies=4, memory="replay").loss_and_grads(ce, x, y)
    assert all(p.grad is None for p in model.parameters())
    ulr.LikelihoodRatio(model, num_copies=4).loss_and_grads(ce, x, y)  # store: one forward


def test_inputs_that_require_grad_are_fine():
    """An input with requires_grad (e.g. for an input-gradient elsewhere) is no parameter use:
    weight-noise and output-noise sites take it as it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(4, 6, requires_grad=True), torch.randint(0, 3, (4,))
    for noise in (ulr.Gaussian(0.1), {"0": ulr.weight_noise(ulr.Gaussian(0.01)),
                                      "*": ulr.Gaussian(0.1)}):
        model.zero_grad(set_to_none=True)
        ulr.LikelihoodRatio(model, num_copies=8, noise=noise).loss_and_grads(ce, x, y)
        assert all(p.grad is not None for p in model.parameters())
