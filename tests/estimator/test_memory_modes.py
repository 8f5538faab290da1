"""Memory modes and prefix caching change what is kept and what is recomputed, never the
estimate: under the same generator state they must give the same gradients as store mode."""

import pytest
import torch
from conftest import ce
from torch import nn
from toy_models import Block, Cell

import ulr


def _grads(model, make, inputs, targets, loss=ce):
    model.zero_grad(set_to_none=True)
    est = make()
    mean = est.loss_and_grads(loss, inputs, targets)
    return [p.grad.clone() for p in model.parameters()], mean, est


def _assert_same(a, b):
    # The models run in float64 here: chunks sum the same terms in another order, and without a
    # baseline the terms are far larger than their sum, which float32 would blur.
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


SAMPLERS = {"iid": ulr.iid, "antithetic": ulr.antithetic, "sobol": ulr.sobol}
BASELINES = {"none": ulr.baselines.none, "clean": ulr.baselines.clean,
             "loo": ulr.baselines.leave_one_out, "running": ulr.baselines.running_average}


@pytest.mark.parametrize("memory,chunk", [("chunked", 1), ("chunked", 4), ("chunked", 5),
                                          ("replay", None)])
@pytest.mark.parametrize(  # leave_one_out refuses sobol: test_variance_reduction checks that
    "sampler,baseline",
    [(s, b) for s in SAMPLERS for b in BASELINES if not (s == "sobol" and b == "loo")])
@pytest.mark.parametrize("plan", ["all_sites", "layerwise"])
def test_memory_modes_match_store(cnn, memory, chunk, sampler, baseline, plan):
    cnn.double()
    x, y = torch.randn(3, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))

    def make(mode, size):
        return lambda: ulr.LikelihoodRatio(
            cnn, num_copies=8, sampler=SAMPLERS[sampler](), baseline=BASELINES[baseline](),
            plan=getattr(ulr.plans, plan)(), memory=mode, chunk_size=size,
            generator=torch.Generator().manual_seed(0))

    want, want_mean, est_a = _grads(cnn, make("store", None), x, y)
    got, got_mean, est_b = _grads(cnn, make(memory, chunk), x, y)
    _assert_same(got, want)
    torch.testing.assert_close(got_mean, want_mean)
    # the generator ends where store mode leaves it, so the next step's noise agrees too
    assert torch.equal(est_a.generator.get_state(), est_b.generator.get_state())


@pytest.mark.parametrize("memory,chunk", [("chunked", 3), ("replay", None)])
def test_memory_modes_with_local_vjps_and_marks(memory, chunk):
    torch.manual_seed(0)
    for model, x, y, sites in [
        (Block().double(), torch.randint(0, 10, (4, 5)), torch.randint(0, 3, (4,)), None),
        (Cell().double(), torch.randn(4, 3, 3, dtype=torch.float64), torch.randint(0, 2, (4,)),
         ulr.sites.marked("pre") | ulr.sites.by_name("out")),
    ]:
        def make(mode, size, model=model, sites=sites):
            return lambda: ulr.LikelihoodRatio(
                model, sites=sites, num_copies=6, sampler=ulr.antithetic(),
                baseline=ulr.baselines.leave_one_out(), memory=mode, chunk_size=size,
                generator=torch.Generator().manual_seed(1))

        want, _, _ = _grads(model, make("store", None), x, y)
        got, _, _ = _grads(model, make(memory, chunk), x, y)
        _assert_same(got, want)


def test_replay_keeps_no_records_and_counts_two_sweeps(mlp):
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    est = ulr.LikelihoodRatio(mlp, num_copies=8, memory="replay", plan=ulr.plans.all_sites())
    est.loss_and_grads(ce, x, y)
    assert est.last_forward_rows == 4 + 2 * 8 * 4  # the first call's clean pass: B rows
    est.loss_and_grads(ce, x, y)
    assert est.last_forward_rows == 2 * 8 * 4
    est = ulr.LikelihoodRatio(mlp, num_copies=8, memory="chunked", chunk_size=3,
                              baseline=ulr.baselines.leave_one_out(), plan=ulr.plans.all_sites())
    est.loss_and_grads(ce, x, y)
    est.loss_and_grads(ce, x, y)
    assert est.last_forward_rows == 2 * 8 * 4  # losses first, then gradients


