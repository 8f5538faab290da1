"""Seeded weight perturbations that never store a copy of the perturbation (the MeZO trick).

A perturbation of all trainable weights is named by one integer seed. Parameter ``j``'s noise is
drawn from a fresh generator seeded with ``mix(seed, j)`` (:func:`seeded_noise`), so it can be
regenerated at any time — once for the forward pass and once more when the gradient is
accumulated — and the noise of the whole model is never held at once.

:class:`Perturber` applies a perturbation while the model runs, one module at a time: a forward
pre-hook on each module that owns a trainable parameter swaps the parameter's storage for
``θ + scale·ε`` and the matching forward hook swaps the original storage back. Extra memory is
one layer's perturbed weights; the weights are restored **bit-exactly** (the original tensor
object is put back, never recomputed as ``θ + σε - σε``), also when the forward or the loss
raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from ..sites import named_param_owners

Distribution = Literal["gaussian", "rademacher"]
DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "rademacher")

_MASK = 2**63 - 1


def mix(seed: int, index: int) -> int:
    """A 63-bit seed for parameter ``index`` of the perturbation named ``seed`` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK


def seeded_noise(param: Tensor, seed: int, index: int,
                 distribution: Distribution = "gaussian") -> Tensor:
    """The noise ``ε`` of parameter ``index`` in the perturbation named ``seed``.

    What the weight-perturbation peers add to their weights (and ForwardGradient's tangents);
    not to be confused with :func:`ulr.weight_noise`, the LR estimator's noise on a layer's
    weights.

    Args:
        param: the parameter; gives the shape, device and dtype of the result.
        seed: the perturbation's seed (drawn from the estimator's generator).
        index: the parameter's position in the estimator's parameter list.
        distribution: ``"gaussian"`` (``ε ~ N(0, I)``) or ``"rademacher"`` (``ε ∈ {-1, +1}``
            uniformly); both have ``E[ε εᵀ] = I``.

    Returns:
        ``ε`` with ``param``'s shape, device and dtype; drawn in float32, so the same on every
        dtype up to rounding. Calling again with the same arguments gives the same tensor.
    """
    gen = torch.Generator(device=param.device).manual_seed(mix(seed, index))
    if distribution == "gaussian":
        z = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
    elif distribution == "rademacher":
        z = torch.randint(0, 2, param.shape, generator=gen, device=param.device)
        z = z.to(torch.float32).mul_(2).sub_(1)
    else:
        raise ValueError(f"distribution must be one of {list(DISTRIBUTIONS)}, got "
                         f"{distribution!r}")
    return z.to(param.dtype)


class Perturber:
    """Applies seeded perturbations of ``params`` to ``model`` while it runs.

    Args:
        model: the network.
        params: the trainable ``(name, parameter)`` pairs; their positions are the noise
            indices of :func:`seeded_noise`.
        distribution: the noise distribution.
    """

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]],
                 distribution: Distribution = "gaussian") -> None:
        self.model, self.params, self.distribution = model, params, distribution
        index = {id(p): j for j, (_, p) in enumerate(params)}
        # Every module holding a trainable parameter (tied weights: several modules) swaps it
        # while it runs; a parameter is swapped once even when its holders nest.
        self.owners: dict[nn.Module, list[int]] = {}
        for _, module in named_param_owners(model):
            held = [index[id(p)] for p in module.parameters(recurse=False) if id(p) in index]
            if held:
                self.owners[module] = held

    @contextmanager
    def perturbed(self, seed: int, scale: float) -> Iterator[set[int]]:
        """Inside the block, each forward of ``model`` sees ``θ_j + scale·ε_j`` for every
        parameter ``j`` while its module runs. Yields the set of indices that were perturbed
        (a parameter used outside its module's forward is never perturbed: the caller checks).
        """
        originals: dict[int, Tensor] = {}
        depth: dict[int, int] = {}
        fired: set[int] = set()

        def pre(module: nn.Module, args: tuple) -> None:
            for j in self.owners[module]:
                if j in originals:
                    depth[j] += 1
                    continue
                p = self.params[j][1]
                original = p.data
                with torch.no_grad():
                    p.data = original + scale * seeded_noise(original, seed, j,
                                                             self.distribution)
                originals[j], depth[j] = original, 1
                fired.add(j)

        def post(module: nn.Module, args: tuple, output: object) -> None:
            for j in self.owners[module]:
                if j not in originals:
                    continue
                depth[j] -= 1
                if depth[j] == 0:
                    self.params[j][1].data = originals.pop(j)

        handles = []
        try:
            for module in self.owners:
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post, always_call=True))
            yield fired
        finally:
            for h in handles:
                h.remove()
            for j, original in originals.items():
                self.params[j][1].data = original
            originals.clear()

    def accumulate_noise(self, seeds: list[int], coefficients: list[float],
                         noise: list[Tensor] | None = None) -> list[Tensor]:
        """``Σ_i c_i ε_i`` per parameter, regenerating each ``ε_i`` from its seed (one
        parameter's noise in memory at a time) unless ``noise`` holds it (per parameter,
        ``[S, *shape]`` in the order of ``seeds``: the same numbers and sums). Returns one
        tensor per parameter, in the parameter's dtype promoted to at least float32."""
        out = []
        for j, (_, p) in enumerate(self.params):
            dtype = torch.promote_types(p.dtype, torch.float32)
            acc = torch.zeros(p.shape, dtype=dtype, device=p.device)
            for i, (seed, c) in enumerate(zip(seeds, coefficients, strict=True)):
                if c == 0.0:
                    continue
                eps = (seeded_noise(p, seed, j, self.distribution) if noise is None
                       else noise[j][i])
                acc.add_(eps.to(dtype), alpha=c)
            out.append(acc)
        return out

    @contextmanager
    def watching(self) -> Iterator[set[int]]:
        """Inside the block, the indices of the parameters whose modules run their forward
        are collected in the yielded set (nothing is perturbed: for the vectorised path, which
        replaces the weights itself)."""
        fired: set[int] = set()

        def pre(module: nn.Module, args: tuple) -> None:
            fired.update(self.owners[module])

        handles = [module.register_forward_pre_hook(pre) for module in self.owners]
        try:
            yield fired
        finally:
            for h in handles:
                h.remove()

    def unperturbed(self, fired: set[int]) -> list[str]:
        return [name for j, (name, _) in enumerate(self.params) if j not in fired]
