"""Baselines (control variates): per-copy losses -> the weights that multiply the noise score.

The LR estimate of a site is ``mean_rows w · J^T score(z)``. With ``w = L`` it is unbiased but
its variance scales with ``E[L²]``; subtracting a value ``c`` that does not depend on the row's
own noise keeps it unbiased (``E[c · score(z)] = 0``) and leaves a variance that scales with
``Var(L)``. Each baseline here is one small object; :func:`chain` composes them.

A baseline is called with the losses of one pass laid out ``[K, B]`` (copy-major) and a
:class:`Context`, and returns weights of the same shape. Stateful baselines expose
``state_dict()`` / ``load_state_dict()``, which :meth:`LikelihoodRatio.state_dict` includes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Baseline", "Context", "none", "leave_one_out", "clean", "running_average", "chain"]


@dataclass(frozen=True)
class Context:
    """What a baseline may use besides the losses.

    Attributes:
        copy_groups: ``[K]`` group id per copy; copies in the same group share noise
            (e.g. antithetic partners) and must not serve as each other's baseline.
        clean_losses: ``[B]`` noise-free losses of the examples, when a baseline asked for them.
        key: name of the pass (layer-wise plans run one pass per site group).
    """

    copy_groups: Tensor
    clean_losses: Tensor | None = None
    key: str = "all"


class Baseline:
    """Base class. ``needs_clean = True`` makes the estimator compute the clean losses."""

    needs_clean: bool = False
    #: True when a row's weight depends only on that row's loss and the context, not on the
    #: other copies: then chunked estimation needs a single sweep over the copies.
    row_local: bool = False

    def __call__(self, losses: Tensor, context: Context) -> Tensor:
        raise NotImplementedError

    def check(self, num_copies: int, copy_groups: Tensor) -> None:
        """Raise ``ValueError`` if this baseline cannot work with these copies."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _None(Baseline):
    row_local = True

    def __call__(self, losses, context):
        return losses

    def __repr__(self) -> str:
        return "none()"


class _LeaveOneOut(Baseline):
    def check(self, num_copies, copy_groups):
        if int(copy_groups.unique().numel()) < 2:
            raise ValueError(
                f"leave_one_out() needs copies from at least two independent groups, but the "
                f"sampler makes {num_copies} copies that all depend on each other; use "
                f"num_copies >= 2 (>= 4 with antithetic sampling) or another baseline"
            )

    def __call__(self, losses, context):
        groups = context.copy_groups.to(losses.device)
        num_groups = int(groups.max()) + 1
        group_sum = torch.zeros(num_groups, losses.shape[1], dtype=losses.dtype,
                                device=losses.device).index_add_(0, groups, losses)
        group_size = torch.bincount(groups, minlength=num_groups).to(losses.dtype)
        others = losses.sum(0, keepdim=True) - group_sum[groups]
        count = losses.shape[0] - group_size[groups]
        return losses - others / count.unsqueeze(1)

    def __repr__(self) -> str:
        return "leave_one_out()"


class _Clean(Baseline):
    needs_clean = True
    row_local = True

    def __call__(self, losses, context):
        if context.clean_losses is None:
            raise RuntimeError("clean() baseline called without clean losses")
        return losses - context.clean_losses.to(losses.dtype).unsqueeze(0)

    def __repr__(self) -> str:
        return "clean()"


class _RunningAverage(Baseline):
    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"running_average(decay) needs 0 <= decay < 1, got {decay}")
        self.decay = decay
        self.values: dict[str, float] = {}

    def __call__(self, losses, context):
        previous = self.values.get(context.key)
        mean = float(losses.mean())
        self.values[context.key] = (
            mean if previous is None else self.decay * previous + (1 - self.decay) * mean
        )
        return losses if previous is None else losses - previous

    def state_dict(self) -> dict:
        return {"values": dict(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = dict(state.get("values", {}))

    def __repr__(self) -> str:
        return f"running_average({self.decay})"


class _Chain(Baseline):
    def __init__(self, parts: tuple[Baseline, ...]) -> None:
        for p in parts:
            if not isinstance(p, Baseline):
                raise TypeError(f"chain() takes baselines, got {p!r}")
        self.parts = parts
        self.needs_clean = any(p.needs_clean for p in parts)
        self.row_local = all(p.row_local for p in parts)

    def check(self, num_copies, copy_groups):
        for p in self.parts:
            p.check(num_copies, copy_groups)

    def __call__(self, losses, context):
        for p in self.parts:
            losses = p(losses, context)
        return losses

    def state_dict(self) -> dict:
        return {str(i): p.state_dict() for i, p in enumerate(self.parts)}

    def load_state_dict(self, state: dict) -> None:
        for i, p in enumerate(self.parts):
            p.load_state_dict(state.get(str(i), {}))

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.parts))})"


def none() -> Baseline:
    """No baseline: the weight of a copy is its loss."""
    return _None()


def leave_one_out() -> Baseline:
    """Subtract the mean loss of the *other* copies of the same example.

    Copies that share noise with the row (its antithetic partner) are left out of the mean, so
    the baseline never depends on the row's own noise and the estimate stays unbiased. The
    estimator's default (free, and ~500x less variance than none() at equal forward rows).
    """
    return _LeaveOneOut()


def clean() -> Baseline:
    """Subtract the noise-free loss of the same example (one extra forward on ``B`` rows)."""
    return _Clean()


def running_average(decay: float = 0.9) -> Baseline:
    """Subtract an exponential moving average of earlier steps' mean loss (one per pass).

    The average is taken before the current losses are added, so it does not depend on the
    current noise. The first step has no baseline.
    """
    return _RunningAverage(decay)


def chain(*baselines: Baseline) -> Baseline:
    """Apply baselines one after another (each maps ``[K, B]`` weights to ``[K, B]``)."""
    return _Chain(baselines)
