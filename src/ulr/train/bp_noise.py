"""``method="bp-noise"``: the ULR training noise on the sites, differentiated by backprop.

A second handler on the estimator's site specs: the sites are resolved by :mod:`ulr.sites`
(``config.sites`` by name, else every module that owns a trainable parameter) and their noise
by :func:`ulr.train.recipes.noise_for`, exactly as for ``method="ulr"``; only what happens at a
site differs (one draw added to the output, which backprop then differentiates).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import models
from ..sites import as_spec
from .config import RunConfig
from .recipes import check_patterns, noise_for, noise_generator

__all__ = ["NoiseInjection"]


class NoiseInjection:
    """The ULR training noise added to the site outputs of every training-mode forward pass.

    The sites and noise are the estimator's (``config.sites`` or every module that owns a
    parameter; ``config.noise`` with ``config.site_sigma``, then the model's recommended
    per-layer sigma with ``config.recommended``, then ``config.sigma``); all sites get noise at
    once, one draw per example and step (the all-sites smoothed loss that ULR estimates the
    gradient of, at the cost of one forward). Evaluation (``model.eval()``) is noise-free. The
    draws come from the run's noise stream and are checkpointed with it.

    Attributes:
        noises: ``{site name: noise}`` of every site.
        generator: the noise stream.
    """

    def __init__(self, config: RunConfig, model: nn.Module, device: torch.device) -> None:
        if config.recommended and models.recommended_config(model).get("weight_sigma"):
            raise ValueError(
                f"method 'bp-noise' adds output noise only, but the recommended config of "
                f"{config.model} puts weight noise on "
                f"{sorted(models.recommended_config(model)['weight_sigma'])}; drop "
                f"--recommended (one --sigma everywhere) for bp-noise")
        check_patterns("sites", config.sites or [], config, model)
        noise, _ = noise_for(config, model, weights=False)
        spec = as_spec(config.sites)
        # The root module is a site only as a parameter owner, never by a name pattern.
        modules = {n: m for n, m in model.named_modules()
                   if (n or config.sites is None) and spec.choose(n, m)}
        self.noises = {n: _resolve(noise, n) for n in modules}
        self.generator = noise_generator(config, device)
        self.handles = [m.register_forward_hook(self._hook(self.noises[n]))
                        for n, m in modules.items()]

    def _hook(self, noise: Any) -> Callable[..., Tensor]:
        def add_noise(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            if not module.training:
                return out
            z = noise.sample(out.shape, generator=self.generator, device=out.device,
                             dtype=out.dtype)
            return out + z

        return add_noise

    def state_dict(self) -> dict[str, Any]:
        """The noise stream's state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.generator.set_state(state["generator"])


def _resolve(noise: Any, name: str) -> Any:
    """The noise of site ``name``: the first matching pattern of a mapping (as the estimator
    resolves it), or the one noise of every site."""
    if not isinstance(noise, Mapping):
        return noise
    return next(z for p, z in noise.items() if fnmatch.fnmatchcase(name, p))
