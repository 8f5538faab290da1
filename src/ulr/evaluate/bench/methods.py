"""The benchmarked estimators: ULR (best and plain), ES, SPSA/MeZO, forward gradient,
backprop and, when ``evotorch`` is installed, EvoTorch's PGPE and SNES, each sized either for
training or to spend a given number of forward rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import baselines, plans
from ...estimator import LikelihoodRatio
from ...noise import Gaussian
from ...peers import SPSA, Backprop, EvolutionStrategies, ForwardGradient
from ...samplers import antithetic, iid
from ...train.recipes import recommended_noise
from .harness import parameter_owners

ES_SIGMA = 0.02
SPSA_EPS = 1e-3


@dataclass(frozen=True)
class Method:
    """A benchmarked estimator.

    Attributes:
        key: short name used in tables and JSON.
        label: what it is, for the report.
        build: ``build(model, generator, rows_per_example) -> estimator``. With
            ``rows_per_example=None`` the training configuration; otherwise the configuration
            whose forward rows per example come as close to it as the method allows.
        missing: ``missing() -> reason`` why the method cannot run here (an optional package
            not installed), ``None`` when it can; ``None`` for methods that always run.
    """

    key: str
    label: str
    build: Callable[[nn.Module, torch.Generator, int | None], Any]
    missing: Callable[[], str | None] | None = None

    def unavailable(self) -> str | None:
        """Why this method cannot run here, or ``None``."""
        return None if self.missing is None else self.missing()


def _site_sigma(model: nn.Module) -> dict[str, Any]:
    # The model's recommended output noise, as `ulr train --recommended` reads it.
    if not hasattr(model, "ulr_config"):
        return {"*": Gaussian(0.1)}
    return recommended_noise(model, Gaussian, weights=False)[0]


def _train_copies(model: nn.Module) -> int:
    # Per-layer copies of the layer-wise plan in training; convolutional nets get fewer
    # because each of their passes is far more expensive on a CPU.
    return 8 if any(isinstance(m, nn.Conv2d) for m in model.modules()) else 16


def _ulr_best(model, generator, rows):
    # Sized by rows: 1 clean discovery pass + one pass of K copies per site.
    k = (_train_copies(model) if rows is None
         else max(4, 2 * ((rows - 1) // len(parameter_owners(model)) // 2)))
    return LikelihoodRatio(model, noise=_site_sigma(model), num_copies=k, sampler=antithetic(),
                           baseline=baselines.leave_one_out(), plan=plans.layerwise(),
                           generator=generator)


def _ulr_iid(model, generator, rows):
    k = 32 if rows is None else max(1, rows)
    return LikelihoodRatio(model, noise=_site_sigma(model), num_copies=k, sampler=iid(),
                           baseline=baselines.none(), plan=plans.all_sites(),
                           generator=generator)


def _es(model, generator, rows):
    pop = 32 if rows is None else max(2, 2 * (rows // 2))
    return EvolutionStrategies(model, sigma=ES_SIGMA, population=pop, generator=generator)


def _spsa(model, generator, rows):
    n = 1 if rows is None else max(1, rows // 2)
    return SPSA(model, eps=SPSA_EPS, num_directions=n, generator=generator)


def _fg(model, generator, rows):
    return ForwardGradient(model, num_tangents=1 if rows is None else max(1, rows),
                           generator=generator)


def _bp(model, generator, rows):
    return Backprop(model)


def _evotorch(kind):
    def build(model, generator, rows):
        from .evotorch_peers import EvoTorchSearch

        pop = 32 if rows is None else max(2, 2 * (rows // 2))
        return EvoTorchSearch(model, kind, sigma=ES_SIGMA, popsize=pop, generator=generator)
    return build


def _evotorch_missing() -> str | None:
    from .evotorch_peers import missing

    return missing()


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("bp", "backprop (exact minibatch gradient)", _bp),
    Method("ulr", "ULR best: layer-wise plan, antithetic pairs, leave-one-out baseline", _ulr_best),
    Method("ulr-iid", "ULR plain: all sites in one pass, i.i.d. noise, no baseline", _ulr_iid),
    Method("es", f"ES: antithetic Gaussian weight noise σ={ES_SIGMA}, centered ranks", _es),
    Method("spsa", f"SPSA/MeZO: two-point Gaussian, ε={SPSA_EPS:g}", _spsa),
    Method("forward-gradient", "forward gradient: torch.func.jvp, Gaussian tangents", _fg),
    Method("pgpe", f"EvoTorch PGPE: symmetric Gaussian σ={ES_SIGMA} (adapted), centered ranks, "
                   f"batched population (optional: pip install evotorch)", _evotorch("pgpe"),
           _evotorch_missing),
    Method("snes", f"EvoTorch SNES: separable Gaussian σ={ES_SIGMA} (adapted), NES utilities, "
                   f"batched population (optional: pip install evotorch)", _evotorch("snes"),
           _evotorch_missing),
)}

#: Other names accepted for a method (``fg``: the name before ``ulr train``'s was adopted).
ALIASES = {"fg": "forward-gradient"}


def canonical(key: str) -> str:
    """``key`` with :data:`ALIASES` resolved."""
    return ALIASES.get(key, key)


def build_estimator(key: str, model: nn.Module, generator: torch.Generator,
                    rows_per_example: int | None = None) -> Any:
    """The benchmark's estimator ``key`` (one of :data:`METHODS`) for ``model``."""
    key = canonical(key)
    if key not in METHODS:
        raise ValueError(f"unknown method {key!r}; choose from {list(METHODS)}")
    return METHODS[key].build(model, generator, rows_per_example)


def describe(key: str, model: nn.Module, rows_per_example: int | None = None) -> str:
    """The estimator's configuration in words (copies, population, directions...)."""
    est = build_estimator(key, model, torch.Generator().manual_seed(0), rows_per_example)
    if isinstance(est, LikelihoodRatio):
        plan = "layer-wise" if isinstance(est.plan, plans._Layerwise) else "all sites"
        return f"K={est.num_copies} copies per {'layer' if plan == 'layer-wise' else 'pass'}"
    if isinstance(est, EvolutionStrategies):
        return f"population {est.population}"
    if isinstance(est, SPSA):
        return f"{est.num_directions} direction(s)"
    if isinstance(est, ForwardGradient):
        return f"{est.num_tangents} tangent(s)"
    if hasattr(est, "popsize"):
        return f"population {est.popsize}"
    return "exact"

