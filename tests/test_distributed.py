"""Multi-process ULR (ulr.distributed): 2 gloo processes give the single-process estimate.

One launch of two processes runs every case (spawning costs seconds; the cases are
milliseconds), and the parent compares with one process under the same seed. Every launch has
a deadline and every collective a timeout, so a broken rank fails the test instead of hanging.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ulr

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")

ROOT = Path(__file__).resolve().parents[1]
K, B = 8, 5
EXCHANGES = ("grads", "losses")
MEMORIES = ("store", "replay", "chunked")


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class MarkNet(nn.Module):
    """A ulr.perturb mark after a closed-form site: the first estimate that keeps gradients
    meets the mark without autograd and starts its forward over (the retry path)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(ulr.perturb("mid", torch.tanh(self.a(x))))


def build(kind):
    """(model, estimator kwargs) of one case; the same weights and noise seed every call."""
    torch.manual_seed(0)
    if kind == "marks":
        return MarkNet(), {"num_copies": K, "generator": torch.Generator().manual_seed(1),
                           "sites": ulr.sites.param_owners() | ulr.sites.marked(),
                           "plan": ulr.plans.layerwise()}
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 4))
    kw = {"num_copies": K, "generator": torch.Generator().manual_seed(1)}
    if kind == "layerwise":  # closed-form and local-VJP (LayerNorm) sites, prefix caching
        kw.update(plan=ulr.plans.layerwise(), sampler=ulr.antithetic(),
                  baseline=ulr.baselines.leave_one_out())
    elif kind == "all-sites":
        kw.update(plan=ulr.plans.all_sites(), sampler=ulr.iid())
    elif kind == "weight-noise":  # weight noise, a clean baseline, a stateful baseline
        kw.update(plan=ulr.plans.layerwise(),
                  noise={"0": ulr.weight_noise(ulr.Gaussian(0.05)), "*": ulr.Gaussian(0.1)},
                  baseline=ulr.baselines.chain(ulr.baselines.clean(),
                                               ulr.baselines.running_average()))
    elif kind == "learnable":  # per-unit sigma learnt by its own LR gradient
        kw.update(plan=ulr.plans.layerwise(), noise=ulr.Gaussian(0.1, learnable=True),
                  baseline=ulr.baselines.leave_one_out())
    elif kind == "sobol":  # a stateful sampler (scrambled Sobol engines per width)
        kw.update(plan=ulr.plans.layerwise(), sampler=ulr.antithetic(ulr.sobol()),
                  baseline=ulr.baselines.clean())
    elif kind == "odd-copies":  # 7 copies: ranks run 3 and 4
        kw.update(num_copies=7, plan=ulr.plans.layerwise(), baseline=ulr.baselines.leave_one_out())
    return model, kw


KINDS = ("layerwise", "all-sites", "weight-noise", "learnable", "sobol", "odd-copies",
         "marks")


def batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(B, 6, generator=g), torch.randint(0, 4, (B,), generator=g)


def run_steps(est, model, steps=2):
    """Two estimates (weights moved in between); grads, losses and the generator's next draw."""
    x, y = batch()
    out = []
    for _ in range(steps):
        params = [*model.parameters(), *est.noise_parameters()]
        for p in params:
            p.grad = None
        loss = est.loss_and_grads(ce, x, y)
        params = [*model.parameters(), *est.noise_parameters()]
        out.append({"grads": [p.grad.clone() for p in params], "loss": float(loss),
                    "bytes": getattr(est, "last_bytes_sent", None)})
        with torch.no_grad():
            for p in params:
                p.sub_(0.1 * p.grad)
    out.append({"next": torch.rand(3, generator=est.generator)})
    return out


def worker(rank, world_size):
    from ulr.distributed import DistributedLikelihoodRatio, check_same

    results = {}
    for kind in KINDS:
        for exchange in EXCHANGES:
            for memory in MEMORIES:
                model, kw = build(kind)
                rows = []
                last = model.b if kind == "marks" else model[3]
                last.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
                est = DistributedLikelihoodRatio(
                    model, exchange=exchange, memory=memory,
                    chunk_size=3 if memory == "chunked" else None, **kw)
                results[kind, exchange, memory] = (run_steps(est, model), rows)
    errors = {}
    try:
        check_same({"a": 1, "b": rank}, "the test config")
    except ValueError as e:
        errors["check_same"] = str(e)
    try:
        model, kw = build("all-sites")
        DistributedLikelihoodRatio(model, **{**kw, "num_copies": 1}).loss_and_grads(ce, *batch())
    except ValueError as e:
        errors["copies"] = str(e)
    try:
        model, kw = build("layerwise")
        est = DistributedLikelihoodRatio(model, **kw)

        def inf_on_rank1(out, y):  # only rank 1's copies go wrong
            return ce(out, y) + (float("inf") if rank == 1 else 0.0)

        est.loss_and_grads(inf_on_rank1, *batch())
    except ValueError as e:
        errors["nonfinite"] = (str(e), [p.grad for p in model.parameters()])
    return results, errors


