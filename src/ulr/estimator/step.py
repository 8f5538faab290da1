"""One estimate (:meth:`ulr.LikelihoodRatio.loss_and_grads`) from start to end: the clean
pass, the plan's passes in the chosen memory mode, the loss weights, and the gradients written
to ``.grad``. A step that meets sites its clean pass did not see starts over once."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..baselines import Context
from ..contract import accumulate
from .batchnorm import (
    BatchStats,
    batch_norms_in_training,
    capture_batch_stats,
    frozen_batch_stats,
    restore_buffers,
    saved_buffers,
)
from .forward import Mode, PassSetup, run_forward
from .memory import PassJob, Weights, check_losses, losses_of
from .probe import UsesChangedError
from .records import GradSink, add
from .trees import clone_dense

if TYPE_CHECKING:
    from .likelihood_ratio import LikelihoodRatio

__all__ = ["run_step"]


def run_step(est: LikelihoodRatio, loss_fn: Callable, inputs: Any, targets: Any,
             batch: int) -> Tensor:
    """The estimate of one batch: returns the mean noisy loss, adds the gradients to
    ``.grad``. Starts over (once) when a noisy pass meets a site the clean pass did not, or
    uses a value it had found unused (input-dependent control flow)."""
    buffers = saved_buffers(batch_norms_in_training(est.model))  # the clean pass runs again
    for retry in (True, False):
        result = _attempt(est, loss_fn, inputs, targets, batch, retry)
        if result is not None:
            return result
        restore_buffers(buffers)
    raise AssertionError("unreachable: the second attempt does not start over")


@dataclass
class _Sums:
    loss_sum: float = 0.0
    loss_rows: int = 0
    forward_rows: int = 0


def _attempt(est: LikelihoodRatio, loss_fn: Callable, inputs: Any, targets: Any, batch: int,
             retry: bool) -> Tensor | None:
    params = [p for _, p in est._trainable()]
    sums = _Sums()
    stats: BatchStats = {}
    clean = _clean_pass(est, loss_fn, inputs, targets, batch, stats, sums)
    start = est.noise_stream.snapshot(), est.baseline.state_dict()
    est._fired = set()
    sink = GradSink.of(params)
    changed = False
    try:
        with frozen_batch_stats(stats):
            _run_passes(est, loss_fn, inputs, targets, batch, clean, sink, sums)
            if est._assembler is not None:
                est._assembler.merge_all(lambda p, g: add(sink.grads, p, g))
            est._finish_grads(sink.grads)
    except UsesChangedError:
        if not retry:
            raise ValueError(
                "the model used a site output that its clean forward left unused, or a "
                "parameter after the last site, in a noisy forward only (noise- or "
                "randomness-dependent control flow): ulr cannot tell which parts of the "
                "output need noise. Make the site's outputs used the same way in every "
                "forward, or choose a site that returns only what is used") from None
        changed = True
    finally:
        if est._assembler is not None:
            est._assembler.discard()  # after an error: wait for the tasks, drop them
    if retry and (changed or not est._fired <= est.probe.sites):
        # A site the clean pass had not met fired: probe and learn the sites again.
        est.probe.sites = None
        est.noise_stream.restore(start[0])
        est.baseline.load_state_dict(start[1])
        return None
    _write_grads(est, sink.grads)
    est.last_forward_rows = sums.forward_rows
    return torch.tensor(sums.loss_sum / sums.loss_rows)


def _clean_pass(est: LikelihoodRatio, loss_fn: Callable, inputs: Any, targets: Any,
                batch: int, stats: BatchStats, sums: _Sums) -> Tensor | None:
    """The clean pass (B rows, no noise), when something needs it: on the first call it
    probes which parameters each site and the output depend on, and learns the sites in
    firing order; with a train-mode BatchNorm it is the one forward that updates the running
    statistics and gives the batch statistics every noisy pass normalises with; a clean
    baseline takes its losses."""
    probing = est.probe.sites is None
    norms = batch_norms_in_training(est.model)
    if not (probing or est.baseline.needs_clean or norms):
        return None
    with capture_batch_stats(est.model, norms, stats), torch.no_grad():
        # on a copy: a model that changes its input in place must not change the user's
        # batch (the noisy passes, too, work on tiled copies)
        outputs, run = run_forward(est, None, clone_dense(inputs), batch,
                                   Mode.PROBE if probing else Mode.CLEAN)
    sums.forward_rows += batch
    if not run.fired:
        raise est._no_site_error()
    if probing:
        trainable = {id(p): n for n, p in est._trainable()}
        est.probe.learn(run.uses, run.leaves, outputs, trainable, run.fired)
        est._site_names = list(run.fired)
    if not est.baseline.needs_clean:
        return None
    # every rank runs the same clean pass: a refusal here stops them all at once
    losses = losses_of(loss_fn, outputs, targets, batch)
    check_losses([losses])
    return losses


@dataclass
class _Pending:
    """A pass whose forward gave its losses and that waits for its weights."""

    job: PassJob
    steps: Generator
    groups: Tensor
    copies: tuple[int, int]
    losses: Tensor


def _run_passes(est: LikelihoodRatio, loss_fn: Callable, inputs: Any, targets: Any,
                batch: int, clean: Tensor | None, sink: GradSink, sums: _Sums) -> None:
    passes = est.plan.passes(est._site_names, est.num_copies)
    pending: list[_Pending] = []
    for i, plan_pass in enumerate(passes):
        k = plan_pass.num_copies
        est.sampler.check_num_copies(k)
        groups = est.sampler.copy_groups(k)
        est.baseline.check(k, groups)
        setup = PassSetup(plan_pass, batch, est._shares_prefix(plan_pass), sink)
        job = PassJob(est, setup, loss_fn, inputs, targets, est._owned_copies(k),
                      est.chunk_size, est.baseline.row_local and not est._one_exchange_per_step,
                      est._assembler)
        steps = est._pass_mode(job)
        copies, losses = next(steps)
        pending.append(_Pending(job, steps, groups, copies, losses))
        if est._one_exchange_per_step and i < len(passes) - 1:
            continue  # the weights wait for the step's last pass
        end = est.noise_stream.snapshot()
        gathered = est._gather_losses([(p.copies, p.losses) for p in pending],
                                      [p.job.setup.plan_pass.num_copies for p in pending])
        for p, (copies, losses) in zip(pending, gathered, strict=True):
            _finish_pass(est, p, copies, losses, clean, sums)
        if est._one_exchange_per_step:  # the second forwards ran after the last pass
            est.noise_stream.restore(end)
        pending = []


def _finish_pass(est: LikelihoodRatio, p: _Pending, copies: tuple[int, int], losses: Tensor,
                 clean: Tensor | None, sums: _Sums) -> None:
    """Weights from the losses of ``copies``, handed to the pass's mode until it is done."""
    batch, key = p.job.batch, p.job.setup.plan_pass.key
    total = 0.0
    while True:
        total += float(losses.sum())
        sums.loss_rows += losses.numel()
        k0, k1 = copies
        ctx = Context(p.groups[k0:k1], clean, key)
        weights = est.baseline(losses.view(k1 - k0, batch), ctx).reshape(-1)
        try:
            copies, losses = p.steps.send(Weights(k0, weights))
        except StopIteration:
            break
        ((copies, losses),) = est._gather_losses([(copies, losses)], [k1 - k0])
    sums.loss_sum += total
    sums.forward_rows += p.job.forward_rows


def _write_grads(est: LikelihoodRatio, grads: dict[Tensor, Tensor]) -> None:
    uncovered = [n for n, p in est._trainable() if p not in grads]
    if uncovered:
        raise ValueError(
            f"no site covers the trainable parameters {uncovered}: no noise site lies "
            f"downstream of them within their segment. Add a site after them (e.g. "
            f"ulr.sites.by_name(...) | ulr.sites.param_owners()), freeze them "
            f"(requires_grad_(False)), or leave them out with exclude=[...]"
        )
    accumulate([("", p) for p in grads], list(grads.values()))

