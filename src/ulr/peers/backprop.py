"""Backpropagation under the estimator contract: the reference every peer is measured against."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..contract import as_call, batch_size, call_loss, check_finite, check_model, trainable

__all__ = ["Backprop"]


class Backprop:
    r"""Exact minibatch gradient by reverse-mode AD, written like every other estimator.

    .. math::
        \hat g = \nabla_θ \frac{1}{B} \sum_{b=1}^{B} L(y_b, f(x_b; θ))

    ``loss_and_grads`` is ``loss_fn(model(inputs), targets).mean().backward()`` restricted to
    the trainable, non-excluded parameters: gradients accumulate into ``p.grad``; a parameter
    the loss does not reach keeps its ``.grad`` (as with ``backward``). Cost: one forward of
    ``B`` rows (``last_forward_rows = B``) plus one backward, holding every activation until
    the backward.

    Args:
        model: the network.
        generator: accepted so that all estimators are built alike; backprop draws no random
            numbers and never touches it.
        exclude: parameter names (wildcards allowed) left without a gradient.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> from ulr.peers import Backprop
        >>> model = nn.Linear(4, 3)
        >>> bp = Backprop(model)
        >>> loss = bp.loss_and_grads(lambda o, t: F.cross_entropy(o, t, reduction="none"),
        ...                          torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> model.weight.grad.shape, bp.last_forward_rows
        (torch.Size([3, 4]), 8)

    References:
        Rumelhart, Hinton, Williams. *Learning representations by back-propagating errors.*
        Nature 323, 1986.
    """

    def __init__(self, model: nn.Module, *, generator: torch.Generator | None = None,
                 exclude: Iterable[str] = ()) -> None:
        self.model = check_model(model)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {generator!r}")
        self.generator = generator
        self.exclude = tuple(exclude)
        trainable(model, self.exclude)
        #: Forward rows of the last call (the batch size).
        self.last_forward_rows = 0

    def loss_and_grads(self, loss_fn: Callable[..., Tensor], inputs: Any,
                       targets: Any = None) -> Tensor:
        """Forward, per-row losses, backward of their mean into ``p.grad``.

        Args:
            loss_fn: ``loss_fn(outputs, targets) -> [B]`` (``loss_fn(outputs)`` when
                ``targets`` is None), differentiable.
            inputs: a tensor ``[B, ...]``, a tuple of positional arguments or a dict of
                keyword arguments of ``model``.
            targets: whatever ``loss_fn`` takes besides the outputs.

        Returns:
            The mean loss over the batch (a detached scalar).

        Raises:
            ValueError: the loss is not ``[B]``, not finite, or not differentiable (nothing is
                written then).
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        args, kwargs = as_call(inputs)
        rows = batch_size(inputs, targets)
        params = trainable(self.model, self.exclude)
        with torch.enable_grad():
            outputs = self.model(*args, **kwargs)
            loss = call_loss(loss_fn, outputs, targets, rows).mean()
        check_finite(loss, rows)
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend differentiably on any trainable parameter (no "
                "autograd graph): backprop needs a differentiable loss and model. For a "
                "non-differentiable loss use ulr.LikelihoodRatio, or ES/SPSA from ulr.peers")
        torch.autograd.backward(loss, inputs=[p for _, p in params])
        self.last_forward_rows = rows
        return loss.detach().float()

    def state_dict(self) -> dict[str, Any]:
        """Backprop has no state: ``{}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Accepts what :meth:`state_dict` returned (nothing to restore)."""

    def __repr__(self) -> str:
        return "Backprop()"