@pytest.fixture(scope="module")
def two_ranks():
    from ulr.train.launch import launch

    return launch(worker, 2, timeout_s=60, deadline_s=240)


@pytest.fixture(scope="module")
def single():
    out = {}
    for kind in KINDS:
        model, kw = build(kind)
        out[kind] = run_steps(ulr.LikelihoodRatio(model, **kw), model)
    return out


def close(a, b):
    return all(torch.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_two_ranks_equal_one_process(two_ranks, single, kind, exchange, memory):
    ref = single[kind]
    for rank, (results, _) in enumerate(two_ranks):
        steps, _ = results[kind, exchange, memory]
        for got, want in zip(steps[:-1], ref[:-1], strict=True):
            # the same copies' noise, summed in another order: float tolerance
            assert close(got["grads"], want["grads"]), (rank, kind, exchange, memory)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        # every rank's generator ends where the single process's does
        assert torch.equal(steps[-1]["next"], ref[-1]["next"])


@pytest.mark.parametrize("kind", KINDS)
def test_loss_exchange_equals_all_reduce(two_ranks, kind):
    for results, _ in two_ranks:
        for memory in MEMORIES:
            a, _ = results[kind, "grads", memory]
            b, _ = results[kind, "losses", memory]
            for sa, sb in zip(a[:-1], b[:-1], strict=True):
                assert close(sa["grads"], sb["grads"])


def test_bytes_sent(two_ranks):
    """Losses: K/2·B floats per pass and rank; grads: that plus every parameter once."""
    results, _ = two_ranks[0]
    model, _ = build("layerwise")
    params = sum(p.numel() for p in model.parameters())
    passes = 3  # layer-wise over the Linear, LayerNorm and Linear sites
    losses = passes * (K // 2) * B * 4
    for memory in MEMORIES:
        grads_steps, _ = results["layerwise", "grads", memory]
        loss_steps, _ = results["layerwise", "losses", memory]
        assert loss_steps[0]["bytes"] == losses
        assert grads_steps[0]["bytes"] == losses + 4 * params


def test_loss_exchange_rebuild_stops_at_the_site(two_ranks):
    """The rebuild of a layer-wise pass runs the clean prefix on B rows and stops after its
    site: the last layer never sees all K·B rows on a rank (the noisy forward of this rank's
    copies has K/2·B), whereas all-reducing ranks never run more than their copies either."""
    for results, _ in two_ranks:
        _, rows = results["layerwise", "losses", "store"]
        assert max(rows) == (K // 2) * B
        assert B in rows  # the rebuild of the last layer's pass: its prefix on B rows
        # with the all-sites plan the last perturbed site is the last layer: a full rebuild
        _, rows = results["all-sites", "losses", "store"]
        assert max(rows) == K * B


def test_errors_reach_every_rank(two_ranks):
    for rank, (_, errors) in enumerate(two_ranks):
        assert "differs between rank 0 and rank 1 (differs in b)" in errors["check_same"]
        assert "1 noise copies but the run has 2 ranks" in errors["copies"]
        # non-finite losses on rank 1 alone stop both ranks (no hang), before any gradient
        message, grads = errors["nonfinite"]
        assert "non-finite losses" in message and "on all ranks together" in message
        assert all(g is None for g in grads)


def test_needs_a_process_group():
    from ulr.distributed import DistributedLikelihoodRatio

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        DistributedLikelihoodRatio(nn.Linear(2, 2))


def test_copy_range():
    from ulr.distributed import copy_range

    assert [copy_range(32, r, 2) for r in range(2)] == [(0, 16), (16, 32)]
    assert [copy_range(7, r, 2) for r in range(2)] == [(0, 3), (3, 7)]
    with pytest.raises(ValueError, match="at least one copy"):
        copy_range(1, 0, 2)


# ---------------------------------------------------------------------------------------------
# Model parallel (examples/model_parallel.py): two estimators chained through the loss


def test_model_split_equals_one_estimator():
    """Front and back of a model, each with its own estimator, joined only by the loss
    function (the front's loss_fn runs the back and returns its per-row losses), compute the
    all-sites estimate of the whole model when the back continues the front's noise stream."""
    import copy

    torch.manual_seed(0)
    front = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    back = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
    whole = nn.Sequential(copy.deepcopy(front), copy.deepcopy(back))
    x, y = batch()
    kw = {"num_copies": K, "sampler": ulr.iid(), "baseline": ulr.baselines.leave_one_out(),
          "plan": ulr.plans.all_sites()}  # one pass: the split exchanges its losses once
    ulr.LikelihoodRatio(whole, generator=torch.Generator().manual_seed(1),
                        **kw).loss_and_grads(ce, x, y)

    est0 = ulr.LikelihoodRatio(front, generator=torch.Generator().manual_seed(1), **kw)
    est1 = ulr.LikelihoodRatio(back, generator=torch.Generator(),
                               replicate=lambda inputs, k: inputs, **kw)
    sent = {}

    def back_losses(h):  # what process 1 does with the activations it receives
        assert h.shape == (K * B, 16) and not h.requires_grad
        est1.generator.set_state(est0.generator.get_state())  # the noise stream goes on

        def loss(out, t):
            sent["losses"] = ce(out, t)
            return sent["losses"]

        est1.loss_and_grads(loss, h, y)
        return sent["losses"]  # the only message back: K*B numbers

    est0.loss_and_grads(back_losses, x)
    split = [p.grad for p in [*front.parameters(), *back.parameters()]]
    assert close(split, [p.grad for p in whole.parameters()])


# ---------------------------------------------------------------------------------------------
# ulr train --nproc 2, end to end


def _cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ULR_DIST_TIMEOUT": "120",
           "PYTHONFAULTHANDLER": "1",  # a crash in a rank shows its Python stack
           "ULR_DIST_DEADLINE": str(timeout - 30),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "ulr", "train", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same_as_one_process(run, method, steps, **config):
    from ulr.train import RunConfig, fit

    losses = []

    class Steps(ulr.train.Callback):
        def on_step(self, row):
            losses.append(row["loss"])

    fit(RunConfig(method=method, epochs=1, max_steps=steps, device="cpu", **config),
        callbacks=[Steps()])
    logged = [r["loss"] for r in _rows(run / "metrics.jsonl") if r["kind"] == "step"]
    # the same noise and batches, summed in another order: float tolerance
    assert logged == pytest.approx(losses, rel=1e-5)


def test_train_nproc_2_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = _cli("--nproc", "2", "--method", "ulr", "bp", "--exchange", "losses", "--epochs", "1",
             "--max-steps", "3", "--batch-size", "16", "--quiet", "--no-plots", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("fwd passes") == 1, r.stdout  # one table, printed by rank 0 only
    assert sorted(p.name for p in out.iterdir()) == [
        "bp", "comparison.json", "comparison.txt", "group.json", "ulr"]
    for method in ("ulr", "bp"):
        run = out / method
        assert sorted(p.name for p in run.iterdir()) == [
            "checkpoint.pt", "config.json", "config.toml", "metrics.jsonl", "summary.json"]
        rows = _rows(run / "metrics.jsonl")
        # one writer: one start row, each step logged once, by rank 0 of 2
        starts = [r for r in rows if r["kind"] == "start"]
        assert [(s["rank"], s["world_size"], s["backend"]) for s in starts] == [(0, 2, "gloo")]
        steps = [r for r in rows if r["kind"] == "step"]
        assert [s["step"] for s in steps] == [1, 2, 3]
        assert all(s["bytes_sent"] > 0 for s in steps)
        assert json.loads((run / "summary.json").read_text())["steps"] == 3
        _same_as_one_process(run, method, 3, batch_size=16, exchange="losses")


@pytest.mark.slow
def test_train_nproc_2_resume(tmp_path):
    out = tmp_path / "run"
    r = _cli("--nproc", "2", "--method", "ulr", "--epochs", "1", "--max-steps", "2", "--quiet",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = _cli("--nproc", "2", "--resume", str(out), "--max-steps", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]
    assert [r["resumed"] for r in rows if r["kind"] == "start"] == [False, True]
    _same_as_one_process(out, "ulr", 4)


@pytest.mark.slow
def test_train_nproc_refuses_a_used_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    r = _cli("--nproc", "2", "--method", "ulr", "--max-steps", "1", "--out", str(tmp_path),
             "--quiet")
    assert r.returncode == 2
    assert r.stderr.count("already exists and is not empty") == 1, r.stderr  # rank 0 says it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_torchrun_launch(tmp_path):
    """`torchrun -m ulr train`: the ranks join through torchrun's environment (env://)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ULR_DIST_TIMEOUT": "120",
           "PYTHONFAULTHANDLER": "1",  # a crash in a rank shows its Python stack
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "ulr", "train", "--method", "ulr", "--epochs", "1", "--max-steps", "2",
         "--quiet", "--no-plots", "--out", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = _rows(out / "metrics.jsonl")
    assert [(s["rank"], s["world_size"]) for s in rows if s["kind"] == "start"] == [(0, 2)]
    _same_as_one_process(out, "ulr", 2)