@pytest.mark.parametrize("plan", [ulr.plans.all_sites, ulr.plans.layerwise])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_prefix_caching_gives_the_same_estimate(request, which, plan):
    model = request.getfixturevalue(which).double()
    x = torch.randn(5, 6) if which == "mlp" else torch.randn(5, 1, 6, 6)
    x = x.double()
    y = torch.randint(0, 3, (5,))

    def make(cache):
        return lambda: ulr.LikelihoodRatio(model, num_copies=6, sampler=ulr.antithetic(),
                                           baseline=ulr.baselines.leave_one_out(),
                                           plan=plan(cache_prefix=cache),
                                           generator=torch.Generator().manual_seed(0))

    want, _, _ = _grads(model, make(False), x, y)
    got, _, _ = _grads(model, make(True), x, y)
    _assert_same(got, want)


def test_prefix_caching_runs_the_prefix_on_b_rows():
    seen = []
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    est = ulr.LikelihoodRatio(model, num_copies=8, plan=ulr.plans.layerwise())
    est.loss_and_grads(ce, torch.randn(5, 3), torch.randint(0, 2, (5,)))
    # discovery (5 rows), pass of site 0 (its own input: 5 rows, tiled after), pass of site 2
    assert seen == [5, 5, 5]


def test_prefix_caching_is_on_for_any_model_and_falls_back_per_pass():
    """By default every pass computes its noise-free prefix on the B examples; a pass whose
    model combines a value from before its first perturbed site with one after it (a skip
    across site "a") falls back to tiled inputs, and the estimate is the same as with
    cache_prefix=False. Forcing cache_prefix=True fails loudly instead."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(x + self.a(x))

    model = Residual().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))

    def make(**kw):
        return lambda: ulr.LikelihoodRatio(model, num_copies=4, **kw,
                                           generator=torch.Generator().manual_seed(0))

    want, _, _ = _grads(model, make(plan=ulr.plans.layerwise(cache_prefix=False)), x, y)
    auto = make()()
    got, _, _ = _grads(model, lambda: auto, x, y)
    _assert_same(got, want)
    assert auto._no_prefix == {"a"}  # the pass of "b" keeps its prefix on B rows
    forced = ulr.LikelihoodRatio(model, num_copies=4,
                                 plan=ulr.plans.layerwise(cache_prefix=True))
    with pytest.raises(RuntimeError, match="cache_prefix=False"):
        forced.loss_and_grads(ce, x, y)


def test_memory_argument_errors(mlp):
    with pytest.raises(ValueError, match="chunk_size"):
        ulr.LikelihoodRatio(mlp, memory="chunked")
    with pytest.raises(ValueError, match="only used with memory='chunked'"):
        ulr.LikelihoodRatio(mlp, chunk_size=4)
    with pytest.raises(ValueError, match="'store', 'chunked' or 'replay'"):
        ulr.LikelihoodRatio(mlp, memory="disk")


def test_replay_retry_with_autograd_does_not_count_sites_twice():
    """A mark met without autograd makes the forward start over with it; in replay the sites
    before the mark had already written their gradients, which the retry must drop."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(ulr.perturb("mid", torch.tanh(self.a(x))))

    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))

    def make(mode):
        return lambda: ulr.LikelihoodRatio(
            model, sites=ulr.sites.param_owners() | ulr.sites.marked(), num_copies=4,
            memory=mode, generator=torch.Generator().manual_seed(0))

    want, _, _ = _grads(model, make("store"), x, y)
    got, _, _ = _grads(model, make("replay"), x, y)
    _assert_same(got, want)


def test_sobol_snapshots_restore_in_any_order():
    """Restoring an early snapshot drops the engines created after it; restoring a later
    snapshot afterwards (as multi-process loss exchange does, pass by pass) rebuilds them."""
    sampler, noise = ulr.sobol(), ulr.Gaussian(1.0)
    g = torch.Generator().manual_seed(0)

    def draw(width):
        return sampler.sample(noise, 4, torch.Size((2, width)), generator=g, device="cpu")

    draw(3)
    first = g.get_state(), sampler.snapshot()
    draw(5)  # a new engine for width 5
    second = g.get_state(), sampler.snapshot()
    want = draw(5), draw(3)
    g.set_state(first[0])
    sampler.restore(first[1])
    g.set_state(second[0])
    sampler.restore(second[1])
    got = draw(5), draw(3)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------
# Noise drawn in copy blocks: replay and chunks never hold a site's K·B-row noise


