"""Multi-process ULR on ``torch.distributed``: the noise copies of each pass split over ranks.

Every rank holds the whole model and sees the same batch. The ``K`` noise copies of each pass
are split into contiguous ranges, one per rank (rank ``r`` of ``R`` runs copies
``[⌊rK/R⌋, ⌊(r+1)K/R⌋)``). All ranks draw the noise from the same seeded generator, so copy
``k`` carries exactly the noise it would carry in a single process: a run on ``R`` ranks
computes the same estimate as one process with the same seed, up to the order of float sums
(tested). Each rank runs the noisy forward of its copies for every pass of the plan; then one
all-gather per step collects the per-row losses of every pass (``Σ_s K_s·B`` numbers), so
baselines that compare the copies of an example (leave-one-out) and the reported loss see all
rows.

What is exchanged to finish the gradient (``exchange=``):

``"grads"``
    each rank turns its copies into a partial gradient; one all-reduce per step sums them
    (``|θ|`` numbers, as data-parallel backprop).
``"losses"``
    nothing but the losses. Each rank rebuilds the gradient of **all** ``K`` copies from the
    gathered losses: it reruns each pass from its start, with the noise of every copy (kept
    from its own forward, which drew all of it, with ``memory="store"``; drawn again from the
    shared generator state otherwise), and stops the forward once every perturbed site of the
    pass has fired. This is exact for every pass, and cheap where the input of the perturbed
    sites is the same for every copy: a layer-wise plan on an ``nn.Sequential`` model runs the
    noise-free prefix on ``B`` rows, so the rebuild costs that prefix, the noise of one site and
    its weight gradient, not a ``K·B``-row forward. With the all-sites plan the last perturbed
    site is the last layer and the rebuild is a whole ``K``-copy forward on every rank: use
    ``"grads"`` there. See ``docs/distributed.md`` for the byte counts.

Memory: until the losses of the step are gathered, a rank keeps what its copies leave for the
gradient in every pass (``memory="store"``: the records of its copies; with ``"losses"`` the
noise of all copies), as one all-sites pass would; ``"replay"`` and ``"chunked"`` keep nothing
and run a second forward instead.

Launch with ``torchrun --nproc-per-node N -m ulr train ...`` or ``ulr train --nproc N``
(:func:`ulr.train.launch.launch`, local processes, gloo on CPU, NCCL on CUDA).

Example (one process standing for a one-rank group; the same code runs under ``torchrun``):

    >>> import os, tempfile, torch, ulr
    >>> import torch.distributed as dist
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> from ulr.distributed import DistributedLikelihoodRatio
    >>> store = os.path.join(tempfile.mkdtemp(), "store")
    >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> est = DistributedLikelihoodRatio(model, num_copies=8, exchange="losses",
    ...                                  plan=ulr.plans.layerwise(),
    ...                                  generator=torch.Generator().manual_seed(0))
    >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    >>> loss = est.loss_and_grads(lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
    >>> model[0].weight.grad.shape, est.last_bytes_sent
    (torch.Size([8, 4]), 320)
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .estimator import LikelihoodRatio
from .estimator.forward import Mode, StopPass
from .estimator.memory import PassJob, check_losses, loss_sweep

__all__ = [
    "DistributedLikelihoodRatio",
    "Exchange",
    "all_reduce_grads",
    "check_same",
    "copy_range",
    "init_from_env",
    "is_distributed",
    "on_rank0",
    "rank",
    "world_size",
]

Exchange = Literal["grads", "losses"]

#: Default time a collective may wait for the other ranks before failing (not hanging).
DEFAULT_TIMEOUT_S = 600.0


# ---------------------------------------------------------------------------------------------
# Process-group helpers


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def copy_range(num_copies: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous copies ``[k0, k1)`` of ``num_copies`` that ``rank`` runs.

    >>> [copy_range(10, r, 3) for r in range(3)]
    [(0, 3), (3, 6), (6, 10)]
    """
    if num_copies < world_size:
        raise ValueError(
            f"a pass has {num_copies} noise copies but the run has {world_size} ranks: every "
            f"rank needs at least one copy; use num_copies >= {world_size} or fewer processes"
        )
    return num_copies * rank // world_size, num_copies * (rank + 1) // world_size


