"""ulr: train neural networks without backpropagation, by the Unified Likelihood Ratio method.

Noise is injected at chosen sites of any PyTorch model; from noisy forward passes alone
:class:`LikelihoodRatio` estimates every parameter's gradient and accumulates it into
``p.grad``, so any ``torch.optim`` optimizer can use it.
"""

from . import baselines, functional, hybrid, plans, samplers, sites, transforms
from .allocator import tune_allocator
from .estimator import LikelihoodRatio, replicate
from .noise import Gaussian, Laplace, Logistic, Noise, WeightNoise, weight_noise
from .samplers import antithetic, iid, sobol
from .schedules import NoiseSchedule
from .sites import copy_layout, perturb

__version__ = "0.2.0"

_LAZY = ("data", "models", "train", "peers", "evaluate", "distributed", "finetune")
#: Functions of the training product, loaded on first use: ulr.fit(model, data, ...) and
#: ulr.load_run(run_dir) (see ulr.train.api).
_LAZY_FUNCTIONS = {"fit": "train.api", "load_run": "train.api"}


def __getattr__(name: str):
    # Subpackages with optional dependencies load on first use: `import ulr` stays light.
    import importlib

    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module 'ulr' has no attribute {name!r}")

__all__ = [
    "LikelihoodRatio",
    "Gaussian",
    "Laplace",
    "Logistic",
    "Noise",
    "NoiseSchedule",
    "WeightNoise",
    "weight_noise",
    "antithetic",
    "iid",
    "sobol",
    "perturb",
    "copy_layout",
    "replicate",
    "tune_allocator",
    "baselines",
    "functional",
    "hybrid",
    "plans",
    "samplers",
    "sites",
    "transforms",
    "__version__",
    "fit",
    "load_run",
]