@pytest.mark.parametrize("memory,chunk", [("chunked", 3), ("replay", None)])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("cache", [False, True])
def test_block_wise_noise_gives_the_store_estimate(monkeypatch, cnn, memory, chunk, sampler,
                                                   cache):
    # One copy per block (three for antithetic's pairs): every site streams many blocks, the
    # first layer's from the B-row prefix (cache) or from tiled inputs (no cache), and a
    # learnable per-channel sigma gets its gradient block by block as well.
    monkeypatch.setattr(ulr.samplers, "_BLOCK_VALUES", 1)
    cnn.double()
    x, y = torch.randn(3, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    sigma = {}

    def make(mode, size):
        def build():
            noise = sigma.setdefault(mode, ulr.Gaussian(torch.full((4, 1, 1), 0.1),
                                                        learnable=True))
            return ulr.LikelihoodRatio(
                cnn, num_copies=6, sampler=SAMPLERS[sampler](),
                noise={"0": noise, "*": ulr.Gaussian(0.1)},
                baseline=ulr.baselines.clean(), plan=ulr.plans.all_sites(cache_prefix=cache),
                memory=mode, chunk_size=size, generator=torch.Generator().manual_seed(0))
        return build

    want, want_mean, est_a = _grads(cnn, make("store", None), x, y)
    got, got_mean, est_b = _grads(cnn, make(memory, chunk), x, y)
    _assert_same(got, want)
    torch.testing.assert_close(got_mean, want_mean)
    # sigma lives in float32 (noise is drawn in float32): its sums over blocks round there
    torch.testing.assert_close(sigma[memory].log_scale.grad, sigma["store"].log_scale.grad,
                               rtol=1e-5, atol=1e-7)
    assert torch.equal(est_a.generator.get_state(), est_b.generator.get_state())


def test_replay_never_draws_a_whole_site(monkeypatch, cnn):
    # Linear/Conv sites of replay take their noise block by block in both passes.
    monkeypatch.setattr(ulr.samplers, "_BLOCK_VALUES", 1)

    def whole(*args, **kwargs):
        raise AssertionError("replay drew all K·B rows of a site at once")

    monkeypatch.setattr(ulr.estimator.forward.PassRun, "_noise", whole)
    x, y = torch.randn(3, 1, 6, 6), torch.randint(0, 3, (3,))
    est = ulr.LikelihoodRatio(cnn, num_copies=4, memory="replay")
    est.loss_and_grads(ce, x, y)
    assert all(p.grad is not None for p in cnn.parameters())


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("values", [1, 40, 10**9])  # one copy per block, three, all copies
def test_sampler_blocks_are_the_sample(monkeypatch, sampler, values):
    monkeypatch.setattr(ulr.samplers, "_BLOCK_VALUES", values)
    monkeypatch.setattr(ulr.samplers, "_MIN_BLOCK_VALUES", 0)
    noise, shape, cpu = ulr.Gaussian(0.3), torch.Size((4, 2, 2)), torch.device("cpu")

    def draw(**kwargs):
        gen = torch.Generator().manual_seed(0)
        blocks = list(SAMPLERS[sampler]().blocks(noise, 8, shape, generator=gen, device=cpu,
                                                 **kwargs))
        return blocks, gen.get_state()

    whole = SAMPLERS[sampler]().sample(noise, 8, shape, generator=torch.Generator().manual_seed(0),
                                       device=cpu)
    assert whole.shape == (8, *shape)
    blocks, state = draw()
    got = torch.full_like(whole, float("nan"))
    seen = []
    for k, z in blocks:
        got[k:k + z.shape[0]] = z
        seen += range(k, k + z.shape[0])
    assert sorted(seen) == list(range(8))
    assert torch.equal(got, whole)
    into = torch.empty_like(whole)
    draw(out=into)
    assert torch.equal(into, whole)
    # a range of copies: only the blocks that hold them, the same numbers, the same
    # generator state afterwards (the next site's noise does not depend on the chunk)
    part, part_state = draw(copies=(3, 5))
    assert {c for k, z in part for c in range(k, k + z.shape[0])} >= {3, 4}
    for k, z in part:
        assert torch.equal(z, whole[k:k + z.shape[0]])
    assert torch.equal(part_state, state)


def test_iid_blocks_do_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setattr(ulr.samplers, "_BLOCK_VALUES", 64)
    monkeypatch.setattr(ulr.samplers, "_MIN_BLOCK_VALUES", 0)
    threads = torch.get_num_threads()
    draws = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            draws.append(ulr.iid().sample(ulr.Gaussian(1.0), 16, torch.Size((4, 8)),
                                          generator=torch.Generator().manual_seed(5),
                                          device=torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(d, draws[0]) for d in draws[1:])
    assert draws[0].std() == pytest.approx(1.0, rel=0.1)


def test_a_sampler_with_only_sample_works_in_every_mode(monkeypatch, cnn):
    # A user's sampler that implements sample() alone: blocks() slices it, so replay and
    # chunks still see store's noise; one that implements neither says what to write.
    class OnlySample(ulr.samplers.Sampler):
        def sample(self, noise, num_copies, shape, *, generator, device):
            return noise.sample((num_copies, *shape), generator=generator, device=device)

    monkeypatch.setattr(ulr.samplers, "_BLOCK_VALUES", 1)
    cnn.double()
    x, y = torch.randn(3, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))

    def make(mode, size):
        return lambda: ulr.LikelihoodRatio(cnn, num_copies=4, sampler=OnlySample(), memory=mode,
                                           chunk_size=size,
                                           generator=torch.Generator().manual_seed(0))

    want, _, _ = _grads(cnn, make("store", None), x, y)
    for mode, size in (("chunked", 3), ("replay", None)):
        got, _, _ = _grads(cnn, make(mode, size), x, y)
        _assert_same(got, want)
    with pytest.raises(NotImplementedError, match="must implement sample or blocks"):
        ulr.samplers.Sampler().sample(ulr.Gaussian(0.1), 2, torch.Size((3,)), generator=None,
                             device=torch.device("cpu"))


def test_noise_sample_into_out():
    gen = torch.Generator().manual_seed(0)
    want = ulr.Laplace(0.2).sample((4, 5), generator=gen)
    out = torch.empty(4, 5)
    got = ulr.Laplace(0.2).sample((4, 5), generator=torch.Generator().manual_seed(0), out=out)
    assert got is out and torch.equal(out, want)
    with pytest.raises(ValueError, match=r"contiguous tensor of shape \(4, 5\)"):
        ulr.Gaussian(0.1).sample((4, 5), out=torch.empty(5, 4))


@pytest.mark.parametrize("name", ["lstm-bidir-2layer", "gru-h_n", "mha-seq-first",
                                  "rnn-seq-first"])
def test_modes_and_workers_agree_on_sites_with_nested_outputs(name):
    """torch's recurrent modules and attention as sites (several outputs, batch in dim 1, parts
    left unused): replay, chunked and parallel assembly give the store estimate."""
    from zoo import ZOO

    grads = {}
    for mode, kw in [("store", {}), ("replay", {"memory": "replay"}),
                     ("chunked", {"memory": "chunked", "chunk_size": 24}),
                     ("workers", {"workers": 2})]:
        case = ZOO[name](0)
        est = ulr.LikelihoodRatio(case.model, num_copies=64,
                                  generator=torch.Generator().manual_seed(0), **kw)
        args = case.inputs if isinstance(case.inputs, tuple) else (case.inputs,)
        est.loss_and_grads(case.loss_fn, args, case.targets)
        grads[mode] = [p.grad for p in case.model.parameters()]
    for mode in ("replay", "chunked", "workers"):
        for got, want in zip(grads[mode], grads["store"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,fallback", [("lenet5", set()), ("resnet5", {"conv4"})])
def test_prefix_caching_on_library_models_gives_the_same_estimate(name, fallback):
    """LeNet-5 (not a Sequential) keeps the prefix on B rows in every pass; ResNet-5's skip
    across conv4 makes that one pass fall back. Same estimate as tiled inputs (float64)."""
    torch.manual_seed(0)
    model = ulr.models.build(name, in_shape=(1, 12, 12), num_classes=4).double()
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (3,))
    ests = {}

    def make(cache):
        def build():
            ests[cache] = ulr.LikelihoodRatio(model, num_copies=4,
                                              plan=ulr.plans.layerwise(cache_prefix=cache),
                                              generator=torch.Generator().manual_seed(0))
            return ests[cache]
        return build

    want, _, _ = _grads(model, make(False), x, y)
    got, _, _ = _grads(model, make(None), x, y)
    _assert_same(got, want)
    assert ests[None]._no_prefix == fallback