def init_from_env(backend: str | None = None, *, timeout_s: float | None = None) -> bool:
    """Initialise the default process group from the environment, if it asks for one.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
    :func:`launch` sets ``ULR_DIST_INIT`` (a file store) instead of the address. Does nothing
    (and returns False) when ``WORLD_SIZE`` is unset or the group already exists.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: how long a collective waits for the other ranks (default
            ``ULR_DIST_TIMEOUT`` seconds, else 600).
    """
    if "WORLD_SIZE" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is set but this torch build has no torch.distributed; "
                           "install a torch build with distributed support or run one process")
    r, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", r))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if timeout_s is None:
        timeout_s = float(os.environ.get("ULR_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, init_method=os.environ.get("ULR_DIST_INIT", "env://"),
                            rank=r, world_size=n,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def on_rank0(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on rank 0 only and give every rank its result, or raise its
    exception on every rank (so that a refused option stops all ranks instead of leaving the
    others waiting in a collective). Outside a process group it just calls ``fn``."""
    if not is_distributed():
        return fn(*args)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def check_same(value: Any, what: str) -> None:
    """Raise ``ValueError`` on every rank unless all ranks pass an equal ``value`` (a dict is
    compared key by key, and the message names the keys that differ)."""
    if not is_distributed():
        return
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    for r, other in enumerate(values):
        if other != values[0]:
            if isinstance(other, dict) and isinstance(values[0], dict):
                diff = sorted(k for k in {*other, *values[0]} if other.get(k) != values[0].get(k))
                detail = f" (differs in {', '.join(diff)})"
            else:
                detail = ""
            raise ValueError(f"{what} differs between rank 0 and rank {r}{detail}; every rank "
                             f"must be launched with the same options")


def all_reduce_grads(params: Sequence[Tensor], *, average: bool = False) -> int:
    """Sum (or average) ``p.grad`` over the ranks in one flat all-reduce; returns the payload
    bytes. Parameters without a gradient take part as zeros (every rank must pass the same
    list)."""
    if not is_distributed() or not params:
        return 0
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    return flat.numel() * flat.element_size()


# ---------------------------------------------------------------------------------------------
# The estimator


class DistributedLikelihoodRatio(LikelihoodRatio):
    """:class:`ulr.LikelihoodRatio` with the noise copies of each pass split over the ranks
    of a ``torch.distributed`` process group (see the module docstring).

    Every rank must build it with the same arguments and a generator in the same state (same
    seed), hold the same parameters and call :meth:`loss_and_grads` with the same batch. The
    gradient written to ``p.grad`` is then the same on every rank and equals the single-process
    estimate with that seed.

    Args:
        model: as :class:`ulr.LikelihoodRatio`.
        exchange: ``"grads"`` (all-reduce the partial gradients) or ``"losses"`` (only the
            per-row losses travel; each rank rebuilds the full gradient by regenerating the
            noise; cheap with a layer-wise plan, see the module docstring).
        group: the process group (default: the default group).
        **kwargs: every other argument of :class:`ulr.LikelihoodRatio`. ``memory="store"``,
            ``"replay"`` and ``"chunked"`` work as in one process (chunks split the copies
            of this rank).

    Attributes:
        last_bytes_sent: payload bytes this rank handed to collectives in the last call
            (losses gathered plus gradients all-reduced).
    """

    def __init__(self, model: nn.Module, *, exchange: Exchange = "grads",
                 group: Any = None, **kwargs: Any) -> None:
        if exchange not in ("grads", "losses"):
            raise ValueError(f"exchange must be 'grads' or 'losses', got {exchange!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DistributedLikelihoodRatio needs an initialised torch.distributed process "
                "group: launch with torchrun (then call ulr.distributed.init_from_env()) or "
                "call torch.distributed.init_process_group first; in one process use "
                "ulr.LikelihoodRatio"
            )
        super().__init__(model, **kwargs)
        self.exchange: Exchange = exchange
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.last_bytes_sent = 0
        if exchange == "losses":
            self._pass_mode = functools.partial(_rebuild, store=self.memory == "store",
                                                world_size=self.world_size)

    # Each pass runs this rank's noisy forward at once; everything that needs the other ranks
    # waits for the last pass of the step, so a step has one all-gather of the losses of every
    # pass and (exchange="grads") one all-reduce, whatever the number of passes.
    _one_exchange_per_step = True

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", exchange={self.exchange!r}, "
                f"rank={self.rank}/{self.world_size})")

    def _owned_copies(self, num_copies: int) -> tuple[int, int]:
        return copy_range(num_copies, self.rank, self.world_size)

    def _gather_losses(self, parts: list[tuple[tuple[int, int], Tensor]],
                       num_copies: list[int]) -> list[tuple[tuple[int, int], Tensor]]:
        """One all-gather of this rank's losses of every pass; returns each pass's losses of
        all ranks, copy-major ``[K_s·B]``. Non-finite losses on one rank stop every rank (they
        are refused after the gather, on all ranks at once, not before it)."""
        (c0, c1), first = parts[0]
        batch = first.numel() // (c1 - c0)
        local = torch.cat([losses for _, losses in parts])
        sizes = [[(k1 - k0) * batch for k0, k1 in
                  (copy_range(k, r, self.world_size) for k in num_copies)]
                 for r in range(self.world_size)]
        width = max(sum(s) for s in sizes)
        padded = local.new_zeros(width)
        padded[:local.numel()] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        self.last_bytes_sent = padded.numel() * padded.element_size()
        per_rank = [list(torch.split(part[:sum(s)], s)) for part, s in zip(gathered, sizes)]
        losses = [torch.cat([per_rank[r][i] for r in range(self.world_size)])
                  for i in range(len(parts))]
        check_losses(losses, where=", on all ranks together")
        return [((0, k), pass_losses) for k, pass_losses in zip(num_copies, losses)]

    def _finish_grads(self, grads: dict[Tensor, Tensor]) -> None:
        # exchange="grads": one flat all-reduce of the step's partial gradients. Every rank
        # ran the same passes and sites, so the dicts hold the same parameters in the same
        # (forward) order.
        if self.exchange != "grads" or not grads:
            return
        items = list(grads.items())
        flat = torch.cat([g.reshape(-1) for _, g in items])
        dist.all_reduce(flat, group=self.group)
        self.last_bytes_sent += flat.numel() * flat.element_size()
        offset = 0
        for p, g in items:
            n = g.numel()
            grads[p] = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n


def _rebuild(job: PassJob, *, store: bool, world_size: int):
    """The pass mode of ``exchange="losses"``: this rank's copies give the losses; once the
    weights of all copies are known, the pass runs again from its start with the noise of
    every copy (kept from the first forward with ``store``: every rank draws all of it; drawn
    again from the same generator state otherwise), each site turned into gradients as it
    fires, and stops once every perturbed site of the pass is done."""
    stream = job.est.noise_stream
    start = job.snapshot()
    if store:
        stream.keep(clone=world_size == 1)
    try:
        losses, first, _ = loss_sweep(job, start)
    finally:
        kept = stream.kept() if store else None
    plan_pass = job.setup.plan_pass
    weights = yield job.copies, losses
    # The rebuild can stop early when it knows how often each perturbed site is called: not
    # with every site perturbed, nor with marks (no module to count).
    modules = {s.name for s in job.est.sites.modules.values()}
    if plan_pass.sites is not None and set(plan_pass.sites) <= modules:
        job.setup.stop_after = {n: first.calls.get(n, 0) for n in plan_pass.sites}
    job.restore(start)
    stream.replay(kept)
    rows = job.forward_rows
    try:
        job.forward((0, plan_pass.num_copies), Mode.REPLAY, weights.of((0, plan_pass.num_copies),
                                                                       job.batch))
    except StopPass:
        pass
    finally:
        stream.stop()
        job.setup.stop_after = None
    k = plan_pass.num_copies
    job.forward_rows = rows + (job.batch if job.setup.shared else k * job.batch)


# ---------------------------------------------------------------------------------------------
# Local launcher
