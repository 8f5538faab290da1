"""SPSA / MeZO: two-point simultaneous-perturbation gradient estimate on the weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..contract import check_positive_float, check_positive_int, draw_seeds
from ._weights import Distribution
from ._zeroth import WeightPerturbation

__all__ = ["SPSA"]


class SPSA(WeightPerturbation):
    r"""Two-point zeroth-order estimate along random weight directions (SPSA, MeZO).

    For each of ``n`` directions ``z_i`` over all trainable parameters (``E[z zᵀ] = I``),
    evaluate the mean batch loss at ``θ ± ε z_i`` and take the central difference:

    .. math::
        \hat g = \frac{1}{n} \sum_{i=1}^{n}
            \frac{L(θ + ε z_i) - L(θ - ε z_i)}{2ε}\, z_i .

    Unbiased for the gradient of the smoothed loss :math:`E_z[L(θ + εz)]` (for Gaussian
    ``z``; ``= ∇L + O(ε²)`` for either distribution) and **exactly** unbiased for ``∇L`` when
    ``L`` is quadratic in ``θ``. ``n = 1`` with Gaussian ``z`` is MeZO's ZO-SGD estimator
    (Malladi et al. 2023); Rademacher ``z`` is Spall's SPSA (``1/z_i = z_i``).

    Memory = inference (MeZO's seed trick): a direction is never stored. It is named by a seed
    from ``generator`` and regenerated per parameter (:func:`seeded_noise`) while the parameter's
    module runs and again when ``ĝ`` is accumulated. Unlike MeZO's in-place
    ``θ += εz; θ -= 2εz; θ += εz``, which leaves rounding error in the weights, the original
    storage is put back, so the weights are restored bit-exactly.

    Cost: ``2n`` forward passes of ``B`` rows per call (``last_forward_rows = 2n·B``).

    Args:
        model: the network; only its trainable parameters (not excluded) are perturbed.
        eps: perturbation scale ``ε`` (MeZO: ``1e-3``).
        num_directions: ``n`` directions per call, averaged.
        perturbation: ``"gaussian"`` (MeZO) or ``"rademacher"`` (classic SPSA).
        generator: the only source of randomness (one seed per direction); default: one seeded
            from a single draw of torch's global RNG.
        exclude: parameter names (wildcards allowed) left without a gradient.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> from ulr.peers import SPSA
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> spsa = SPSA(model, eps=1e-3, generator=torch.Generator().manual_seed(0))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss = spsa.loss_and_grads(lambda o, t: F.cross_entropy(o, t, reduction="none"),
        ...                            x, y)
        >>> model[2].bias.grad.shape, spsa.last_forward_rows
        (torch.Size([3]), 16)

    References:
        Spall. *Multivariate Stochastic Approximation Using a Simultaneous Perturbation
        Gradient Approximation.* IEEE Trans. Automatic Control 37(3), 1992.
        Malladi, Gao, Nichani, Damian, Lee, Chen, Arora. *Fine-Tuning Language Models with
        Just Forward Passes.* NeurIPS 2023, arXiv:2305.17333.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 1e-3,
        num_directions: int = 1,
        perturbation: Distribution = "gaussian",
        generator: torch.Generator | None = None,
        exclude: Iterable[str] = (),
    ) -> None:
        self.eps = check_positive_float("eps", eps)
        self.num_directions = check_positive_int("num_directions", num_directions)
        super().__init__(model, distribution=perturbation, generator=generator,
                         exclude=exclude)

    def _members(self, rows):
        seeds = draw_seeds(self.generator, self.num_directions)
        return seeds, [(s, sign * self.eps) for s in seeds for sign in (1.0, -1.0)]

    def _coefficients(self, losses: Tensor, seeds):
        pairs = losses.view(-1, 2)
        return ((pairs[:, 0] - pairs[:, 1]) / (2 * self.eps * self.num_directions)).tolist()

    def __repr__(self) -> str:
        return (f"SPSA(eps={self.eps}, num_directions={self.num_directions}, "
                f"perturbation={self.distribution!r})")
