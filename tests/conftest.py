import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ulr

# Registries for the generic suites (every new component is added here).
NOISES = {
    "gaussian": lambda: ulr.Gaussian(0.1),
    "laplace": lambda: ulr.Laplace(0.1),
    "logistic": lambda: ulr.Logistic(0.1),
}
SAMPLERS = {"iid": ulr.iid, "antithetic": ulr.antithetic, "sobol": ulr.sobol,
            "antithetic_sobol": lambda: ulr.antithetic(ulr.sobol())}
BASELINES = {
    "none": ulr.baselines.none,
    "leave_one_out": ulr.baselines.leave_one_out,
    "clean": ulr.baselines.clean,
    "running_average": ulr.baselines.running_average,
    "chain": lambda: ulr.baselines.chain(ulr.baselines.clean(), ulr.baselines.running_average()),
}
PLANS = {"all_sites": ulr.plans.all_sites, "layerwise": ulr.plans.layerwise}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 4))


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
    )
