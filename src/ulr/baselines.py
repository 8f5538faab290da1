"""Baselines (control variates) for :class:`ulr.LikelihoodRatio`: per-copy losses -> weights.

The LR estimate of a site is ``mean_rows w · J^T score(z)``. With ``w = L`` it is unbiased but
its variance scales with ``E[L²]``; subtracting a value ``c`` that does not depend on the row's
own noise keeps it unbiased (``E[c · score(z)] = 0``) and leaves a variance that scales with
``Var(L)``. A baseline is called with the losses of one pass laid out ``[K, B]`` (copy-major) and
a :class:`Context`, and returns weights of the same shape.

This module is the familiar spelling of the baselines of :mod:`ulr.transforms`, the one family of
loss transforms (``Baseline`` is :class:`ulr.transforms.Transform`); every member of that family,
the fitness shapings included, is accepted as ``baseline=``.
"""

from __future__ import annotations

from .transforms import Context, chain, clean, leave_one_out, none, running_average
from .transforms import Transform as Baseline

__all__ = ["Baseline", "Context", "none", "leave_one_out", "clean", "running_average", "chain"]
