"""The driver shared by the weight-perturbation estimators (ES and SPSA): evaluate the loss at
seeded perturbations ``θ + c·ε``, then accumulate ``Σ_i coef_i ε_i`` into ``p.grad``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..contract import (
    accumulate,
    as_call,
    batch_size,
    call_loss,
    check_finite,
    check_model,
    generator_state,
    load_generator_state,
    make_generator,
    trainable,
)
from ._batched import VectorizeError, batched_losses, members_per_forward, noise_of
from ._weights import DISTRIBUTIONS, Distribution, Perturber


class WeightPerturbation:
    """Base class of :class:`EvolutionStrategies` and :class:`SPSA` (not public)."""

    def __init__(self, model: nn.Module, *, distribution: Distribution,
                 generator: torch.Generator | None, exclude: Iterable[str]) -> None:
        self.model = check_model(model)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"perturbation must be one of {list(DISTRIBUTIONS)}, got "
                             f"{distribution!r}")
        self.distribution = distribution
        self.exclude = tuple(exclude)
        trainable(model, self.exclude)  # fail early on a bad exclude / frozen model
        self.generator = make_generator(generator)
        self._warned_batchnorm = False
        #: Forward rows (examples × perturbed evaluations) of the last call.
        self.last_forward_rows = 0
        #: Members evaluated in one vectorised forward; ``None``: as many as fit in
        #: :data:`~ulr.peers._batched.STACK_BYTES`; ``1``: one forward per member (hooks).
        self.members_per_forward: int | None = 1
        self._vectorize = True
        #: Why the vectorised forward was given up for this model (``None`` while it works).
        self.vectorize_error: str | None = None

    def _warn_batchnorm(self) -> None:
        if self._warned_batchnorm:
            return
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                self._warned_batchnorm = True
                warnings.warn(
                    f"BatchNorm layer {name!r} is in training mode: each of the perturbed "
                    f"evaluations of one call updates its running statistics. Run the estimate "
                    f"with model.eval() (frozen statistics), or use GroupNorm/LayerNorm",
                    UserWarning, stacklevel=3)
                return

    def _members(self, num: int) -> tuple[list[int], list[tuple[int, float]]]:
        """Seeds, and the ``(seed, scale)`` of each evaluation in order."""
        raise NotImplementedError

    def _coefficients(self, losses: Tensor, seeds: list[int]) -> list[float]:
        """Per-seed coefficients ``c_i`` of ``ĝ = Σ_i c_i ε_i`` from the member losses."""
        raise NotImplementedError

    def loss_and_grads(self, loss_fn: Callable[..., Tensor], inputs: Any,
                       targets: Any = None) -> Tensor:
        """Evaluate the perturbed models, accumulate the estimate into ``p.grad``.

        Args:
            loss_fn: ``loss_fn(outputs, targets) -> [B]`` (``loss_fn(outputs)`` when
                ``targets`` is None): one loss per row. Any callable; never differentiated.
            inputs: the batch: a tensor ``[B, ...]``, a tuple of positional arguments or a
                dict of keyword arguments of ``model``.
            targets: whatever ``loss_fn`` takes besides the outputs (not replicated: every
                perturbation sees the same ``B`` rows).

        Returns:
            The mean loss over all rows of all perturbed evaluations (a detached scalar).

        Raises:
            ValueError: the loss is not ``[B]`` or not finite, or a trainable parameter was
                not perturbed because its module's forward never ran (nothing is written to
                ``.grad`` then; the model is unchanged).
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        args, kwargs = as_call(inputs)
        rows = batch_size(inputs, targets)
        params = trainable(self.model, self.exclude)
        self._warn_batchnorm()
        perturber = Perturber(self.model, params, self.distribution)
        seeds, members = self._members(rows)
        with torch.no_grad():
            losses, noise = self._batched(perturber, seeds, members, loss_fn, (args, kwargs),
                                          targets, rows)
            if losses is None:
                losses = self._one_by_one(perturber, members, loss_fn, (args, kwargs),
                                          targets, rows)
                if self.vectorize_error is not None:  # vmap failed where the hooks work
                    self._vectorize = False
            coefficients = self._coefficients(losses, seeds)
            grads = perturber.accumulate_noise(seeds, coefficients, noise)
        accumulate(params, grads)
        self.last_forward_rows = rows * len(members)
        return torch.tensor(float(losses.mean()))

    def _check_fired(self, perturber: Perturber, fired: set[int]) -> None:
        missing = perturber.unperturbed(fired)
        if missing:
            raise ValueError(
                f"{type(self).__name__} perturbs a parameter while the module holding it "
                f"runs, but the modules holding {missing} never ran their forward (the "
                f"parameter is used elsewhere, or not at all). Freeze them "
                f"(requires_grad_(False)) or leave them out with exclude=[...]")

    def _one_by_one(self, perturber: Perturber, members: list[tuple[int, float]],
                    loss_fn: Callable[..., Tensor], call: tuple[tuple, dict], targets: Any,
                    rows: int) -> Tensor:
        """The hook path: one forward of ``B`` rows per member, memory = inference."""
        args, kwargs = call
        losses = torch.empty(len(members), dtype=torch.float64)
        for m, (seed, scale) in enumerate(members):
            with perturber.perturbed(seed, scale) as fired:
                outputs = self.model(*args, **kwargs)
                row_losses = call_loss(loss_fn, outputs, targets, rows).detach()
            del outputs
            check_finite(row_losses, rows)
            losses[m] = float(row_losses.double().mean())
            if m == 0:
                self._check_fired(perturber, fired)
        return losses

    def _batched(self, perturber: Perturber, seeds: list[int],
                 members: list[tuple[int, float]], loss_fn: Callable[..., Tensor],
                 call: tuple[tuple, dict], targets: Any,
                 rows: int) -> tuple[Tensor | None, list[Tensor] | None]:
        """The member losses and the seeds' noise from vectorised forwards
        (:mod:`._batched`), or ``(None, None)`` where they do not apply: one member per
        forward asked for or fitting, or a model that vmap cannot run (then the hook path is
        used from here on)."""
        chunk = self.members_per_forward
        if chunk is None:
            # vmap turns a convolution with stacked weights into a grouped one, which is slower
            # than one forward per member at image sizes such as 28x28 (LeNet-5: 110 against
            # 80 ms per step, benchmarks/es_cost.py): by default only convolution-free models
            # run vectorised.
            has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
            chunk = 1 if has_conv else members_per_forward(perturber.params, len(seeds),
                                                           len(members))
        if chunk <= 1 or not self._vectorize:
            return None, None
        noise = noise_of(perturber.params, seeds, self.distribution)
        where = {s: i for i, s in enumerate(seeds)}
        try:
            losses = batched_losses(self.model, perturber, noise,
                                    [(where[s], c) for s, c in members], chunk, loss_fn, call,
                                    targets, rows, lambda f: self._check_fired(perturber, f))
        except VectorizeError as e:
            self.vectorize_error = str(e)
            return None, None
        self.vectorize_error = None
        return losses, noise

    def state_dict(self) -> dict[str, Any]:
        """The generator state (for exact resumption)."""
        return generator_state(self.generator)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.generator = load_generator_state(self.generator, state, type(self).__name__)
