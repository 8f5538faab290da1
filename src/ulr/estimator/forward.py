"""One forward pass of the model with noise at the sites: the pass handler (:class:`PassRun`,
which the site hooks and :func:`ulr.perturb` marks call) and :func:`run_forward`, which runs
the model under it and starts over when the pass turns out to need autograd or cannot share
its noise-free prefix."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..functional import per_example_weight_output
from ..plans import Pass
from ..sites import _stack
from .probe import UsesChangedError, check_output, graph_params
from .records import GradSink, Record, Rows, add, record_grads, record_parts
from .site_table import Site
from .trees import batch_dims, clone_dense, map_floats, path_name, replicate, tensors

if TYPE_CHECKING:
    from .likelihood_ratio import LikelihoodRatio

__all__ = ["Mode", "PassRun", "PassSetup", "StopPass", "run_forward"]


class Mode(enum.Enum):
    """What a forward does at the sites."""

    #: no noise, nothing kept (the clean pass)
    CLEAN = "clean"
    #: no noise; note which parameters each site depends on (the first call's clean pass)
    PROBE = "probe"
    #: noise; nothing kept (a forward for the losses only)
    LOSSES = "losses"
    #: noise; each site leaves a :class:`~.records.Record` for the gradient
    RECORD = "record"
    #: noise, with the loss weights known: each site turns into gradients as it fires
    REPLAY = "replay"


class StopPass(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a replaying forward once the sites of ``PassSetup.stop_after`` are done."""


class NeedGradError(Exception):
    """A pass run without autograd met a site that needs a local VJP: rerun it with grad."""


class _PrefixError(Exception):
    """A pass with the automatic noise-free prefix did not take up the copies."""


@dataclass
class PassSetup:
    """What stays the same for every forward of one plan pass.

    Attributes:
        plan_pass: the plan's pass (its sites and copy count ``K``).
        batch: ``B``.
        shared: the pass runs its noise-free prefix on the ``B`` examples: those ``B`` rows
            stand for all ``K`` copies until the first perturbed site tiles them (the plan's
            ``cache_prefix``).
        sink: where a replaying forward adds its gradient terms.
        stop_after: for a replaying forward: the calls per site after which it stops
            (:class:`StopPass`), or ``None``.
    """

    plan_pass: Pass
    batch: int
    shared: bool = False
    sink: GradSink | None = None
    stop_after: dict[str, int] | None = None


