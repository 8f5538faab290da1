"""The sites of one model: which modules (found at construction) and which marks (met at run
time) get noise, and which noise each one gets."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..functional import has_closed_form
from ..noise import Gaussian, Noise, WeightNoise
from ..sites import SiteSpec

__all__ = ["DEFAULT_SIGMA", "NoiseArg", "Site", "SiteTable"]

DEFAULT_SIGMA = 0.1

NoiseArg = Noise | Mapping[str, Noise | WeightNoise] | Callable[[str], Noise] | None


@dataclass(frozen=True)
class Site:
    """One noise site: its name, its noise and its module (``None`` for a mark).
    ``closed_form``: a Linear/Conv whose weight gradient needs no autograd; ``weight_noise``:
    the noise is per-example weight noise, not output noise."""

    name: str
    noise: Noise
    module: nn.Module | None
    closed_form: bool
    weight_noise: bool = False


class SiteTable:
    """The sites that ``spec`` selects in ``model``, with the noise ``noise`` resolves to.

    Module sites are found at construction (``modules``, in ``named_modules()`` order); marks
    are decided the first time they are met (:meth:`mark`).
    """

    def __init__(self, model: nn.Module, spec: SiteSpec, noise: NoiseArg) -> None:
        self.spec, self.noise = spec, noise
        self.modules: dict[nn.Module, Site] = {}
        for name, module in model.named_modules():
            if module in self.modules:
                continue
            choice = spec.choose(name, module)
            if choice:
                self.modules[module] = self._make(name, module, choice)
        if not self.modules and not spec.selects_marks:
            raise ValueError(
                f"no site found: the spec {spec!r} selects no module of "
                f"{type(model).__name__}; check the types or names (see model.named_modules())"
            )
        self.marks: dict[str, Site | None] = {}

    def mark(self, name: str) -> Site | None:
        """The site of the mark ``name``, or ``None`` when the spec does not select it."""
        if name not in self.marks:
            choice = self.spec.choose(name, None)
            self.marks[name] = self._make(name, None, choice) if choice else None
        return self.marks[name]

    def all(self) -> list[Site]:
        """Every site: the module sites, then the marks met so far."""
        return [*self.modules.values(), *filter(None, self.marks.values())]

    def by_name(self, name: str) -> Site | None:
        """A module site or a mark by name (``None`` if it is no site)."""
        for site in self.modules.values():
            if site.name == name:
                return site
        return self.mark(name)

    def closed_form_covers(self, params: list[nn.Parameter]) -> bool:
        """Whether every parameter of ``params`` is owned by a closed-form module site (then
        no pass needs autograd)."""
        if any(not s.closed_form for s in self.modules.values()):
            return False
        owners = {id(p) for m in self.modules for p in m.parameters(recurse=False)}
        return all(id(p) in owners for p in params)

    def _make(self, name: str, module: nn.Module | None, choice: Any) -> Site:
        noise = self._resolve_noise(name, choice)
        weight = isinstance(noise, WeightNoise)
        if weight:
            if module is None or not has_closed_form(module):
                raise ValueError(
                    f"weight noise needs a plain nn.Linear or nn.Conv1d/2d/3d site, but "
                    f"{name!r} is {type(module).__name__ if module is not None else 'a mark'}; "
                    f"use output noise there"
                )
            noise = noise.noise
        return Site(name, noise, module, module is not None and has_closed_form(module), weight)

    def _resolve_noise(self, name: str, choice: Any) -> Noise | WeightNoise:
        if isinstance(choice, (Noise, WeightNoise)):
            return choice
        noise = self.noise
        if noise is None:
            return Gaussian(DEFAULT_SIGMA)
        if isinstance(noise, (Noise, WeightNoise)):
            return noise
        if isinstance(noise, Mapping):
            for pattern, n in noise.items():
                if fnmatch.fnmatchcase(name, pattern):
                    if not isinstance(n, (Noise, WeightNoise)):
                        raise TypeError(f"noise[{pattern!r}] must be a ulr.Noise, got {n!r}")
                    return n
            raise ValueError(
                f"site {name!r} matches no pattern of the noise mapping {list(noise)}; "
                f"add an entry for it or a '*' default"
            )
        n = noise(name)
        if not isinstance(n, (Noise, WeightNoise)):
            raise TypeError(f"noise({name!r}) must return a ulr.Noise, got {n!r}")
        return n
