"""Loss transforms: per-copy losses -> the weights that multiply each copy's noise.

Every estimator that perturbs and weighs does this step: the likelihood-ratio estimator turns the
losses of its ``K`` copies into the weights of the score (a *baseline*, or control variate), and
evolution strategies turn the losses of their ``P`` population members into the weights of the
weight noise (*fitness shaping*). Both are members of one family, :class:`Transform`:

* losses are laid out copies first: ``[K, B]`` for :class:`ulr.LikelihoodRatio` (copy-major, one
  column per example), ``[P]`` for :class:`ulr.peers.EvolutionStrategies` (one mean loss per
  member); a transform returns weights of the same shape, computed along the copy dimension;
* a :class:`Context` says what besides the losses a transform may use (which copies share noise,
  the noise-free losses, the name of the pass);
* stateful transforms keep their state in ``state_dict()`` / ``load_state_dict()``, which the
  estimators include in theirs; :func:`chain` composes transforms (as optax's ``chain``).

Baselines (:func:`none`, :func:`leave_one_out`, :func:`clean`, :func:`running_average`) keep the
LR estimate unbiased: the value subtracted from a copy's loss never depends on that copy's own
noise, so ``E[c · score(z)] = 0`` and only the variance changes (it scales with ``Var(L)``
instead of ``E[L²]``). Shapings (:func:`centered_ranks`, :func:`standardized`) also rescale and
are biased; they suit evolution strategies with an adaptive optimizer.

:mod:`ulr.baselines` and :mod:`ulr.peers.shaping` are the familiar spellings of these members.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Context",
    "Transform",
    "centered_ranks",
    "chain",
    "clean",
    "leave_one_out",
    "none",
    "running_average",
    "standardized",
]


@dataclass(frozen=True)
class Context:
    """What a transform may use besides the losses.

    Attributes:
        copy_groups: ``[K]`` group id per copy; copies in the same group share noise
            (e.g. antithetic partners) and must not serve as each other's baseline.
        clean_losses: ``[B]`` noise-free losses of the examples, when a transform asked for them.
        key: name of the pass (layer-wise plans run one pass per site group).
    """

    copy_groups: Tensor
    clean_losses: Tensor | None = None
    key: str = "all"


def _context(context: Context | None, losses: Tensor) -> Context:
    # Called without a context (e.g. ``centered_ranks()(losses)``), every copy has its own
    # noise: each is its own group.
    return Context(torch.arange(losses.shape[0])) if context is None else context


class Transform:
    """Base class: ``transform(losses, context=None) -> weights``, both copies first.

    Attributes:
        needs_clean: the estimator must compute the noise-free losses and pass them in the
            :class:`Context` (an extra forward on ``B`` rows).
        row_local: a row's weight depends only on that row's loss and the context, not on the
            other copies: then chunked estimation needs a single sweep over the copies.
    """

    needs_clean: bool = False
    row_local: bool = False

    def __call__(self, losses: Tensor, context: Context | None = None) -> Tensor:
        raise NotImplementedError

    def check(self, num_copies: int, copy_groups: Tensor) -> None:
        """Raise ``ValueError`` if this transform cannot work with these copies."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# -- baselines: unbiased, variance only --------------------------------------------------------
class _None(Transform):
    row_local = True

    def __call__(self, losses, context=None):
        return losses

    def __repr__(self) -> str:
        return "none()"


class _LeaveOneOut(Transform):
    def check(self, num_copies, copy_groups):
        if int(copy_groups.unique().numel()) < 2:
            raise ValueError(
                f"leave_one_out() needs copies from at least two independent groups, but the "
                f"sampler makes {num_copies} copies that all depend on each other; use "
                f"num_copies >= 2 (>= 4 with antithetic sampling) or another baseline"
            )

    def __call__(self, losses, context=None):
        groups = _context(context, losses).copy_groups.to(losses.device)
        rows = losses.reshape(losses.shape[0], -1)  # [K] -> [K, 1]; [K, B] stays
        num_groups = int(groups.max()) + 1
        group_sum = torch.zeros(num_groups, rows.shape[1], dtype=rows.dtype,
                                device=rows.device).index_add_(0, groups, rows)
        group_size = torch.bincount(groups, minlength=num_groups).to(rows.dtype)
        others = rows.sum(0, keepdim=True) - group_sum[groups]
        count = rows.shape[0] - group_size[groups]
        return (rows - others / count.unsqueeze(1)).view_as(losses)

    def __repr__(self) -> str:
        return "leave_one_out()"


