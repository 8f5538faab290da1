"""Evaluating a population of weight perturbations in one vectorised forward.

The hook path of :class:`~ulr.peers._weights.Perturber` runs the model once per member with
``B`` rows, so a population of ``P`` costs ``P`` Python-level forwards, and every member draws
its noise afresh. Here ``C`` members run together: their weights ``θ + scale_i·ε_i`` are
stacked into ``[C, *shape]`` tensors and the model runs once through
``torch.func.vmap(functional_call)`` (``C·B`` rows; Linear and Conv layers become batched
matrix products). Each seed's noise is drawn once, from the same :func:`seeded_noise`, and
kept for the gradient, so an antithetic pair draws it once instead of three times.

The weights are the same numbers as on the hook path (the same ``θ + scale·ε`` operations);
only the layers' arithmetic is batched, so the losses agree to float rounding and, with rank
shaping, the estimate is usually bit-identical. Memory: the noise of every seed and the
stacked weights of ``C`` members (the caller bounds ``C`` by a budget).

vmap refuses what it cannot batch (in-place updates of buffers, such as BatchNorm's running
statistics in training mode; random operations such as dropout, which the hook path draws
per member from the global RNG; ``.item()`` and data-dependent control flow; numpy). The
caller then falls back to the hook path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..contract import call_loss, check_finite
from ._weights import Distribution, Perturber, seeded_noise

#: Bytes of stacked weights and kept noise that the automatic population batch may use.
STACK_BYTES = 256 * 2**20


def members_per_forward(params: list[tuple[str, nn.Parameter]], seeds: int, members: int,
                        budget: int = STACK_BYTES) -> int:
    """How many members fit in one forward: the noise of ``seeds`` seeds plus ``C`` stacked
    weight sets within ``budget`` bytes (1 when not even two fit: the hook path)."""
    size = sum(p.numel() * p.element_size() for _, p in params)
    room = budget // max(size, 1) - seeds
    return max(1, min(members, room))


def noise_of(params: list[tuple[str, nn.Parameter]], seeds: list[int],
             distribution: Distribution) -> list[Tensor]:
    """Per parameter, the ``[S, *shape]`` noise of the seeds (as :func:`seeded_noise`)."""
    return [torch.stack([seeded_noise(p, s, j, distribution) for s in seeds])
            for j, (_, p) in enumerate(params)]


class VectorizeError(Exception):
    """vmap could not run the model (the caller uses the hook path)."""


def batched_losses(model: nn.Module, perturber: Perturber, noise: list[Tensor],
                   members: list[tuple[int, float]], chunk: int, loss_fn: Callable[..., Tensor],
                   call: tuple[tuple, dict], targets: Any, rows: int,
                   check_fired: Callable[[set[int]], None]) -> Tensor:
    """The mean loss of each member ``(seed index, scale)``, ``chunk`` members per forward;
    ``check_fired`` sees which parameters' modules ran in the first forward.

    Raises:
        VectorizeError: the vectorised forward failed (nothing was changed).
    """
    params = perturber.params
    names = [name for name, _ in params]
    args, kwargs = call

    def one(*weights: Tensor) -> Any:
        return torch.func.functional_call(model, dict(zip(names, weights, strict=True)),
                                          args, kwargs)

    losses = torch.empty(len(members), dtype=torch.float64)
    for start in range(0, len(members), chunk):
        part = members[start:start + chunk]
        index = torch.tensor([i for i, _ in part])
        stacked = []
        for (_, p), eps in zip(params, noise, strict=True):
            scale = torch.tensor([s for _, s in part], dtype=p.dtype, device=p.device)
            stacked.append(p.detach() + scale.view(-1, *[1] * p.dim()) * eps[index])
        with perturber.watching() as fired:
            try:
                outputs = torch.vmap(one, randomness="error")(*stacked)
            except Exception as e:  # noqa: BLE001 - anything vmap cannot batch
                raise VectorizeError(f"{type(e).__name__}: {e}") from e
        if start == 0:
            check_fired(fired)
        del stacked
        part_losses = torch.stack([
            call_loss(loss_fn, tree_map(lambda t, k=k: t[k], outputs), targets, rows).detach()
            for k in range(len(part))])
        del outputs
        check_finite(part_losses)
        losses[start:start + len(part)] = part_losses.double().mean(dim=1).cpu()
    return losses