class PassRun:
    """The handler of one forward over copies ``[k0, k1)`` of the ``K`` of a pass; a context
    manager that hooks the site modules and receives the marks while it is entered.

    Each perturbed site draws the noise of all ``K`` copies (so a chunk sees exactly the noise
    the whole pass would) and keeps the rows of its copies. What it does then is ``mode``'s.

    "Shared" rows, in one sense throughout: ``B`` rows that stand for all ``K`` copies, because
    nothing differs between the copies yet — the prefix of a pass that starts on the ``B``
    examples (``setup.shared``), or a site input that is the tiled batch (``replicated``).
    """

    def __init__(self, est: LikelihoodRatio, setup: PassSetup | None, batch: int, mode: Mode, *,
                 copies: tuple[int, int] = (0, 1), replicated: dict[int, int] | None = None,
                 weights: Tensor | None = None) -> None:
        self.est, self.setup, self.batch, self.mode = est, setup, batch, mode
        self.plan_pass = setup.plan_pass if setup is not None else None
        self.total_copies = self.plan_pass.num_copies if self.plan_pass is not None else 1
        self.k0, self.k1 = copies
        self.num_copies = self.k1 - self.k0
        self.rows = self.num_copies * batch
        self.rows_total = self.total_copies * batch
        self.shared = setup is not None and setup.shared
        # data_ptr -> numel of the tiled inputs: a site whose input is one of them (or a
        # contiguous view of one) sees identical copies of B rows.
        self.replicated = replicated or {}
        self.weights = weights
        #: the probe's finds, per site name (Mode.PROBE)
        self.uses: dict[str, list[tuple[str, dict[int, Tensor]]]] = {}
        self.records: list[Record] = []
        self.fired: dict[str, None] = {}
        #: calls per site name
        self.calls: dict[str, int] = {}
        #: site outputs passed on without noise because the clean pass found them unused; in
        #: a pass with autograd they require grad, so that a use is caught (UsesChangedError)
        self.tripwires: list[Tensor] = []
        #: the probe's stand-ins for those outputs: (site name, path, tensor)
        self.leaves: list[tuple[str, tuple, Tensor]] = []
        self.grad_enabled = torch.is_grad_enabled()
        self._handles: list[Any] = []
        self._done: dict[str, int] | None = None  # calls done per site of setup.stop_after

    def __enter__(self) -> PassRun:
        self._handles = [m.register_forward_hook(self.hook) for m in self.est.sites.modules]
        _stack().append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _stack().pop()
        for h in self._handles:
            h.remove()

    def row_counts(self) -> Rows:
        return Rows(self.rows_total, self.num_copies, self.batch, self.tripwires)

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.on_site(self.est.sites.modules[module], output, args)

    def mark(self, name: str, x: Tensor) -> Tensor:
        site = self.est.sites.mark(name)
        return x if site is None else self.on_site(site, x, None)

    @property
    def keeps(self) -> bool:
        """Whether the sites leave gradients (now or later)."""
        return self.mode in (Mode.RECORD, Mode.REPLAY)

    def on_site(self, site: Site, value: Any, args: tuple | None) -> Any:
        self.fired[site.name] = None
        self.calls[site.name] = self.calls.get(site.name, 0) + 1
        if self.mode is Mode.CLEAN:
            return value
        if self.mode is Mode.PROBE:
            return self._probe(site, value, args)
        if self.keeps and site.module is None and not self.grad_enabled:
            raise NeedGradError
        perturbed = self.plan_pass.sites is None or site.name in self.plan_pass.sites
        records: list[Record] = []
        if isinstance(value, Tensor):
            out = self._perturb(site, value, args, perturbed, records, "output", 0)
        elif site.weight_noise:
            raise TypeError(f"weight-noise site {site.name!r} returned "
                            f"{type(value).__name__}; weight noise needs a module that returns "
                            f"one tensor (a plain nn.Linear or nn.Conv)")
        else:
            dims = batch_dims(site.module)
            unused = self.est.probe.unused.get(site.name, ())

            def leaf(t: Tensor, path: tuple) -> Tensor:
                if path in unused:
                    return self._tripwire(t)
                return self._perturb(site, t, None, perturbed, records, path_name(path),
                                     dims(path))

            out = map_floats(value, leaf, site.name)
        if records:
            self._keep(records)  # after the sums: in replay this consumes the noise
        return out

    def _probe(self, site: Site, value: Any, args: tuple | None) -> Any:
        """Note the trainable parameters each site's value (and a weight-noise site's input)
        depends on since the previous site, and cut the graph."""
        uses = self.uses.setdefault(site.name, [])
        leaves = tensors(value) if not isinstance(value, Tensor) else [value]
        uses.append(("value", graph_params(leaves)))
        if site.weight_noise and args and isinstance(args[0], Tensor):
            uses.append(("input", graph_params([args[0]])))
        if site.closed_form and args and isinstance(args[0], Tensor):
            uses.append(("closed-input", graph_params([args[0]])))
        if isinstance(value, Tensor):
            return value.detach()

        def stand_in(t: Tensor, path: tuple) -> Tensor:
            # a leaf of its own: whether a later site or the output depends on it tells
            # whether this part of the output is used at all
            t = t.detach().requires_grad_()
            self.leaves.append((site.name, path, t))
            return t

        return map_floats(value, stand_in, site.name)

    @functools.cached_property
    def _trainable_ids(self) -> set[int]:
        # once per pass, not at every site call: the parameters do not change within a pass
        return self.est._watched_ids()

    def _watched(self, x: Tensor) -> bool:
        """Whether ``x`` depends on a trainable parameter or a tripwire (since the last site)."""
        found = graph_params([x])
        return any(i in found for i in self._trainable_ids) or any(
            id(t) in found for t in self.tripwires)

    def _tripwire(self, t: Tensor) -> Tensor:
        t = t.detach()
        if self.grad_enabled:
            t.requires_grad_()
            self.tripwires.append(t)
        return t

    def _is_replicated(self, x: Tensor) -> bool:
        if self.num_copies == 1:
            return False
        if self.replicated.get(x.data_ptr()) != x.numel() or not x.is_contiguous():
            return False
        # The storage test is a cheap filter; the equality check guards against in-place
        # changes (e.g. in-place dropout on the input) that made the copies differ.
        copies = x.view(self.num_copies, self.batch, -1)
        return bool((copies[1:] == copies[:1]).all())

    # -- noise -----------------------------------------------------------------------------------
    def _noise(self, site: Site, row_shape: torch.Size, device: torch.device) -> Tensor:
        """The noise of this run's rows, ``[rows, *row_shape]`` (fp32)."""
        stream = self.est.noise_stream
        if self.num_copies == self.total_copies:
            return stream.sample(site, row_shape, self.total_copies, self.batch, device)
        z = torch.empty((self.rows, *row_shape), device=device, dtype=torch.float32)
        for r, zb in self._noise_blocks(site, row_shape, device):
            z[r:r + zb.shape[0]] = zb
        return z

    def _noise_blocks(self, site: Site, row_shape: torch.Size, device: torch.device):
        """This run's rows of the site's noise, block by block: ``(first row, [n, *row_shape])``
        (a chunk sees the noise the whole pass would)."""
        b = self.batch
        wanted = None if self.num_copies == self.total_copies else (self.k0, self.k1)
        for k, zb in self.est.noise_stream.blocks(site, row_shape, self.total_copies, b, device,
                                                  copies=wanted):
            lo, hi = max(k, self.k0), min(k + zb.shape[0], self.k1)
            if lo < hi:
                yield (lo - self.k0) * b, zb[lo - k:hi - k].reshape(-1, *row_shape)

    def _add_blockwise(self, site: Site, base: Tensor, x: Tensor | None, shared: bool,
                       owned: bool) -> Tensor:
        """``base`` + the site's noise, added one copy block at a time; with the input ``x`` of
        a Linear/Conv site (a replaying forward) each block is turned into gradients at once.
        Memory: the output and one noise block, never the ``K·B``-row noise."""
        b, rest = self.batch, base.shape[1:]
        if owned:
            out = base
        elif shared:
            out = torch.empty((self.rows, *rest), dtype=base.dtype, device=base.device)
        else:
            out = base.clone(memory_format=torch.contiguous_format)
        shared_x = x is not None and (shared or self._is_replicated(x))
        # The closed-form terms of a block are fresh tensors: summed in place, so the site
        # holds one gradient-sized buffer per parameter, not two.
        acc: dict[Tensor, Tensor] = {}
        for r, z in self._noise_blocks(site, rest, base.device):
            n = z.shape[0]
            zz = z if z.dtype == base.dtype else z.to(base.dtype)
            if shared:
                torch.add(zz.view(-1, b, *rest), base.unsqueeze(0),
                          out=out[r:r + n].view(-1, b, *rest))
            else:
                out[r:r + n].add_(zz)
            if x is not None:
                inputs = x.detach()[:b] if shared_x else x.detach()[r:r + n]
                record_parts(
                    [(0, Record(site, "closed", z, inputs=inputs, shared=shared_x))],
                    Rows(self.rows_total, n // b, b), self.weights[r:r + n], self.setup.sink,
                    lambda i, p, g: acc.__setitem__(p, acc[p].add_(g) if p in acc else g))
        if x is not None:
            for p, g in acc.items():
                add(self.setup.sink.grads, p, g)
            self._sites_done([site])
        return out

    def _add(self, base: Tensor, z: Tensor, shared: bool, consume: bool) -> Tensor:
        """``base + z``; a shared ``base`` (B rows) is broadcast over the copies, never tiled;
        with ``consume`` the sum is written into ``z``'s storage."""
        zz = z if z.dtype == base.dtype else z.to(base.dtype)
        if shared:
            zz = zz.view(self.num_copies, self.batch, *zz.shape[1:])
            base = base.unsqueeze(0)
        out = zz.add_(base) if consume and zz is z else zz + base
        return out.view(self.rows, *out.shape[2 if shared else 1:])

    # -- sites -----------------------------------------------------------------------------------
    def _perturb(self, site: Site, value: Tensor, args: tuple | None, perturbed: bool,
                 records: list[Record], where: str, dim: int) -> Tensor:
        """``value`` + noise (or ``value`` cut from the graph when this pass does not perturb
        the site); ``dim`` is the batch dimension of ``value``, ``where`` names it in errors."""
        if not perturbed:
            return value.detach()
        if dim:
            if value.dim() <= dim:
                raise ValueError(f"site {site.name!r}: {where} of shape {tuple(value.shape)} "
                                 f"has no batch dimension {dim}; pass batched inputs")
            moved = self._perturb(site, value.movedim(dim, 0), args, perturbed, records,
                                  where, 0)
            return moved.movedim(0, dim)
        n = value.shape[0] if value.dim() else 0
        shared = self.shared and n == self.batch and self.num_copies > 1
        if not shared and n != self.rows:
            raise ValueError(
                f"site {site.name!r} produced a value ({where}) of shape "
                f"{tuple(value.shape)}, but the pass has {self.rows} rows ({self.num_copies} "
                f"copies x batch {self.batch}); a site's values must be batch-first (use "
                f"batch_first=True layouts, or mark a batch-first value with ulr.perturb)"
            )
        x = args[0] if args is not None and len(args) == 1 else None
        base = value.detach()
        if site.weight_noise:
            return self._perturb_weights(site, base, x, shared, records)
        # A Linear/Conv output that no autograd graph and no other hook holds is ours to
        # overwrite: adding the noise in place saves one activation-sized buffer per site.
        owned = (site.closed_form and not shared and not value.requires_grad
                 and value.dtype == torch.float32 and len(site.module._forward_hooks) == 1)
        closed = site.closed_form and isinstance(x, Tensor) and not x.requires_grad
        if not self.keeps:
            return self._add_blockwise(site, base, None, shared, owned)
        if self.mode is Mode.REPLAY and closed:
            return self._add_blockwise(site, base, x, shared, owned)
        z = self._noise(site, value.shape[1:], value.device)
        rec = None
        if closed:
            if shared or self._is_replicated(x):
                # Σ_rows g_r x_r^T = Σ_b (Σ_k g_kb) x_b^T: the weight gradient costs B rows.
                rec = Record(site, "closed", z, inputs=x.detach()[: self.batch], shared=True)
            else:
                rec = Record(site, "closed", z, inputs=x.detach())
        elif value.requires_grad:
            rec = Record(site, "vjp", z, value=value, shared=shared)
        elif site.closed_form and not self.grad_enabled and x is not None:
            raise NeedGradError
        elif site.noise.learnable:
            rec = Record(site, "noise-only", z)
        out = base.add_(z) if owned else self._add(base, z, shared, consume=False)
        if rec is not None:
            records.append(rec)
        return out

    def _perturb_weights(self, site: Site, base: Tensor, x: Any, shared: bool,
                         records: list[Record]) -> Tensor:
        module = site.module
        if not isinstance(x, Tensor):
            raise TypeError(f"weight-noise site {site.name!r} must be called with one tensor")
        if x.requires_grad and self._watched(x):
            raise UsesChangedError  # a parameter or an unused site output feeds it
        x = x.detach()
        if shared:
            x = replicate(x, self.num_copies)
        e = self._noise(site, module.weight.shape, x.device)
        eb = (self._noise(site, module.bias.shape, x.device)
              if module.bias is not None else None)
        extra = per_example_weight_output(module, x, e, eb)
        out = self._add(base, extra, shared, consume=True)
        if self.keeps:
            records.append(Record(site, "weight", e, bias_noise=eb))
        return out

    def _keep(self, records: list[Record]) -> None:
        """The records of one site call (several for a module with several outputs)."""
        if self.mode is Mode.RECORD:
            self.records.extend(records)
        else:  # replay: the weights are known, turn the records into gradients now (one VJP)
            record_grads(records, self.row_counts(), self.weights, self.setup.sink)
            self._sites_done(list({id(rec.site): rec.site for rec in records}.values()))

    def _sites_done(self, sites: list[Site]) -> None:
        """These site calls are in the step's sums: stop once ``setup.stop_after`` is met."""
        stop = self.setup.stop_after
        if stop is None:
            return
        if self._done is None:
            self._done = dict.fromkeys(stop, 0)
        for site in sites:
            if site.name in self._done:
                self._done[site.name] += 1
        if all(self._done[n] >= c for n, c in stop.items()):
            raise StopPass


def run_forward(est: LikelihoodRatio, setup: PassSetup | None, inputs: Any, batch: int,
                mode: Mode, *, copies: tuple[int, int] = (0, 1),
                weights: Tensor | None = None) -> tuple[Any, PassRun]:
    """Run the model on ``inputs`` under a :class:`PassRun` (``setup=None``: a clean pass);
    returns the outputs and the run.

    The forward starts over (from the same noise and model randomness) when a site turns out
    to need autograd, or when the automatic shared prefix does not fit the model (then this
    pass tiles its inputs from now on)."""
    c = copies[1] - copies[0]
    plan_pass = setup.plan_pass if setup is not None else None
    shared = setup is not None and setup.shared
    auto = shared and plan_pass.cache_prefix is None
    if auto and plan_pass.key in est._no_prefix:
        shared = auto = False
    setup_now = setup if setup is None or shared == setup.shared else _unshared(setup)
    model_inputs, replicated = tile(est, inputs, c, shared)
    stream = est.noise_stream
    snapshot = stream.snapshot()
    # a replaying forward turns sites into gradients as it goes: a retry must drop them
    sink = setup.sink if setup is not None else None
    written = dict(sink.grads) if mode is Mode.REPLAY and sink is not None else None
    grad = mode is Mode.PROBE or (est.probe.needs_grad and mode in (Mode.RECORD, Mode.REPLAY))
    while True:
        run = PassRun(est, setup_now, batch, mode, copies=copies, replicated=replicated,
                      weights=weights)
        try:
            with run, torch.set_grad_enabled(grad):
                run.grad_enabled = grad
                out = (est.model(**model_inputs) if isinstance(model_inputs, dict)
                       else est.model(*model_inputs))
            if auto and c > 1 and any(t.shape[0] == batch for t in tensors(out)):
                raise _PrefixError  # the output did not take up the copies
            if setup is not None and grad:
                check_output(out, est._watched_ids() | {id(t) for t in run.tripwires})
            est._fired.update(run.fired)
            return out, run
        except (NeedGradError, _PrefixError, RuntimeError, ValueError) as err:
            retry_grad = isinstance(err, NeedGradError)
            if not (retry_grad or auto):
                if shared and isinstance(err, RuntimeError):
                    raise RuntimeError(
                        f"{err}\n(ulr: this pass computed the noise-free prefix on the "
                        f"{batch} examples and tiled it at the first perturbed site; a value "
                        f"from before that site is combined with one after it. Pass "
                        f"cache_prefix=False to the plan.)") from err
                raise
            if retry_grad:
                est.probe.needs_grad = grad = True
            else:  # the automatic shared prefix does not fit this model: tile the inputs
                est._no_prefix.add(plan_pass.key)
                shared = auto = False
                setup_now = _unshared(setup)
                model_inputs, replicated = tile(est, inputs, c, shared)
            stream.restore(snapshot)
            if written is not None:
                sink.grads.clear()
                sink.grads.update(written)


def _unshared(setup: PassSetup) -> PassSetup:
    return PassSetup(setup.plan_pass, setup.batch, False, setup.sink, setup.stop_after)


def tile(est: LikelihoodRatio, inputs: Any, copies: int, shared: bool
         ) -> tuple[Any, dict[int, int]]:
    """The inputs of a forward of ``copies`` copies (``B`` rows when the prefix is shared),
    and the storage of the tiled tensors (see :attr:`PassRun.replicated`)."""
    if shared:  # B rows; a copy, so that a model that changes its input in place
        return clone_dense(inputs), {}  # leaves the user's batch alone
    if copies == 1:
        return inputs, {}
    rep = (replicate(inputs, copies) if est._replicate_inputs is None
           else est._replicate_inputs(inputs, copies))
    return rep, {t.data_ptr(): t.numel() for t in tensors(rep) if t.layout == torch.strided}