class _Clean(Transform):
    needs_clean = True
    row_local = True

    def __call__(self, losses, context=None):
        if context is None or context.clean_losses is None:
            raise RuntimeError("clean() baseline called without clean losses")
        return losses - context.clean_losses.to(losses.dtype).unsqueeze(0)

    def __repr__(self) -> str:
        return "clean()"


class _RunningAverage(Transform):
    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"running_average(decay) needs 0 <= decay < 1, got {decay}")
        self.decay = decay
        self.values: dict[str, float] = {}

    def __call__(self, losses, context=None):
        key = _context(context, losses).key
        previous = self.values.get(key)
        mean = float(losses.mean())
        self.values[key] = (
            mean if previous is None else self.decay * previous + (1 - self.decay) * mean
        )
        return losses if previous is None else losses - previous

    def state_dict(self) -> dict:
        return {"values": dict(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = dict(state.get("values", {}))

    def __repr__(self) -> str:
        return f"running_average({self.decay})"


# -- shapings: rescale as well, biased -----------------------------------------------------------
class _CenteredRanks(Transform):
    def __call__(self, losses, context=None):
        n = losses.shape[0]
        if n < 2:
            return torch.zeros_like(losses)
        # float32 ranks for float16/32 losses (exact up to 2^24 copies), float64 for float64
        dtype = torch.promote_types(losses.dtype, torch.float32)
        order = torch.argsort(losses, dim=0, stable=True)
        steps = torch.arange(n, dtype=dtype, device=losses.device)
        ranks = torch.empty(losses.shape, dtype=dtype, device=losses.device).scatter_(
            0, order, steps.view(-1, *[1] * (losses.dim() - 1)).expand(losses.shape))
        return ranks / (n - 1) - 0.5

    def __repr__(self) -> str:
        return "centered_ranks()"


class _Standardized(Transform):
    def __call__(self, losses, context=None):
        if losses.shape[0] < 2:
            return torch.zeros_like(losses)
        std = losses.std(0)
        centered = losses - losses.mean(0)
        return torch.where(std > 0, centered / std, centered)

    def __repr__(self) -> str:
        return "standardized()"


class _Chain(Transform):
    def __init__(self, parts: tuple[Transform, ...]) -> None:
        for p in parts:
            if not isinstance(p, Transform):
                raise TypeError(f"chain() takes loss transforms such as "
                                f"ulr.baselines.leave_one_out(), got {p!r}")
        self.parts = parts
        self.needs_clean = any(p.needs_clean for p in parts)
        self.row_local = all(p.row_local for p in parts)

    def check(self, num_copies, copy_groups):
        for p in self.parts:
            p.check(num_copies, copy_groups)

    def __call__(self, losses, context=None):
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


def none() -> Transform:
    """No baseline: the weight of a copy is its loss."""
    return _None()


def leave_one_out() -> Transform:
    """Subtract the mean loss of the *other* copies of the same example.

    Copies that share noise with the row (its antithetic partner) are left out of the mean, so
    the baseline never depends on the row's own noise and the estimate stays unbiased. The
    estimator's default (free, and ~500x less variance than none() at equal forward rows).
    """
    return _LeaveOneOut()


def clean() -> Transform:
    """Subtract the noise-free loss of the same example (one extra forward on ``B`` rows)."""
    return _Clean()


def running_average(decay: float = 0.9) -> Transform:
    """Subtract an exponential moving average of earlier steps' mean loss (one per pass).

    The average is taken before the current losses are added, so it does not depend on the
    current noise. The first step has no baseline.
    """
    return _RunningAverage(decay)


def centered_ranks() -> Transform:
    """Rank the losses along the copies (0 = lowest) and map ranks linearly onto ``[-0.5, 0.5]``.

    OpenAI-ES's ``compute_centered_ranks`` (Salimans et al. 2017, after Wierstra et al. 2014):
    invariant to any increasing transform of the loss and robust to outliers, at the price of a
    bias — the estimate follows the gradient's direction only approximately and loses its scale
    (for a linear loss ``E[ĝ] ∝ ∇L``). Ties are ranked in copy order. The weights are float32
    (float64 for float64 losses); fewer than two copies give zeros.
    """
    return _CenteredRanks()


def standardized() -> Transform:
    """``(L - mean(L)) / std(L)`` along the copies (EvoTorch's ``"normalized"`` ranking):
    a baseline plus a scale; biased by ``O(1/K)`` since mean and std use every copy. A column
    with zero spread is only centered; fewer than two copies give zeros."""
    return _Standardized()


def chain(*transforms: Transform) -> Transform:
    """Apply transforms one after another (each maps weights to weights of the same shape);
    the chain needs the clean losses if one part does, and its state is its parts' states."""
    return _Chain(transforms)
