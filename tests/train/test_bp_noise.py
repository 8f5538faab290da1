"""bp-noise: backprop through the ULR training noise, the control method of the robustness
study (docs/robustness.md). It belongs to the training product (ulr.train); issue 15 moves it
under tests/train/."""

import math

import pytest
import torch

from ulr.models import build
from ulr.train import NoiseInjection, RunConfig, fit

BP = dict(method="bp", epochs=3, threads=1, device="cpu")



def test_bp_noise_adds_the_configured_noise_in_training_mode_only():
    torch.manual_seed(0)
    model = build("mlp", in_shape=(1, 8, 8), num_classes=10)
    config = RunConfig(method="bp-noise", sigma=0.5, sites=["out"])
    NoiseInjection(config, model, torch.device("cpu"))
    x = torch.rand(2000, 1, 8, 8)
    model.eval()
    clean = model(x)
    assert torch.equal(clean, model(x))  # evaluation is noise-free
    model.train()
    z = (model(x) - clean).detach()
    assert abs(float(z.mean())) < 0.02
    assert float(z.std()) == pytest.approx(0.5, rel=0.02)  # 20000 draws: std error 0.5%
    assert not torch.equal(model(x), model(x))  # a fresh draw every pass


def test_bp_noise_sites_default_to_every_parameter_owner():
    model = build("lenet5", in_shape=(1, 8, 8), num_classes=10)
    inj = NoiseInjection(RunConfig(method="bp-noise"), model, torch.device("cpu"))
    assert list(inj.noises) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    rec = NoiseInjection(RunConfig(method="bp-noise", recommended=True, sigma=0.3), model,
                          torch.device("cpu"))
    assert all(math.isclose(n.scale, 0.05) for n in rec.noises.values())


def test_bp_noise_refuses_weight_noise_and_unknown_sites():
    model = build("resnet5", in_shape=(3, 16, 16), num_classes=10)
    with pytest.raises(ValueError, match="weight noise"):
        NoiseInjection(RunConfig(method="bp-noise", recommended=True), model,
                        torch.device("cpu"))
    with pytest.raises(ValueError, match="match no module"):
        NoiseInjection(RunConfig(method="bp-noise", sites=["nope"]),
                        build("mlp", in_shape=(64,), num_classes=10), torch.device("cpu"))


def test_bp_noise_trains_and_differs_from_bp():
    bp = fit(RunConfig(**BP))
    noisy = fit(RunConfig(**{**BP, "method": "bp-noise", "sigma": 0.3}))
    assert noisy["final"]["test_acc"] > 0.85
    assert noisy["final"]["train_loss"] != bp["final"]["train_loss"]
