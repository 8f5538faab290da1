"""Forward gradient: directional derivatives by forward-mode AD (``torch.func.jvp``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from ..contract import (
    accumulate,
    as_call,
    batch_size,
    call_loss,
    check_finite,
    check_model,
    check_positive_int,
    draw_seeds,
    generator_state,
    load_generator_state,
    make_generator,
    trainable,
)
from ._weights import seeded_noise

__all__ = ["ForwardGradient"]

_LIMITS = (
    "Forward-mode AD cannot run (torch 2.13, CPU): BatchNorm in training mode (its running "
    "statistics are updated in place inside the transform; use model.eval() or GroupNorm/"
    "LayerNorm); nn.LSTM (the mkldnn LSTM kernel has no forward-AD formula; nn.GRU works); "
    "nn.TransformerEncoderLayer on its fused fast path (eval mode); "
    "F.scaled_dot_product_attention when it picks the CPU flash kernel (e.g. dropout_p=0); "
    "and any custom autograd.Function without a jvp. ulr.LikelihoodRatio, "
    "ulr.peers.EvolutionStrategies and ulr.peers.SPSA need no derivatives at all")


class ForwardGradient:
    r"""Forward gradient (Baydin et al. 2022): one JVP per random tangent, no backward pass.

    For tangents ``v_t ~ N(0, I)`` over all trainable parameters, forward-mode AD gives the
    directional derivative :math:`\nabla L(θ) \cdot v_t` of the mean batch loss in the same
    pass as ``L`` itself; the estimate is

    .. math::
        \hat g = \frac{1}{T} \sum_{t=1}^{T} (\nabla L(θ) \cdot v_t)\, v_t ,

    **unbiased for** ``∇L`` for any differentiable loss (``E[v vᵀ] = I``), with no smoothing
    bias, and variance ``(‖∇L‖² + (∇L)_j²)/T`` per coordinate ``j``: like SPSA it degrades
    with the number of parameters.

    Cost: ``T`` JVP passes of ``B`` rows (``last_forward_rows = T·B``); a JVP pass costs
    about 2-3 forward passes (primal + tangent arithmetic) and holds one tangent (one copy of
    the weights) plus the tangent activations of the current layer, not the activation tape.
    Tangents are drawn per parameter from seeds of ``generator`` (:func:`seeded_noise`).

    The model's parameters are passed to :func:`torch.func.functional_call`, so the module is
    never modified. Limitations (the JVP raises, re-raised with this explanation): BatchNorm in
    training mode, ``nn.LSTM`` (CPU mkldnn kernel), ``nn.TransformerEncoderLayer``'s fused fast
    path, the CPU flash SDPA kernel, and custom ``autograd.Function``\ s without a ``jvp``; the
    loss must be differentiable (a 0-1 loss or a hard threshold gives a zero estimate).

    Args:
        model: the network.
        num_tangents: ``T``, random tangents per call, averaged.
        generator: the only source of randomness (one seed per tangent); default: one seeded
            from a single draw of torch's global RNG.
        exclude: parameter names (wildcards allowed) left without a gradient.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> from ulr.peers import ForwardGradient
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> fg = ForwardGradient(model, num_tangents=2,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> loss = fg.loss_and_grads(lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
        >>> model[0].weight.grad.shape, fg.last_forward_rows
        (torch.Size([8, 4]), 16)

    References:
        Baydin, Pearlmutter, Syme, Wood, Torr. *Gradients without Backpropagation.*
        arXiv:2202.08587, 2022. Silver, Goyal, Danihelka, Hessel, van Hasselt. *Learning by
        Directional Gradient Descent.* ICLR 2022.
    """

    def __init__(self, model: nn.Module, *, num_tangents: int = 1,
                 generator: torch.Generator | None = None, exclude: Iterable[str] = ()) -> None:
        self.model = check_model(model)
        self.num_tangents = check_positive_int("num_tangents", num_tangents)
        self.exclude = tuple(exclude)
        trainable(model, self.exclude)
        self.generator = make_generator(generator)
        #: Forward rows (examples × JVP passes) of the last call.
        self.last_forward_rows = 0

    def loss_and_grads(self, loss_fn: Callable[..., Tensor], inputs: Any,
                       targets: Any = None) -> Tensor:
        """Run ``T`` JVP passes and accumulate the forward gradient into ``p.grad``.

        Args:
            loss_fn: ``loss_fn(outputs, targets) -> [B]`` (``loss_fn(outputs)`` when
                ``targets`` is None), differentiable by forward-mode AD.
            inputs: a tensor ``[B, ...]``, a tuple of positional arguments or a dict of
                keyword arguments of ``model``.
            targets: whatever ``loss_fn`` takes besides the outputs.

        Returns:
            The mean loss over the batch (a detached scalar; the same in every pass).

        Raises:
            ValueError: the loss is not ``[B]`` or not finite (nothing is written).
            RuntimeError: forward-mode AD is not implemented for an operation of the model.
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        args, kwargs = as_call(inputs)
        rows = batch_size(inputs, targets)
        params = trainable(self.model, self.exclude)
        primals = {name: p.detach() for name, p in params}

        def mean_loss(weights: dict[str, Tensor]) -> Tensor:
            outputs = functional_call(self.model, weights, args, kwargs)
            return call_loss(loss_fn, outputs, targets, rows).mean()

        grads = [torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32),
                             device=p.device) for _, p in params]
        loss = None
        for seed in draw_seeds(self.generator, self.num_tangents):
            tangents = {name: seeded_noise(p, seed, j) for j, (name, p) in enumerate(params)}
            try:
                with torch.no_grad():
                    loss, slope = jvp(mean_loss, (primals,), (tangents,))
            except (RuntimeError, NotImplementedError) as e:
                raise RuntimeError(f"forward gradient failed on {type(self.model).__name__}: "
                                   f"{str(e).splitlines()[0]}\n{_LIMITS}") from e
            check_finite(torch.stack([loss.detach(), slope.detach()]), rows)
            c = float(slope) / self.num_tangents
            for g, (name, _) in zip(grads, params, strict=True):
                g.add_(tangents[name].to(g.dtype), alpha=c)
            del tangents
        accumulate(params, grads)
        self.last_forward_rows = rows * self.num_tangents
        return torch.tensor(float(loss))

    def state_dict(self) -> dict[str, Any]:
        """The generator state (for exact resumption)."""
        return generator_state(self.generator)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.generator = load_generator_state(self.generator, state, "ForwardGradient")

    def __repr__(self) -> str:
        return f"ForwardGradient(num_tangents={self.num_tangents})"
