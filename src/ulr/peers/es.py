"""Evolution strategies on the weights (OpenAI-ES / EvoTorch-style search gradient)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..contract import check_positive_float, check_positive_int, draw_seeds
from ..transforms import Context, Transform, centered_ranks
from ._zeroth import WeightPerturbation

__all__ = ["EvolutionStrategies"]

class _DefaultShaping:
    def __repr__(self) -> str:  # how the default shows in help() and signatures
        return "centered_ranks()"


_DEFAULT = _DefaultShaping()


class EvolutionStrategies(WeightPerturbation):
    r"""Gaussian evolution strategies: a search-gradient estimate from perturbed *weights*.

    A population of ``P`` weight vectors ``θ + σ ε_i`` (``ε_i ~ N(0, I)`` over all trainable
    parameters) is evaluated on the same batch; member ``i``'s fitness is its mean loss
    ``L_i`` over the ``B`` rows. With fitness shaping ``u = shaping(L)`` the estimate is

    .. math::
        \hat g = \frac{1}{P\,σ} \sum_{i=1}^{P} u_i\, ε_i,

    and with antithetic (mirrored) pairs ``ε_{i}, -ε_{i}`` the pair terms combine to
    :math:`\frac{1}{Pσ}\sum_{pairs} (u_i^+ - u_i^-)\, ε_i`.

    * ``shaping=None`` (raw losses): unbiased for the gradient of the Gaussian-smoothed loss
      :math:`F_σ(θ) = E_ε[L(θ + σε)]` (Stein's lemma); ``F_σ = L + O(σ²)``, and
      :math:`\nabla F_σ = \nabla L` exactly when ``L`` is quadratic in ``θ``. Antithetic +
      raw is the same estimator as :class:`ulr.peers.SPSA` with Gaussian directions.
    * ``shaping=centered_ranks()`` (default, as OpenAI-ES): biased — the estimate follows the
      gradient direction (for a linear loss ``E[ĝ] ∝ ∇L``) but its scale is that of ranks, not
      of the loss; use an adaptive optimizer (Adam) or tune the learning rate.

    Memory = inference: the noise is never stored. Member ``i`` is named by a seed from
    ``generator``; each parameter's noise is regenerated from it (:func:`seeded_noise`) while
    its module runs and again when ``ĝ`` is accumulated. The weights are restored bit-exactly.

    Cost: ``P`` forward evaluations of ``B`` rows per call (``last_forward_rows = P·B``); no
    backward pass, no activation storage. By default the members of a model without
    convolutions run together, as many per forward as fit in 256 MiB of stacked weights and
    noise: their weights are stacked and the model runs once through
    ``torch.func.vmap(functional_call)`` (``ulr.peers._batched``), each seed's noise drawn once
    and kept for the gradient. That is the same estimate (the same weights; losses equal to
    float rounding, so with rank shaping usually bit-identical) at a fraction of the cost
    (``benchmarks/es_cost.py``). With convolutions vmap is slower than one forward per member
    at image sizes such as 28x28, so those members run one by one unless
    ``members_per_forward`` asks. Models that vmap cannot run (train-mode BatchNorm, dropout
    and other random operations, ``.item()``, numpy) fall back to one forward per member, as
    does ``members_per_forward=1``, whose memory is
    that of inference. A parameter is perturbed while its module runs on either path.

    Args:
        model: the network; only its trainable parameters (not excluded) are perturbed.
        sigma: standard deviation ``σ`` of the weight noise (same for every parameter).
        population: ``P``, the number of perturbed evaluations per call (even if
            ``antithetic``).
        antithetic: mirrored sampling, ``P/2`` pairs ``(+ε, -ε)``.
        shaping: a loss transform (:mod:`ulr.transforms`: a shaping such as
            :func:`~ulr.transforms.standardized`, or a baseline such as
            :func:`~ulr.transforms.leave_one_out`) applied to the ``[P]`` member losses, or
            ``None`` for raw losses. Antithetic partners form one copy group. Default:
            :func:`~ulr.transforms.centered_ranks`.
        generator: the only source of randomness (seeds of the members); default: one seeded
            from a single draw of torch's global RNG.
        exclude: parameter names (wildcards allowed) left without a gradient.
        members_per_forward: members evaluated in one vectorised forward; ``None``
            (default): as many as fit in 256 MiB for a model without convolutions, one for a
            model with them (measured faster, ``benchmarks/es_cost.py``); ``1``: one forward
            per member, noise
            regenerated instead of kept (memory = inference). :attr:`vectorize_error` says
            why a model fell back to one forward per member.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> from ulr.peers import EvolutionStrategies
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> es = EvolutionStrategies(model, sigma=0.02, population=16,
        ...                          generator=torch.Generator().manual_seed(0))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss = es.loss_and_grads(lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
        >>> model[0].weight.grad.shape, es.last_forward_rows
        (torch.Size([8, 4]), 128)

    References:
        Salimans, Ho, Chen, Sidor, Sutskever. *Evolution Strategies as a Scalable Alternative
        to Reinforcement Learning.* arXiv:1703.03864, 2017.
        Wierstra, Schaul, Glasmachers, Sun, Peters, Schmidhuber. *Natural Evolution
        Strategies.* JMLR 15, 2014. Toklu et al. *EvoTorch.* arXiv:2302.12600, 2023.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma: float = 0.02,
        population: int = 32,
        antithetic: bool = True,
        shaping: Transform | None = _DEFAULT,  # type: ignore[assignment]
        generator: torch.Generator | None = None,
        exclude: Iterable[str] = (),
        members_per_forward: int | None = None,
    ) -> None:
        self.sigma = check_positive_float("sigma", sigma)
        self.antithetic = bool(antithetic)
        self.population = check_positive_int("population", population, even=self.antithetic)
        if shaping is _DEFAULT:
            shaping = centered_ranks()
        if shaping is not None and not isinstance(shaping, Transform):
            raise TypeError(f"shaping must be a loss transform (ulr.transforms) such as "
                            f"centered_ranks(), or None for raw losses; got {shaping!r}")
        if shaping is not None and shaping.needs_clean:
            raise ValueError(f"shaping={shaping!r} needs the noise-free losses, which "
                             f"EvolutionStrategies does not compute; use leave_one_out() or "
                             f"running_average() as a baseline instead")
        # Members are laid out (+ε_1, -ε_1, +ε_2, ...) with antithetic sampling: pairs share noise.
        members = torch.arange(self.population)
        self._context = Context(members // 2 if self.antithetic else members)
        if shaping is not None:
            shaping.check(self.population, self._context.copy_groups)
        self.shaping = shaping
        super().__init__(model, distribution="gaussian", generator=generator, exclude=exclude)
        if members_per_forward is not None:
            check_positive_int("members_per_forward", members_per_forward)
        self.members_per_forward = members_per_forward

    def _members(self, rows):
        if self.antithetic:
            seeds = draw_seeds(self.generator, self.population // 2)
            return seeds, [(s, sign * self.sigma) for s in seeds for sign in (1.0, -1.0)]
        seeds = draw_seeds(self.generator, self.population)
        return seeds, [(s, self.sigma) for s in seeds]

    def _coefficients(self, losses: Tensor, seeds):
        # the transform sees float32 losses (as shapings always have: bit-identical weights)
        u = (losses if self.shaping is None
             else self.shaping(losses.float(), self._context).double())
        scale = 1.0 / (self.population * self.sigma)
        if self.antithetic:
            u = u.view(-1, 2)
            return ((u[:, 0] - u[:, 1]) * scale).tolist()
        return (u * scale).tolist()

    def state_dict(self):
        """Generator state and the shaping's state (for exact resumption)."""
        state = super().state_dict()
        state["shaping"] = {} if self.shaping is None else self.shaping.state_dict()
        return state

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        if self.shaping is not None:
            self.shaping.load_state_dict(state.get("shaping", {}))

    def __repr__(self) -> str:
        return (f"EvolutionStrategies(sigma={self.sigma}, population={self.population}, "
                f"antithetic={self.antithetic}, shaping={self.shaping!r})")
