"""Choosing noise sites.

A **site** is a place in the forward pass whose value ``v`` is replaced by ``v + z`` during a
perturbed pass. There are two kinds:

* a **module site**: the output of a module, hooked without touching the module's code;
* a **mark**: a value inside a custom ``forward`` passed through :func:`perturb`, e.g. the
  pre-activation of a hand-written RNN cell. ``perturb`` is the identity when no estimator
  is running, so the model behaves normally everywhere else.

Site specifications say which module sites and which marks are perturbed, and optionally with
which noise. They compose with ``|`` (union; the first spec that gives a noise wins)::

    ulr.sites.by_type(nn.Linear, nn.Conv2d) | ulr.sites.marked("rnn.*")

Names are qualified module names as in ``model.named_modules()`` (or the mark's name) and may
use shell-style wildcards (``"encoder.*.proj"``).
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from .noise import Noise, WeightNoise

__all__ = [
    "SiteSpec",
    "by_type",
    "by_name",
    "where",
    "param_owners",
    "named_param_owners",
    "marked",
    "perturb",
    "copy_layout",
    "as_spec",
]

#: What a spec answers for one candidate: ``None`` (not a site), ``True`` (a site with the
#: estimator's noise), a :class:`~ulr.Noise` (a site with this output noise) or a
#: :class:`~ulr.WeightNoise` (a Linear/Conv site with per-example weight noise).
Choice = Noise | WeightNoise | bool | None


class SiteSpec:
    """Selects module sites and marks. Subclasses override :meth:`choose`."""

    def choose(self, name: str, module: nn.Module | None) -> Choice:
        """Decide for module ``module`` named ``name``, or for a mark (``module is None``)."""
        raise NotImplementedError

    @property
    def selects_marks(self) -> bool:
        """Whether this spec can select marks at all (they are only seen at run time)."""
        return False

    def __or__(self, other: SiteSpec) -> SiteSpec:
        return _Union(self, as_spec(other))

    def __ror__(self, other: Any) -> SiteSpec:
        return _Union(as_spec(other), self)


class _Union(SiteSpec):
    def __init__(self, *specs: SiteSpec) -> None:
        self.specs = specs

    def choose(self, name, module):
        found: Choice = None
        for spec in self.specs:
            c = spec.choose(name, module)
            if isinstance(c, (Noise, WeightNoise)):
                return c
            found = found or c
        return found

    @property
    def selects_marks(self) -> bool:
        return any(s.selects_marks for s in self.specs)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.specs))


def _check_noise(noise: Noise | WeightNoise | None) -> Noise | WeightNoise | bool:
    if noise is None:
        return True
    if not isinstance(noise, (Noise, WeightNoise)):
        raise TypeError(f"noise must be a ulr noise (e.g. ulr.Gaussian(0.05)) or "
                        f"ulr.weight_noise(...), got {noise!r}")
    return noise


class _ByType(SiteSpec):
    def __init__(self, types: tuple[type, ...], noise: Noise | None) -> None:
        if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError(f"by_type() takes nn.Module subclasses, got {types!r}")
        self.types, self.noise = types, _check_noise(noise)

    def choose(self, name, module):
        return self.noise if module is not None and isinstance(module, self.types) else None

    def __repr__(self) -> str:
        return f"by_type({', '.join(t.__name__ for t in self.types)})"


class _ByName(SiteSpec):
    def __init__(self, patterns: Mapping[str, Noise | None], marks: bool | None) -> None:
        self.patterns = {p: _check_noise(n) for p, n in patterns.items()}
        self.marks = marks  # None: both kinds; True: marks only

    def choose(self, name, module):
        if self.marks and module is not None:
            return None
        for pattern, noise in self.patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                return noise
        return None

    @property
    def selects_marks(self) -> bool:
        return True

    def __repr__(self) -> str:
        fn = "marked" if self.marks else "by_name"
        return f"{fn}({', '.join(map(repr, self.patterns))})"


class _Where(SiteSpec):
    def __init__(self, predicate: Callable[[str, nn.Module | None], bool], noise) -> None:
        if not callable(predicate):
            raise TypeError(f"where() takes a callable (name, module) -> bool, got {predicate!r}")
        self.predicate, self.noise = predicate, _check_noise(noise)

    def choose(self, name, module):
        return self.noise if self.predicate(name, module) else None

    @property
    def selects_marks(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"where({getattr(self.predicate, '__name__', self.predicate)!r})"


class _ParamOwners(SiteSpec):
    def __init__(self, noise: Noise | None) -> None:
        self.noise = _check_noise(noise)

    def choose(self, name, module):
        return self.noise if module is not None and _owns_parameter(module) else None

    def __repr__(self) -> str:
        return "param_owners()"


def by_type(*types: type[nn.Module], noise: Noise | None = None) -> SiteSpec:
    """The output of every module that is an instance of one of ``types``."""
    return _ByType(types, noise)


def by_name(*patterns: str | Mapping[str, Noise], noise: Noise | None = None) -> SiteSpec:
    """Module outputs or marks whose qualified name matches one of ``patterns``.

    Patterns may be shell-style wildcards. A mapping ``{pattern: noise}`` gives each pattern
    its own noise, e.g. ``by_name({"0": ulr.Gaussian(0.1), "2": ulr.Gaussian(0.02)})``.
    """
    table: dict[str, Noise | None] = {}
    for p in patterns:
        if isinstance(p, Mapping):
            table.update(p)
        elif isinstance(p, str):
            table[p] = noise
        else:
            raise TypeError(f"by_name() takes names or a mapping name -> noise, got {p!r}")
    if not table:
        raise ValueError("by_name() needs at least one name")
    return _ByName(table, marks=None)


def marked(*patterns: str, noise: Noise | None = None) -> SiteSpec:
    """Marks made with :func:`perturb` whose name matches one of ``patterns`` (default: all)."""
    return _ByName({p: noise for p in patterns or ("*",)}, marks=True)


def where(
    predicate: Callable[[str, nn.Module | None], bool], *, noise: Noise | None = None
) -> SiteSpec:
    """Sites for which ``predicate(name, module)`` is true (``module`` is None for marks)."""
    return _Where(predicate, noise)


def param_owners(*, noise: Noise | None = None) -> SiteSpec:
    """The output of every module that directly owns a trainable parameter (the default)."""
    return _ParamOwners(noise)


def _owns_parameter(module: nn.Module, trainable: bool = True) -> bool:
    return any(p.requires_grad or not trainable for p in module.parameters(recurse=False))


def named_param_owners(model: nn.Module, *,
                       trainable: bool = True) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` that directly owns a parameter (one with
    ``requires_grad`` unless ``trainable=False``), in ``model.named_modules()`` order, each module
    once. These are the sites :func:`param_owners` selects: the layers of pure ULR.

    Example:
        >>> import ulr
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [name for name, _ in ulr.sites.named_param_owners(net)]
        ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if _owns_parameter(m, trainable)]


def as_spec(sites: Any) -> SiteSpec:
    """Normalise a ``sites=`` argument: a spec, ``None`` (default), or an iterable of names."""
    if sites is None:
        return param_owners()
    if isinstance(sites, SiteSpec):
        return sites
    if isinstance(sites, str):
        return by_name(sites)
    if isinstance(sites, Mapping):
        return by_name(sites)
    if isinstance(sites, Iterable):
        names = list(sites)
        if all(isinstance(n, str) for n in names):
            return by_name(*names)
    raise TypeError(
        "sites must be a ulr.sites spec (by_type, by_name, where, marked, param_owners), "
        f"a list of names, or None, got {sites!r}"
    )


# --------------------------------------------------------------------------------------------
# The `perturb` primitive: identity unless an estimator's pass is running on this thread.

_active = threading.local()


def _stack() -> list:
    stack = getattr(_active, "stack", None)
    if stack is None:
        stack = _active.stack = []
    return stack


def perturb(name: str, x: Tensor) -> Tensor:
    """Mark ``x`` as a potential noise site called ``name``; returns ``x`` or ``x + z``.

    Outside a perturbed pass this is the identity (and costs one attribute lookup). Inside one,
    if the estimator's site spec selects ``name`` (see :func:`marked`), the value is cut from
    the upstream graph and noise is added; the parameters that produced ``x`` since the previous
    site get their gradient by a local vector-Jacobian product from this mark.

    Example:
        >>> import torch, ulr
        >>> x = torch.ones(2)
        >>> ulr.perturb("pre", x) is x   # no estimator running
        True
    """
    stack = getattr(_active, "stack", None)
    if not stack:
        return x
    if not isinstance(name, str):
        raise TypeError(f"perturb() needs a str name, got {name!r}")
    return stack[-1].mark(name, x)


def copy_layout() -> tuple[int, int] | None:
    """``(num_copies, batch)`` of the perturbed pass running on this thread, else ``None``.

    For layers that must treat copies specially, e.g. a BatchNorm that normalises each copy
    group separately: rows ``k·B : (k+1)·B`` are copy ``k`` of the batch.
    """
    stack = getattr(_active, "stack", None)
    if not stack:
        return None
    run = stack[-1]
    return run.num_copies, run.batch
