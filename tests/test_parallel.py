"""Parallel gradient assembly (LikelihoodRatio(workers=N), ulr.parallel): the gradients equal the
sequential path's bitwise, over closed-form, weight-noise, learnable-noise, local-VJP (hybrid
blocks, marks) sites, every plan and the store/chunked memory modes; errors leave nothing
running; the CUDA-stream path is checked where a CUDA device exists."""

import threading

import pytest
import torch
from conftest import ce
from torch import nn

import ulr


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 4))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(24, 4))


class _Cell(nn.Module):
    """Repeated calls and a mark: several records per site and a VJP through the recurrence."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wx, self.wh, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 8)
        for t in range(3):
            h = torch.tanh(ulr.perturb("pre", self.wx(x) + self.wh(h)))
        return self.out(h)


def _case(name):
    """(model, x, estimator keyword arguments)."""
    x6 = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    if name == "mlp":
        return _mlp(), x6, {}
    if name == "cnn":
        x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))
        return _cnn(), x, {}
    if name == "hybrid":
        model = _mlp()
        return model, x6, {"sites": ulr.hybrid.blocks(model, ends=[2])}
    if name == "weight+learnable":
        model = _mlp()
        sites = ulr.sites.by_name({"0": ulr.weight_noise(ulr.Gaussian(0.05)),
                                   "2": ulr.Gaussian(0.1, learnable=True),
                                   "4": ulr.Gaussian(0.1)})
        return model, x6, {"sites": sites}
    if name == "marks":
        return _Cell(), x6, {"sites": ulr.sites.marked("pre") | ulr.sites.by_name("out")}
    if name == "repeated":  # closed-form sites called 3 times: 3 records add into one weight
        return _Cell(), x6, {"sites": ulr.sites.by_name("wx", "wh", "out")}
    raise AssertionError(name)


def _grads(name, workers, *, plan, memory, baseline, steps=2):
    model, x, kw = _case(name)
    y = torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(2))
    est = ulr.LikelihoodRatio(model, num_copies=4, plan=plan(), baseline=baseline(),
                              memory=memory, chunk_size=2 if memory == "chunked" else None,
                              generator=torch.Generator().manual_seed(3), workers=workers, **kw)
    losses = [est.loss_and_grads(ce, x, y) for _ in range(steps)]  # accumulates twice
    grads = [p.grad.clone() for p in model.parameters()]
    grads += [p.grad.clone() for p in est.noise_parameters()]
    return grads, losses


@pytest.mark.parametrize("memory", ["store", "chunked"])
@pytest.mark.parametrize("plan", [ulr.plans.all_sites, ulr.plans.layerwise])
@pytest.mark.parametrize("name", ["mlp", "cnn", "hybrid", "weight+learnable", "marks",
                                  "repeated"])
def test_parallel_assembly_is_bitwise_sequential(name, plan, memory):
    baseline = ulr.baselines.leave_one_out  # not row-local: chunked runs two sweeps
    want, want_loss = _grads(name, 0, plan=plan, memory=memory, baseline=baseline)
    for workers in (1, 3):
        got, got_loss = _grads(name, workers, plan=plan, memory=memory, baseline=baseline)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert w.abs().sum() > 0
            assert torch.equal(g, w)
        assert [float(v) for v in got_loss] == [float(v) for v in want_loss]


def test_chunked_row_local_baseline_is_bitwise_sequential():
    kw = dict(plan=ulr.plans.layerwise, memory="chunked", baseline=ulr.baselines.none)
    want, _ = _grads("cnn", 0, **kw)
    got, _ = _grads("cnn", 2, **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_tasks_run_in_worker_threads_overlapping_the_next_pass():
    """The assembly of a layer-wise pass runs off the main thread: the weight products of
    Linear sites are computed in 'ulr-assembly' threads."""
    model = _mlp()
    seen = set()
    real = ulr.functional.module_grads

    def spy(module, inputs, signal):
        seen.add(threading.current_thread().name.split("_")[0])
        return real(module, inputs, signal)

    import ulr.estimator.records as est_mod

    est_mod.module_grads, old = spy, est_mod.module_grads
    try:
        est = ulr.LikelihoodRatio(model, num_copies=4, plan=ulr.plans.layerwise(), workers=2)
        est.loss_and_grads(ce, torch.randn(3, 6), torch.randint(0, 4, (3,)))
    finally:
        est_mod.module_grads = old
    assert seen == {"ulr-assembly"}


def test_error_in_a_later_pass_leaves_no_task_and_no_gradient():
    model = _mlp()
    est = ulr.LikelihoodRatio(model, num_copies=4, plan=ulr.plans.layerwise(), workers=2,
                              generator=torch.Generator().manual_seed(0))
    calls = []

    def loss(out, y):
        calls.append(1)
        if len(calls) == 3:  # the third pass: the first two are in the pool
            return torch.full((out.shape[0],), float("nan"))
        return ce(out, y)

    x, y = torch.randn(3, 6), torch.randint(0, 4, (3,))
    with pytest.raises(ValueError, match="non-finite"):
        est.loss_and_grads(loss, x, y)
    assert est._assembler.pending() == 0
    assert all(p.grad is None for p in model.parameters())
    est.loss_and_grads(ce, x, y)  # still usable
    assert all(p.grad is not None for p in model.parameters())


def test_bad_workers_are_refused():
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        ulr.LikelihoodRatio(_mlp(), workers=-1)
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        ulr.LikelihoodRatio(_mlp(), workers=True)
    with pytest.raises(ValueError, match="needs memory='store' or 'chunked'"):
        ulr.LikelihoodRatio(_mlp(), workers=2, memory="replay")


def test_estimator_with_workers_can_be_deep_copied():
    import copy

    est = ulr.LikelihoodRatio(_mlp(), workers=2)
    est.loss_and_grads(ce, torch.randn(3, 6), torch.randint(0, 4, (3,)))
    twin = copy.deepcopy(est)
    assert twin._assembler is not est._assembler and twin._assembler.workers == 2


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cnn", "hybrid"])
def test_cuda_streams_give_the_sequential_gradients(name):
    def run(workers):
        model, x, kw = _case(name)
        model = model.cuda()
        y = torch.randint(0, 4, (5,)).cuda()
        est = ulr.LikelihoodRatio(model, num_copies=8, plan=ulr.plans.layerwise(),
                                  generator=torch.Generator(device="cuda").manual_seed(3),
                                  workers=workers, **kw)
        est.loss_and_grads(ce, x.cuda(), y)
        return [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    want = run(0)
    torch.manual_seed(0)
    got = run(3)
    for g, w in zip(got, want):
        # the same kernels on other streams: bitwise unless a kernel is nondeterministic
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)


def test_ulr_train_workers_gives_the_same_run():
    from ulr.train import ConfigError, RunConfig, fit

    tiny = dict(model="lenet5", batch_size=64, num_copies=4, threads=1, device="cpu", epochs=1,
                max_steps=3)
    a, b = fit(RunConfig(**tiny)), fit(RunConfig(**tiny, workers=2))
    for key in ("test_acc", "test_loss", "val_loss", "train_loss"):
        assert a["final"][key] == b["final"][key], key
    with pytest.raises(ConfigError, match="workers > 0 needs memory"):
        RunConfig(workers=2, memory="replay")


def test_workers_use_the_callers_thread_count():
    """OpenMP thread counts are per thread: a worker must not run its kernels with the default
    count when the caller set another (a CNN's conv weight gradient then reduces differently)."""
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    try:
        torch.set_num_threads(other)
        kw = dict(plan=ulr.plans.all_sites, memory="store", baseline=ulr.baselines.leave_one_out)
        want, _ = _grads("cnn", 0, **kw)
        got, _ = _grads("cnn", 2, **kw)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    finally:
        torch.set_num_threads(before)
