"""The memory modes: how one pass of a plan turns into losses and gradients.

``store``, ``chunked`` and ``replay`` are functions of one signature, :data:`PassMode`,
picked once when the estimator is built (as ``torch.optim`` picks its single-tensor,
multi-tensor or fused step once). Each is a generator over one :class:`PassJob`: it runs the
forward(s) that give the losses of the copies it runs and yields ``(copies, losses)``; the
caller sends back the loss weights (:class:`Weights`) and the mode turns them into gradients.
The caller may hold the weights back until other passes (or other ranks) have run, which is
how :class:`ulr.distributed.DistributedLikelihoodRatio` gathers the losses of a whole step
before any gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ..contract import call_loss, check_finite
from ..parallel import Assembler
from .forward import Mode, PassRun, PassSetup, run_forward
from .noise_stream import Snapshot
from .records import assemble
from .trees import replicate

if TYPE_CHECKING:
    from .likelihood_ratio import LikelihoodRatio

__all__ = ["MODES", "PassJob", "PassMode", "Weights", "check_losses", "chunked", "losses_of",
           "replay", "store"]


class Weights(NamedTuple):
    """Loss weights of copies ``first ..`` of a pass, ``[n·B]`` copy-major."""

    first: int
    values: Tensor

    def of(self, copies: tuple[int, int], batch: int) -> Tensor:
        """The weights of ``copies = (k0, k1)``."""
        lo, hi = (copies[0] - self.first) * batch, (copies[1] - self.first) * batch
        return self.values if (lo, hi) == (0, self.values.numel()) else self.values[lo:hi]


@dataclass
class PassJob:
    """One pass of one step: what a memory mode needs to run it.

    Attributes:
        copies: the copies ``[k0, k1)`` this process runs (all ``K`` unless distributed).
        one_sweep: a chunked pass may take its weights chunk by chunk (the baseline is
            row-local and nobody waits for other passes' losses).
        forward_rows: forward rows run so far (examples × copies), counted by the mode.
    """

    est: LikelihoodRatio
    setup: PassSetup
    loss_fn: Callable
    inputs: Any
    targets: Any
    copies: tuple[int, int]
    chunk_size: int | None
    one_sweep: bool
    assembler: Assembler | None
    forward_rows: int = 0

    @property
    def batch(self) -> int:
        return self.setup.batch

    def forward(self, copies: tuple[int, int], mode: Mode,
                weights: Tensor | None = None) -> tuple[Any, PassRun]:
        out, run = run_forward(self.est, self.setup, self.inputs, self.batch, mode,
                               copies=copies, weights=weights)
        if not run.fired:
            raise self.est._no_site_error()
        self.forward_rows += run.rows
        return out, run

    def losses(self, outputs: Any, run: PassRun) -> Tensor:
        """Per-row losses of a run, not yet checked for non-finite values (that waits for
        every rank's losses: :meth:`ulr.LikelihoodRatio._gather_losses`)."""
        c = run.num_copies
        return losses_of(self.loss_fn, outputs, self.targets if c == 1 else
                         replicate(self.targets, c), run.rows)

    def snapshot(self) -> Snapshot:
        return self.est.noise_stream.snapshot()

    def restore(self, snapshot: Snapshot, model_rng: Any = None) -> None:
        self.est.noise_stream.restore(snapshot, model_rng)

    def gradients(self, run: PassRun, weights: Tensor) -> None:
        assemble(self.assembler, run.records, run.row_counts(), weights, self.setup.sink)

    def chunks(self) -> list[tuple[int, int]]:
        k0, k1 = self.copies
        size = self.chunk_size or k1 - k0
        return [(c, min(c + size, k1)) for c in range(k0, k1, size)]


#: ``mode(job)``: yields ``(copies, losses)``, receives :class:`Weights`, adds the gradients.
PassMode = Callable[[PassJob], Generator[tuple[tuple[int, int], Tensor], Weights, None]]


def store(job: PassJob):
    """Each site keeps its input (or local graph) and noise for all rows until the losses
    are known."""
    out, run = job.forward(job.copies, Mode.RECORD)
    losses = job.losses(out, run)
    del out
    weights = yield job.copies, losses
    job.gradients(run, weights.of(job.copies, job.batch))


def replay(job: PassJob):
    """A forward for the losses, then the same forward again (the noise regenerated from the
    saved state) where each site turns into gradients as it fires."""
    start = job.snapshot()
    with torch.no_grad():
        out, run = job.forward(job.copies, Mode.LOSSES)
        losses = job.losses(out, run)
    del out
    weights = yield job.copies, losses
    job.restore(start)
    _, again = job.forward(job.copies, Mode.REPLAY, weights.of(job.copies, job.batch))
    same_sites(run, again)


def loss_sweep(job: PassJob, start: Snapshot) -> tuple[Tensor, PassRun, list[Any]]:
    """The losses of every chunk of the job's copies without keeping anything; returns them,
    the first chunk's run and the model's randomness at the start of each chunk."""
    # The noise stream restarts for every chunk (each chunk takes its copies' rows of the
    # pass's noise); the model's randomness (dropout) runs on from chunk to chunk, and a
    # second sweep replays each chunk's.
    model_rng, parts, first = [start[2]], [], None
    for ch in job.chunks():
        job.restore(start, model_rng[-1])
        with torch.no_grad():
            out, run = job.forward(ch, Mode.LOSSES)
            parts.append(job.losses(out, run))
        first = first or run
        model_rng.append(job.est.noise_stream.model_rng())
    return torch.cat(parts), first, model_rng


def chunked(job: PassJob):
    """The copies in chunks of ``chunk_size``: one sweep when the weights of a chunk need only
    its own losses, else a sweep for the losses and a second that keeps and assembles."""
    start = job.snapshot()
    if job.one_sweep:
        model_rng = start[2]
        for ch in job.chunks():
            job.restore(start, model_rng)
            out, run = job.forward(ch, Mode.RECORD)
            model_rng = job.est.noise_stream.model_rng()
            losses = job.losses(out, run)
            del out
            weights = yield ch, losses
            job.gradients(run, weights.of(ch, job.batch))
        return
    losses, first, model_rng = loss_sweep(job, start)
    weights = yield job.copies, losses
    for ch, rng in zip(job.chunks(), model_rng, strict=False):
        job.restore(start, rng)
        _, run = job.forward(ch, Mode.RECORD)
        same_sites(first, run)
        job.gradients(run, weights.of(ch, job.batch))


def losses_of(loss_fn: Callable, outputs: Any, targets: Any, rows: int) -> Tensor:
    """``loss_fn``'s per-row losses, checked for shape (detached; fp32 unless fp64)."""
    with torch.no_grad():
        losses = call_loss(loss_fn, outputs, targets, rows).detach()
    return losses if losses.dtype == torch.float64 else losses.float()


def check_losses(losses: list[Tensor], where: str = "") -> None:
    """Refuse non-finite losses before any gradient is written."""
    bad = sum(int((~torch.isfinite(part)).sum()) for part in losses)
    if bad:
        check_finite(torch.cat([part.reshape(-1) for part in losses]), where=where)


MODES: dict[str, PassMode] = {"store": store, "chunked": chunked, "replay": replay}


def same_sites(losses_run: PassRun, grads_run: PassRun) -> None:
    """The forward that computed the losses (without autograd) and the one that turns the
    sites into gradients must meet the same sites."""
    if list(losses_run.fired) != list(grads_run.fired):
        raise ValueError(
            f"the model met other noise sites without autograd ({list(losses_run.fired)}) than "
            f"with it ({list(grads_run.fired)}), e.g. the fast path that nn.TransformerEncoder"
            f"Layer takes in eval mode under no_grad, which skips its submodules' hooks; the "
            f"losses would not match the gradient terms. Use memory='store', or sites that "
            f"fire on both paths (e.g. the encoder layer itself)")
