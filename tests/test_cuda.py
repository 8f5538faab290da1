"""The estimator on a CUDA device (skipped without one): the naive reference under identical
noise, determinism, the generator following the model to the device, and autocast."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ce
from reference import reference_grads

import ulr

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_reference_on_cuda(request, which):
    model = request.getfixturevalue(which).cuda()
    torch.manual_seed(1)
    x = (torch.randn(3, 6) if which == "mlp" else torch.randn(3, 1, 6, 6)).cuda()
    y = torch.randint(0, 3, (3,)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(7)
    est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.2), num_copies=4,
                              sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                              plan=ulr.plans.layerwise(), generator=gen)
    est.loss_and_grads(ce, x, y)
    want = reference_grads(model, ce, x, y, noise=ulr.Gaussian(0.2), sampler=ulr.antithetic(),
                           num_copies=4, generator=torch.Generator(device="cuda").manual_seed(7),
                           baseline="leave_one_out", layerwise=True)
    for name, p in model.named_parameters():
        scale = want[name].abs().max().item()
        torch.testing.assert_close(p.grad, want[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_default_generator_lives_on_the_model_device(mlp):
    model = mlp.cuda()
    est = ulr.LikelihoodRatio(model, num_copies=4)
    assert est.generator.device.type == "cuda"
    cpu_model_est = ulr.LikelihoodRatio(mlp.cpu(), num_copies=4)
    model = mlp.cuda()
    cpu_model_est.loss_and_grads(ce, torch.randn(2, 6, device="cuda"),
                                 torch.tensor([0, 1], device="cuda"))
    assert cpu_model_est.generator.device.type == "cuda"  # moved with the model


def test_cuda_bit_identical_and_cosine(cnn):
    model = cnn.cuda()
    torch.manual_seed(2)
    x, y = torch.randn(16, 1, 6, 6).cuda(), torch.randint(0, 3, (16,)).cuda()
    model.zero_grad()
    ce(model(x), y).mean().backward()
    truth = [p.grad.clone() for p in model.parameters()]
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.01), num_copies=16000,
                            sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                            plan=ulr.plans.layerwise(),
                            generator=torch.Generator(device="cuda").manual_seed(0)
                            ).loss_and_grads(ce, x, y)
        runs.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    cos = [F.cosine_similarity(g.flatten(), t.flatten(), dim=0).item()
           for g, t in zip(runs[0], truth)]
    assert min(cos) >= 0.95, cos


def test_autocast_bf16_keeps_fp32_gradients(mlp):
    model = mlp.cuda()
    x, y = torch.randn(32, 6).cuda(), torch.randint(0, 4, (32,)).cuda()
    est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.05), num_copies=64,
                              sampler=ulr.antithetic(), plan=ulr.plans.layerwise(),
                              generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        est.loss_and_grads(ce, x, y)
    for p in model.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("sampler", [ulr.iid, ulr.antithetic, ulr.sobol])
def test_memory_modes_match_store_on_cuda(monkeypatch, cnn, sampler):
    # several noise blocks per site: the accelerator path draws them in sequence
    monkeypatch.setattr(ulr.samplers, "_BLOCK_VALUES", 1)
    model = cnn.double().cuda()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64, device="cuda")
    y = torch.randint(0, 3, (3,), device="cuda")
    grads = {}
    for memory, chunk in (("store", None), ("chunked", 3), ("replay", None)):
        model.zero_grad(set_to_none=True)
        ulr.LikelihoodRatio(model, num_copies=6, sampler=sampler(), memory=memory,
                            chunk_size=chunk, baseline=ulr.baselines.clean(),
                            generator=torch.Generator(device="cuda").manual_seed(0)
                            ).loss_and_grads(ce, x, y)
        grads[memory] = [p.grad.clone() for p in model.parameters()]
    for memory in ("chunked", "replay"):
        for a, b in zip(grads[memory], grads["store"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_vectorised_es_matches_one_forward_per_member_on_cuda(cnn):
    from ulr.peers import EvolutionStrategies

    model = cnn.cuda()
    torch.manual_seed(1)
    x, y = torch.randn(5, 1, 6, 6).cuda(), torch.randint(0, 3, (5,)).cuda()
    got = []
    for per in (None, 1):
        est = EvolutionStrategies(model, population=8, members_per_forward=per,
                                  generator=torch.Generator().manual_seed(3))
        model.zero_grad(set_to_none=True)
        est.loss_and_grads(ce, x, y)
        assert est.vectorize_error is None
        got.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*got):
        torch.testing.assert_close(a, b)


def test_step_allocation_and_the_run_peak_on_cuda():
    from ulr.train import RunConfig, fit

    summary = fit(RunConfig(method="ulr", device="cuda", epochs=1, max_steps=4, batch_size=64))
    assert 0 < summary["step_peak_mb"] <= summary["peak_cuda_mb"]
