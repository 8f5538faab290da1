"""EvoTorch's search distributions as peers of ``ulr bench`` (optional: ``pip install
evotorch``).

:class:`EvoTorchSearch` wraps EvoTorch's own pieces under the estimator contract of
:mod:`ulr.peers` so that the benchmark treats it like every other method (same Adam, same
learning-rate grid, same forward-row accounting):

* ``pgpe``: PGPE's distribution, ``evotorch.distributions.SymmetricSeparableGaussian``
  (antithetic pairs, centered ranks, gradients divided by the number of directions, σ adapted
  with PGPE's defaults: ``stdev_learning_rate=0.1``, ``stdev_max_change=0.2``);
* ``snes``: SNES's distribution, ``ExpSeparableGaussian`` (NES utilities, σ adapted by SNES's
  default rate ``0.2 (3 + ln n) / √n``).

Each call samples the population around the current weights from EvoTorch's distribution,
evaluates it in one batched forward (EvoTorch's ``make_functional_module`` under
``torch.func.vmap``, as EvoTorch evaluates populations), and writes the negated ``mu``
gradient of ``compute_gradients`` to ``p.grad`` (the optimizer then moves the centre, as
PGPE's own ClipUp/Adam would); σ is updated by the distribution's own rule. sep-CMA-ES has no
such gradient (it moves its centre by recombination) and is not wrapped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

#: The wrapped algorithms, with what they are.
KINDS = {"pgpe": "EvoTorch PGPE distribution (symmetric separable Gaussian, centered ranks)",
         "snes": "EvoTorch SNES distribution (exponential separable Gaussian, NES utilities)"}


def missing() -> str | None:
    """Why the EvoTorch peers cannot run here, or ``None`` when they can."""
    try:
        import evotorch  # noqa: F401
    except ImportError as e:
        return f"evotorch is not installed ({e}); pip install evotorch"
    return None


class EvoTorchSearch:
    """One of EvoTorch's search distributions (``kind`` in :data:`KINDS`) as a gradient
    estimator: ``popsize`` solutions per call (even for ``pgpe``), initial σ ``sigma``, all
    randomness from ``generator``."""

    def __init__(self, model: nn.Module, kind: str, *, sigma: float = 0.02, popsize: int = 32,
                 generator: torch.Generator | None = None) -> None:
        reason = missing()
        if reason is not None:
            raise ImportError(reason)
        from evotorch.distributions import ExpSeparableGaussian, SymmetricSeparableGaussian
        from evotorch.neuroevolution.net import make_functional_module

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        self.model, self.kind, self.popsize = model, kind, int(popsize)
        self.params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in self.params)
        self.sigma = torch.full((n,), float(sigma), dtype=self.params[0].dtype,
                                device=self.params[0].device)
        self.generator = generator if generator is not None else torch.Generator()
        self.fnet = make_functional_module(model)
        if kind == "pgpe":
            self.popsize += self.popsize % 2
            self.dist_cls = SymmetricSeparableGaussian
            self.extra = {"divide_mu_grad_by": "num_directions",
                          "divide_sigma_grad_by": "num_directions"}
            self.ranking, self.stdev_lr, self.max_change = "centered", 0.1, 0.2
        else:
            self.dist_cls, self.extra = ExpSeparableGaussian, {}
            self.ranking, self.max_change = "nes", None
            self.stdev_lr = 0.2 * (3 + math.log(n)) / math.sqrt(n)
        self.last_forward_rows = 0

    def loss_and_grads(self, loss_fn: Callable[..., Tensor], x: Tensor, y: Any) -> Tensor:
        from evotorch.tools import modify_tensor

        with torch.no_grad():
            mu = torch.nn.utils.parameters_to_vector(self.params).detach()
            dist = self.dist_cls({"mu": mu, "sigma": self.sigma, **self.extra})
            samples = dist.sample(self.popsize, generator=self.generator)
            outputs = torch.func.vmap(self.fnet, in_dims=(0, None))(samples, x)
            losses = torch.stack([loss_fn(out, y) for out in outputs])
            if not torch.isfinite(losses).all():
                raise ValueError("loss_fn returned non-finite losses")
            fitness = losses.mean(dim=1)
            grads = dist.compute_gradients(samples, fitness, objective_sense="min",
                                           ranking_method=self.ranking)
            updated = dist.update_parameters(grads, learning_rates={"mu": 0.0,
                                                                    "sigma": self.stdev_lr})
            self.sigma = (modify_tensor(self.sigma, updated.sigma, max_change=self.max_change)
                          if self.max_change is not None else updated.sigma)
            offset = 0
            for p in self.params:
                g = -grads["mu"][offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self.last_forward_rows = self.popsize * len(x)
        return fitness.mean()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "sigma": self.sigma.clone()}

    def __repr__(self) -> str:
        return f"EvoTorchSearch({self.kind!r}, popsize={self.popsize})"
