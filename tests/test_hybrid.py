"""Hybrid BP/LR training (ulr.hybrid): sites only at block ends, backprop inside each block.

The oracle: with the estimator's generator state, draw the same noise, run the noisy forward by
hand (forward hooks that replace each block end ``v`` by ``v.detach() + z`` and keep ``v``),
form the LR signal ``g = L · score(z) / N`` from the per-row losses, and take autograd of
``Σ_s <g_s, v_s>`` with respect to every parameter: inside a block that is plain backprop of the
signal at the block's end. The estimator must give the same gradients to float tolerance.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from torch import nn

import ulr
from ulr.models import LeNet5
from ulr.train import ConfigError, RunConfig, fit


def _oracle(model, ends, x, y, *, noise, num_copies, generator, passes):
    """Gradients of the hybrid estimator recomputed by hand (baseline none, iid noise).

    ``passes``: list of sets of perturbed block ends, in the estimator's pass order.
    """
    batch = x.shape[0]
    rows = num_copies * batch
    modules = dict(model.named_modules())
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    sampler = ulr.iid()
    for perturbed in passes:
        kept = {}

        def hook(module, args, out, name=None):
            if name not in perturbed:
                return out.detach()  # an unperturbed site still cuts the graph
            z = sampler.sample(noise, num_copies, torch.Size((batch, *out.shape[1:])),
                               generator=generator, device=out.device).reshape(rows, *out.shape[1:])
            kept[name] = (out, z)
            return out.detach() + z

        handles = [modules[n].register_forward_hook(
            lambda m, a, o, n=n: hook(m, a, o, name=n)) for n in ends]
        try:
            out = model(x.repeat(num_copies, *([1] * (x.dim() - 1))))
        finally:
            for h in handles:
                h.remove()
        losses = ce(out, y.repeat(num_copies)).detach()
        values, signals = [], []
        for v, z in kept.values():
            w = losses.view(rows, *([1] * (z.dim() - 1)))
            values.append(v)
            signals.append(w * noise.score(z) / rows)
        grads = torch.autograd.grad(values, params, signals, allow_unused=True)
        total = [t + (g if g is not None else 0) for t, g in zip(total, grads)]
    return total


def _estimate(model, spec, x, y, *, plan, seed, k):
    est = ulr.LikelihoodRatio(model, sites=spec, noise=ulr.Gaussian(0.1), num_copies=k,
                              sampler=ulr.iid(), plan=plan, baseline=ulr.baselines.none(),
                              generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    est.loss_and_grads(ce, x, y)
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def float64():
    """Both sides in float64, so that the comparison is tight (float32 differs by summation
    order only, ~1e-6 relative in conv weight gradients)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4))


@pytest.mark.parametrize("plan", ["all_sites", "layerwise"])
def test_sequential_blocks_equal_autograd_of_the_lr_signal(plan, float64):
    model = _mlp()
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    spec = ulr.hybrid.blocks(model, ends=[2])  # blocks [0..2] and [3..6]
    assert spec.patterns.keys() == {"2", "6"}
    ends = ["2", "6"]
    got = _estimate(model, spec, x, y, plan=getattr(ulr.plans, plan)(cache_prefix=False),
                    seed=3, k=4)
    passes = [set(ends)] if plan == "all_sites" else [{"2"}, {"6"}]
    want = _oracle(model, ends, x, y, noise=ulr.Gaussian(0.1), num_copies=4,
                   generator=torch.Generator().manual_seed(3), passes=passes)
    for g, w in zip(got, want):
        assert w.abs().sum() > 0
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_cnn_blocks_by_name_equal_autograd_of_the_lr_signal(float64):
    """LeNet-5 (not a Sequential) in 2 equal blocks: conv1, conv2, fc1 | fc2, fc3."""
    torch.manual_seed(0)
    model = LeNet5(input_size=8)
    ends = ulr.hybrid.block_ends(model, 2)
    assert ends == ["fc1", "fc3"]
    x, y = torch.rand(3, 1, 8, 8), torch.randint(0, 10, (3,))
    got = _estimate(model, ulr.hybrid.blocks(model, 2), x, y, plan=ulr.plans.all_sites(),
                    seed=5, k=4)
    want = _oracle(model, ends, x, y, noise=ulr.Gaussian(0.1), num_copies=4,
                   generator=torch.Generator().manual_seed(5), passes=[set(ends)])
    for g, w in zip(got, want):
        assert w.abs().sum() > 0
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_as_many_blocks_as_layers_is_pure_ulr():
    model = _mlp()
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    assert ulr.hybrid.block_ends(model, 4) == ulr.hybrid.layers(model) == ["0", "2", "4", "6"]
    one_pass = ulr.plans.all_sites()
    a = _estimate(model, ulr.hybrid.blocks(model, 4), x, y, plan=one_pass, seed=1, k=4)
    b = _estimate(model, None, x, y, plan=one_pass, seed=1, k=4)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_equal_blocks_split_layers_evenly():
    model = LeNet5(input_size=8)
    assert ulr.hybrid.layers(model) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert ulr.hybrid.block_ends(model, 1) == ["fc3"]
    assert ulr.hybrid.block_ends(model, 2) == ["fc1", "fc3"]
    assert ulr.hybrid.block_ends(model, 4) == ["conv2", "fc1", "fc2", "fc3"]
    assert ulr.hybrid.block_ends(model, 5) == ulr.hybrid.layers(model)


