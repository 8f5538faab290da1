"""Reference models: shapes, registry, recommended ULR configurations, backprop sanity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ulr.models import (
    MLP,
    VGG8,
    LeNet5,
    ResNet5,
    Sign,
    available,
    build,
    recommended_config,
)

DIGITS, MNIST, CIFAR = (1, 8, 8), (1, 28, 28), (3, 32, 32)

# Exact parameter counts for num_classes=10, hand-derived from the layer lists in the docstrings.
EXPECTED_PARAMS = {
    ("mlp", (64,)): 64 * 128 + 128 + 128 * 10 + 10,
    ("mlp", DIGITS): 64 * 128 + 128 + 128 * 10 + 10,
    ("mlp", MNIST): 784 * 128 + 128 + 128 * 10 + 10,
    ("mlp", CIFAR): 3072 * 128 + 128 + 128 * 10 + 10,
    # conv1 + conv2 + fc1 (16*side^2 -> 120) + fc2 + fc3
    ("lenet5", DIGITS): 156 + 2416 + (64 * 120 + 120) + 10164 + 850,
    ("lenet5", MNIST): 156 + 2416 + (400 * 120 + 120) + 10164 + 850,
    ("lenet5", CIFAR): 456 + 2416 + (400 * 120 + 120) + 10164 + 850,
    # conv1 + conv2 + conv3 + conv4 + fc (32*side^2 -> 10)
    ("resnet5", DIGITS): 80 + 1168 + 4640 + 9248 + (32 * 10 + 10),
    ("resnet5", MNIST): 80 + 1168 + 4640 + 9248 + (288 * 10 + 10),
    ("resnet5", CIFAR): 224 + 1168 + 4640 + 9248 + (512 * 10 + 10),
    # six convs + fc1 (64*side^2 -> 256) + fc2
    ("vgg8", DIGITS): 160 + 2320 + 4640 + 9248 + 18496 + 36928 + (64 * 256 + 256) + 2570,
    ("vgg8", MNIST): 160 + 2320 + 4640 + 9248 + 18496 + 36928 + (576 * 256 + 256) + 2570,
    ("vgg8", CIFAR): 448 + 2320 + 4640 + 9248 + 18496 + 36928 + (1024 * 256 + 256) + 2570,
}
CASES = sorted(EXPECTED_PARAMS)


def _seeded(seed: int, fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _param_owners(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(False))}


@pytest.mark.parametrize(("name", "in_shape"), CASES)
def test_forward_shape_and_param_count(name: str, in_shape: tuple[int, ...]) -> None:
    model = build(name, in_shape=in_shape, num_classes=10)
    x = torch.randn(3, *in_shape, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[(name, in_shape)]


@pytest.mark.parametrize(
    ("model", "in_shape"),
    [
        (MLP(64, 7, hidden=(32, 16), activation="tanh"), (8, 8)),
        (MLP(40, 10, hidden=(), activation="sigmoid"), (40,)),
        (MLP(784, 10, hidden=(50,), activation="sign"), MNIST),
        (LeNet5(1, 10, 8), DIGITS),
        (LeNet5(3, 5, 32), CIFAR),
        (LeNet5(1, 10, 4), (1, 4, 4)),
        (LeNet5(1, 10, 30), (1, 30, 30)),
        (ResNet5(1, 10, 28), MNIST),
        (VGG8(3, 100, 16), (3, 16, 16)),
    ],
)
def test_direct_construction(model: nn.Module, in_shape: tuple[int, ...]) -> None:
    out = model(torch.zeros(2, *in_shape))
    assert out.shape == (2, model.num_classes)


def test_registry_names() -> None:
    assert {"lenet5", "mlp", "resnet5", "vgg8"} <= set(available())
    assert available() == sorted(available())
    assert isinstance(build("ResNet5", in_shape=MNIST, num_classes=10), ResNet5)
    model = build("mlp", in_shape=MNIST, num_classes=3, hidden=(16, 8), activation="tanh")
    assert isinstance(model, MLP)
    assert [m.out_features for m in model.hidden] == [16, 8]
    assert isinstance(model.acts[0], nn.Tanh)


def test_registry_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet18'") as info:
        build("resnet18", in_shape=CIFAR, num_classes=10)
    for name in available():
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "in_shape"),
    [
        ("lenet5", (64,)),
        ("lenet5", (1, 3, 3)),
        ("resnet5", (1, 28, 32)),
        ("resnet5", (1, 4, 4)),
        ("vgg8", (28, 28)),
        ("vgg8", (1, 28, 28, 1)),
        ("mlp", ()),
        ("mlp", (0, 5)),
    ],
)
def test_registry_bad_shape_says_which_work(name: str, in_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"takes .*(\(1, 28, 28\)|any shape)"):
        build(name, in_shape=in_shape, num_classes=10)


def test_registry_rejects_shape_kwargs() -> None:
    with pytest.raises(TypeError, match="derived from in_shape"):
        build("vgg8", in_shape=CIFAR, num_classes=10, input_size=28)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "gelu"}, "unknown activation"),
        ({"hidden": (16, 0)}, r"hidden\[1\]"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"in_features": 8, "num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        MLP(**args)


def test_too_small_input_size() -> None:
    with pytest.raises(ValueError, match="input_size >= 8"):
        VGG8(3, 10, input_size=7)


@pytest.mark.parametrize(("name", "in_shape"), CASES)
def test_recommended_config_covers_parametrised_modules(
    name: str, in_shape: tuple[int, ...]
) -> None:
    model = build(name, in_shape=in_shape, num_classes=10)
    config = recommended_config(model)
    assert set(config) <= {"sigma", "weight_sigma", "num_copies"}
    owners = set(_param_owners(model))
    weight = config.get("weight_sigma", {})
    assert set(config["sigma"]) | set(weight) == owners
    assert not set(config["sigma"]) & set(weight)
    assert set(config["num_copies"]) == owners
    noises = [*config["sigma"].values(), *weight.values()]
    assert all(isinstance(s, float) and 0 < s <= 1 for s in noises)
    assert all(isinstance(k, int) and k > 0 for k in config["num_copies"].values())
    # Callers may edit the dict; that must not leak into the next call.
    config["sigma"].clear()
    assert set(recommended_config(model)["sigma"]) | set(weight) == owners


def test_reference_configs_from_method_doc() -> None:
    resnet = ResNet5(3, 10, 32).ulr_config()
    assert list(resnet["num_copies"].values()) == [100, 200, 200, 100, 50]
    assert resnet["sigma"] == {"conv3": 0.1, "conv4": 0.1, "fc": 0.1}
    assert resnet["weight_sigma"] == {"conv1": 1e-3, "conv2": 1e-3}
    vgg = VGG8(3, 10, 32).ulr_config()
    assert list(vgg["num_copies"].values()) == [100, 200, 400, 800, 400, 200, 100, 50]
    assert set(vgg["sigma"].values()) == {1e-2} and set(vgg["sigma"]) == {"conv5", "conv6",
                                                                          "fc1", "fc2"}
    assert vgg["weight_sigma"] == dict.fromkeys(["conv1", "conv2", "conv3", "conv4"], 1e-3)
    mlp = MLP(64, 10, hidden=(32, 32)).ulr_config()
    assert list(mlp["num_copies"]) == ["hidden.0", "hidden.1", "out"]


def test_recommended_config_needs_ulr_config() -> None:
    with pytest.raises(TypeError, match="no recommended ULR configuration"):
        recommended_config(nn.Linear(2, 2))


@pytest.mark.parametrize(("name", "in_shape"), CASES)
def test_hookable_structure(name: str, in_shape: tuple[int, ...]) -> None:
    model = build(name, in_shape=in_shape, num_classes=10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    owners = _param_owners(model)
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in owners.values())
    # Each site must run exactly once per forward, and no module instance may be shared, so that
    # an output hook sees each layer's output once.
    calls = dict.fromkeys(dict(model.named_modules()), 0)
    handles = [
        m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
        for n, m in model.named_modules()
        if n
    ]
    model(torch.zeros(1, *in_shape))
    for handle in handles:
        handle.remove()
    assert all(calls[n] == 1 for n in owners)
    all_modules = [m for _, m in model.named_modules(remove_duplicate=False)]
    assert len({id(m) for m in all_modules}) == len(all_modules)


@pytest.mark.parametrize(
    ("name", "in_shape"), [("mlp", DIGITS), ("lenet5", DIGITS), ("resnet5", MNIST), ("vgg8", CIFAR)]
)
def test_backprop_sgd_step_reduces_loss(name: str, in_shape: tuple[int, ...]) -> None:
    model = _seeded(0, lambda: build(name, in_shape=in_shape, num_classes=10))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, *in_shape, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(x), y) < loss


def test_sign_activation() -> None:
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-8, 3.0], requires_grad=True)
    out = Sign()(x)
    assert out.tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
