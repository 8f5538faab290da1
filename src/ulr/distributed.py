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
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .baselines import Context
from .estimator import LikelihoodRatio, _add, replicate
from .plans import Pass

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


class _RebuildDoneError(Exception):
    """Raised inside a rebuild forward once every perturbed site has become gradients."""


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
        self._rebuild: tuple[dict[str, int], dict[str, int]] | None = None
        # Loss exchange with memory="store": the noise of all K copies that this rank's forward
        # drew (every rank draws all of it) is kept for the rebuild instead of drawn again.
        self._kept_noise: list[Tensor] | None = None
        self._replay_pos: int | None = None
        self._pending: list[dict] = []
        self._local: dict[Tensor, Tensor] = {}
        self._num_passes: int | None = None

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", exchange={self.exchange!r}, "
                f"rank={self.rank}/{self.world_size})")

    # -- collectives ------------------------------------------------------------------------------
    def _gather_losses(self, pending: list[dict], batch: int) -> list[Tensor]:
        """One all-gather of this rank's losses of every pass; returns each pass's losses of
        all ranks, copy-major ``[K_s·B]``."""
        local = torch.cat([item["losses"] for item in pending])
        sizes = [[(k1 - k0) * batch for k0, k1 in
                  (copy_range(item["spec"].num_copies, r, self.world_size)
                   for item in pending)] for r in range(self.world_size)]
        width = max(sum(s) for s in sizes)
        padded = local.new_zeros(width)
        padded[:local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        self.last_bytes_sent += padded.numel() * padded.element_size()
        per_rank = [list(torch.split(part[:sum(s)], s)) for part, s in zip(parts, sizes)]
        return [torch.cat([per_rank[r][i] for r in range(self.world_size)])
                for i in range(len(pending))]

    def _all_reduce(self, local: dict[Tensor, Tensor], grads: dict[Tensor, Tensor]) -> None:
        # One flat buffer per step. Every rank ran the same passes and sites, so the dicts hold
        # the same parameters in the same (forward) order.
        if not local:
            return
        items = list(local.items())
        flat = torch.cat([g.reshape(-1) for _, g in items])
        dist.all_reduce(flat, group=self.group)
        self.last_bytes_sent += flat.numel() * flat.element_size()
        offset = 0
        for p, g in items:
            n = g.numel()
            _add(grads, p, flat[offset:offset + n].view_as(g).to(g.dtype))
            offset += n

    # -- losses -----------------------------------------------------------------------------------
    def _losses(self, loss_fn: Callable, outputs: Any, targets: Any, rows: int) -> Tensor:
        # Non-finite losses on one rank must stop every rank, not leave the others waiting in
        # the gather: they travel as NaN and are refused after it, on every rank at once.
        with torch.no_grad():
            raw = loss_fn(outputs) if targets is None else loss_fn(outputs, targets)
        bad = None
        if isinstance(raw, Tensor) and raw.is_floating_point():
            mask = ~torch.isfinite(raw)
            if bool(mask.any()):
                bad, raw = mask, raw.masked_fill(mask, 0.0)
        losses = super()._losses(lambda *_: raw, outputs, targets, rows)
        return losses if bad is None else losses.masked_fill(bad.reshape(rows), float("nan"))

    # -- noise kept for the rebuild ---------------------------------------------------------------
    def _sample(self, site: Any, row_shape: torch.Size, num_copies: int, batch: int,
                device: torch.device) -> Tensor:
        if self._replay_pos is not None:  # the rebuild draws in the order the forward drew
            z = self._kept_noise[self._replay_pos]
            self._replay_pos += 1
            return z
        z = super()._sample(site, row_shape, num_copies, batch, device)
        if self._kept_noise is not None:
            self._kept_noise.append(z.clone() if self.world_size == 1 else z)
        return z

    def _noise_blocks(self, site: Any, row_shape: torch.Size, num_copies: int, batch: int,
                      device: torch.device, copies: tuple[int, int] | None = None
                      ) -> Iterator[tuple[int, Tensor]]:
        if self._replay_pos is None and self._kept_noise is None:
            yield from super()._noise_blocks(site, row_shape, num_copies, batch, device,
                                             copies=copies)
            return
        # keeping or rebuilding from the kept noise: one block, through _sample
        yield 0, self._sample(site, row_shape, num_copies, batch, device).view(
            num_copies, batch, *row_shape)

    def _snapshot(self) -> tuple:
        return (*super()._snapshot(), self._replay_pos)

    def _restore(self, snapshot: tuple) -> None:
        super()._restore(snapshot)
        if self._rebuild is not None or self._replay_pos is not None:
            # Only a retried rebuild forward (autograd turned on midway) restores while a
            # rebuild runs: start the counts again, and draw the noise again (the kept noise
            # was consumed in place; the generator is back at the start of the pass).
            if self._rebuild is not None:
                self._rebuild = (self._rebuild[0], dict.fromkeys(self._rebuild[0], 0))
            self._replay_pos = self._kept_noise = None

    # -- early stop of a rebuild ------------------------------------------------------------------
    def _count_calls(self, spec: Pass) -> tuple[list[Any], dict[str, int]] | None:
        """Hooks counting the calls of the pass's perturbed site modules (for the rebuild's
        stop), or None when the rebuild cannot stop early (every site, or marks)."""
        if spec.sites is None:
            return None
        mods = {s.name: m for m, s in self._module_sites.items() if s.name in spec.sites}
        if set(mods) != set(spec.sites):  # a mark site: no module to count
            return None
        calls = dict.fromkeys(mods, 0)

        def hook(name: str) -> Callable:
            def count(*_: Any) -> None:
                calls[name] += 1
            return count

        handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
        return handles, calls

    def _sites_done(self, sites: list[Any]) -> None:
        if self._rebuild is None:
            return
        expected, done = self._rebuild
        for site in sites:
            if site.name in done:
                done[site.name] += 1
        if all(done[n] >= c for n, c in expected.items()):
            raise _RebuildDoneError

    # -- passes -----------------------------------------------------------------------------------
    # Each pass runs this rank's noisy forward at once; everything that needs the other ranks
    # waits for the last pass of the step, so a step has one all-gather of the losses of every
    # pass and (exchange="grads") one all-reduce, whatever the number of passes.
    def _estimate_pass(self, spec: Pass, loss_fn: Callable, inputs: Any, targets: Any,
                       batch: int, clean: Tensor | None, grads: dict[Tensor, Tensor],
                       params: list[nn.Parameter]) -> tuple[float, int, int]:
        if not self._pending:  # the first pass of the step: how many will run
            names = self._site_names if self.plan.needs_site_names else ()
            self._num_passes = len(self.plan.passes(names, self.num_copies))
        k = spec.num_copies
        self.sampler.check_num_copies(k)
        groups = self.sampler.copy_groups(k)
        self.baseline.check(k, groups)
        k0, k1 = copy_range(k, self.rank, self.world_size)
        expand = self._cache_prefix(spec)
        wanted = {id(p) for p in params}
        sink = (self._local if self.exchange == "grads" else grads, wanted, params)

        if self.memory == "chunked":
            chunks = [(c, min(c + self.chunk_size, k1)) for c in range(k0, k1, self.chunk_size)]
        else:
            chunks = [(k0, k1)]
        start = self._snapshot()
        counting = self._count_calls(spec) if self.exchange == "losses" else None
        if self.exchange == "losses" and self.memory == "store":
            self._kept_noise = []
        stored, parts, rows = None, [], 0
        try:
            for ch in chunks:
                self._restore(start)
                record = self.exchange == "grads" and self.memory == "store"
                with torch.set_grad_enabled(record and torch.is_grad_enabled()):
                    out, run = self._forward(spec, inputs, batch, copies=ch, expand=expand,
                                             record=record, sink=sink)
                    if not run.fired:
                        raise self._no_site_error()
                    c = run.num_copies
                    parts.append(self._losses(
                        loss_fn, out, targets if c == 1 else replicate(targets, c), run.rows))
                stored = run if record else None
                del out
                rows += (ch[1] - ch[0]) * batch
                if counting is not None:  # calls per forward: count the first chunk only
                    for h in counting[0]:
                        h.remove()
                    counting[0].clear()
        finally:
            if counting is not None:
                for h in counting[0]:
                    h.remove()
        self._pending.append({
            "spec": spec, "copies": (k0, k1), "groups": groups, "expand": expand, "sink": sink,
            "chunks": chunks, "start": start, "end": self._snapshot(), "losses": torch.cat(parts),
            "stored": stored, "kept": self._kept_noise,
            "calls": counting[1] if counting is not None else None})
        self._kept_noise = None
        if len(self._pending) < self._num_passes:
            return 0.0, 0, rows
        total, count, extra = self._finish(inputs, batch, clean, grads)
        return total, count, rows + extra

    def _finish(self, inputs: Any, batch: int, clean: Tensor | None,
                grads: dict[Tensor, Tensor]) -> tuple[float, int, int]:
        """After the last pass: gather every pass's losses, then weights and gradients."""
        pending, self._pending = self._pending, []
        losses = self._gather_losses(pending, batch)
        bad = sum(int((~torch.isfinite(pl)).sum()) for pl in losses)
        if bad:
            raise ValueError(
                f"loss_fn returned {bad} non-finite losses out of "
                f"{sum(pl.numel() for pl in losses)} (NaN/inf, on all ranks together); no "
                f"gradient was written. Lower the noise scale or the learning rate, or check "
                f"the loss")
        rows = 0
        for item, pass_losses in zip(pending, losses):
            spec, k = item["spec"], item["spec"].num_copies
            k0, k1 = item["copies"]
            weights = self.baseline(pass_losses.view(k, batch),
                                    Context(item["groups"], clean, spec.key)).reshape(-1)
            if self.exchange == "losses":
                rows += self._rebuild_pass(item, inputs, batch, weights)
            elif item["stored"] is not None:
                run = item.pop("stored")
                self._record_grads(run.records, run, weights[k0 * batch:k1 * batch],
                                   *item["sink"])
            else:  # replay / chunked: a second forward of this rank's copies with weights
                for ch in item["chunks"]:
                    self._restore(item["start"])
                    w = weights[ch[0] * batch:ch[1] * batch]
                    if self.memory == "replay":
                        self._forward(spec, inputs, batch, copies=ch, expand=item["expand"],
                                      record=False, weights=w, sink=item["sink"])
                    else:
                        _, run = self._forward(spec, inputs, batch, copies=ch,
                                               expand=item["expand"], record=True,
                                               sink=item["sink"])
                        self._record_grads(run.records, run, w, *item["sink"])
                    rows += (ch[1] - ch[0]) * batch
        self._restore(pending[-1]["end"])
        if self.exchange == "grads":
            self._all_reduce(self._local, grads)
            self._local = {}
        total = sum(float(pl.sum()) for pl in losses)
        return total, sum(pl.numel() for pl in losses), rows

    def _rebuild_pass(self, item: dict, inputs: Any, batch: int, weights: Tensor) -> int:
        """Every copy's gradient of one pass from the gathered weights: the pass again from
        its start, sites turned into gradients as they fire, stopped after the last one."""
        spec = item["spec"]
        self._restore(item["start"])
        if item["calls"] is not None:
            self._rebuild = (item["calls"], dict.fromkeys(item["calls"], 0))
        if item["kept"] is not None:
            self._kept_noise, self._replay_pos = item.pop("kept"), 0
        try:
            self._forward(spec, inputs, batch, copies=(0, spec.num_copies),
                          expand=item["expand"], record=False, weights=weights,
                          sink=item["sink"])
        except _RebuildDoneError:
            pass
        finally:
            self._rebuild = None
            self._kept_noise = self._replay_pos = None
        return batch if item["expand"] else spec.num_copies * batch

    def loss_and_grads(self, loss_fn: Callable[..., Tensor], inputs: Any,
                       targets: Any = None) -> Tensor:
        """As :meth:`ulr.LikelihoodRatio.loss_and_grads`, with this rank's share of the copies;
        every rank gets the same gradient and the mean loss over all ranks' rows."""
        self.last_bytes_sent = 0
        self._pending, self._local = [], {}
        # The passes this call will run (the site names are learnt first if the plan needs
        # them): the last one finishes the step.
        self._num_passes = None
        try:
            return super().loss_and_grads(loss_fn, inputs, targets)
        finally:
            self._pending, self._local = [], {}


# ---------------------------------------------------------------------------------------------
# Local launcher