def test_frozen_layers_are_not_blocks():
    model = _mlp()
    model[0].requires_grad_(False)
    assert ulr.hybrid.layers(model) == ["2", "4", "6"]


def test_bad_block_specs_are_refused_with_the_fix():
    model = _mlp()
    with pytest.raises(ValueError, match=r"between 1 and the number .* \(4: "):
        ulr.hybrid.blocks(model, 5)
    with pytest.raises(ValueError, match="not both or neither"):
        ulr.hybrid.blocks(model)
    with pytest.raises(ValueError, match="not both or neither"):
        ulr.hybrid.blocks(model, 2, ends=[1])
    with pytest.raises(ValueError, match="out of range"):
        ulr.hybrid.blocks(model, ends=[7])
    with pytest.raises(ValueError, match="no module of"):
        ulr.hybrid.blocks(model, ends=["nope"])
    with pytest.raises(TypeError, match="name the modules"):
        ulr.hybrid.blocks(LeNet5(input_size=8), ends=[1])
    assert ulr.hybrid.blocks(model, ends=[-3]).patterns.keys() == {"4", "6"}


TINY = dict(batch_size=128, num_copies=8, threads=1, device="cpu", epochs=1, max_steps=3,
            model="lenet5")


def test_train_blocks_knob_runs_hybrid_and_zero_is_backprop():
    hyb = fit(RunConfig(**TINY, blocks=2, diag_every=1))
    assert hyb["steps"] == 3 and hyb["forward_passes"] > 3
    zero = fit(RunConfig(**TINY, blocks=0))
    bp = fit(RunConfig(**TINY, method="bp"))
    assert zero["config"]["lr"] == bp["config"]["lr"] == 1e-3
    assert zero["final"]["test_acc"] == bp["final"]["test_acc"]
    assert zero["final"]["test_loss"] == bp["final"]["test_loss"]
    assert zero["forward_passes"] == 3


def test_train_blocks_with_recommended_weight_noise_uses_output_noise():
    out = fit(RunConfig(**{**TINY, "model": "resnet5"}, blocks=2, recommended=True))
    assert out["steps"] == 3


def test_train_blocks_config_errors():
    with pytest.raises(ConfigError, match="both choose the noise sites"):
        RunConfig(blocks=2, sites=["fc3"])
    with pytest.raises(ConfigError, match="blocks must be >= 0"):
        RunConfig(blocks=-1)
    with pytest.raises(ValueError, match="num_blocks must be between 1"):
        fit(RunConfig(**TINY, blocks=9))


def test_hybrid_gradient_cosine_rises_with_block_size():
    """Fewer, larger blocks replace more LR estimation by exact backprop: at equal copies the
    whole-model cosine with backprop's gradient is higher on average. Fixed seeds; over these 6
    batches the means are about 0.97 (1 block) and 0.92 (4 blocks = pure ULR), while single
    batches overlap, hence the mean."""
    torch.manual_seed(0)
    model = _mlp()
    cos = {1: [], 4: []}
    for seed in range(6):
        x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        exact = torch.cat([p.grad.flatten() for p in model.parameters()])
        for n in cos:
            est = ulr.LikelihoodRatio(model, sites=ulr.hybrid.blocks(model, n),
                                      noise=ulr.Gaussian(0.05), num_copies=64,
                                      baseline=ulr.baselines.leave_one_out(),
                                      plan=ulr.plans.layerwise(),
                                      generator=torch.Generator().manual_seed(seed))
            model.zero_grad(set_to_none=True)
            est.loss_and_grads(ce, x, y)
            flat = torch.cat([p.grad.flatten() for p in model.parameters()])
            cos[n].append(float(F.cosine_similarity(flat, exact, dim=0)))
    mean = {n: sum(v) / len(v) for n, v in cos.items()}
    assert mean[1] > mean[4] + 0.02, cos
