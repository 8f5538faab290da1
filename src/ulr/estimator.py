"""The likelihood-ratio estimator: orchestration of the perturbed passes (the math lives in
:mod:`ulr.functional`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .baselines import Baseline, Context, leave_one_out, none
from .functional import has_closed_form, module_grads, per_example_weight_output
from .noise import Gaussian, Noise, WeightNoise
from .parallel import Assembler
from .plans import Pass, Plan, layerwise
from .samplers import Sampler, iid
from .sites import SiteSpec, _stack, as_spec

__all__ = ["LikelihoodRatio", "replicate"]

DEFAULT_SIGMA = 0.1

NoiseArg = Noise | Mapping[str, Noise | WeightNoise] | Callable[[str], Noise] | None
Memory = Literal["store", "chunked", "replay"]


@dataclass(frozen=True)
class _Site:
    name: str
    noise: Noise
    module: nn.Module | None  # None for marks
    closed_form: bool
    weight_noise: bool = False


@dataclass
class _Record:
    """What one site call leaves for the gradient once the losses are known.

    ``kind``: "closed" (Linear/Conv input kept), "vjp" (value kept with its local graph) or
    "weight" (per-example weight noise: only the noise is needed). ``tiled``: the input/value
    holds the ``B`` rows shared by all copies, so the signal is summed over copies first.
    """

    site: _Site
    kind: str
    noise: Tensor
    inputs: Tensor | None = None
    value: Tensor | None = None
    bias_noise: Tensor | None = None
    tiled: bool = False


class _Rows(NamedTuple):
    """The row counts of a block of a pass that :meth:`LikelihoodRatio._record_grads` needs."""

    rows_total: int
    num_copies: int
    batch: int


class _NeedGradError(Exception):
    """A pass run without autograd met a site that needs a local VJP: rerun it with grad."""


class _PrefixError(Exception):
    """A pass with the automatic noise-free prefix did not take up the copies."""


class _UsesChangedError(Exception):
    """A noisy pass used a value the clean pass had found unused (a site output left without
    noise), or a parameter past the last site: probe again and start the step over."""


def replicate(tree: Any, num_copies: int) -> Any:
    """Tile every tensor in ``tree`` ``num_copies`` times along dim 0, copy-major.

    Row ``k·B + b`` of the result is copy ``k`` of row ``b``::

        [x0, x1, x2] -> [x0, x1, x2, x0, x1, x2]        (B = 3, K = 2)

    Tuples, lists and dicts are mapped; anything that is not a tensor is returned unchanged.
    """
    if isinstance(tree, Tensor):
        if tree.dim() == 0:
            return tree
        return tree.repeat(num_copies, *([1] * (tree.dim() - 1)))
    if isinstance(tree, tuple):
        return tuple(replicate(t, num_copies) for t in tree)
    if isinstance(tree, list):
        return [replicate(t, num_copies) for t in tree]
    if isinstance(tree, dict):
        return {k: replicate(v, num_copies) for k, v in tree.items()}
    return tree


def _tensors(tree: Any) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree] if tree.dim() > 0 else []
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _clone_dense(tree: Any) -> Any:
    """``tree`` with every strided tensor cloned (others, e.g. sparse, kept)."""
    if isinstance(tree, Tensor):
        return tree.clone() if tree.layout == torch.strided else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_clone_dense(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _clone_dense(v) for k, v in tree.items()}
    return tree


def _check_batch(tree: Any, batch: int, what: str) -> None:
    for t in _tensors(tree):
        if t.shape[0] != batch:
            raise ValueError(
                f"{what} has a tensor of shape {tuple(t.shape)} whose first dimension is not "
                f"the batch size {batch}; every tensor in inputs and targets must be batch-first"
            )


def _map_floats(tree: Any, fn: Callable[[Tensor, tuple], Tensor], site: str,
                path: tuple = ()) -> Any:
    """``tree`` with every floating-point tensor ``t`` at ``path`` replaced by ``fn(t, path)``.

    Tuples (NamedTuples too), lists, dicts (and Mapping types such as ``OrderedDict``) and
    dataclasses are rebuilt; other tensors, ``None``, numbers and strings pass unchanged. Any
    other object is refused: it might hide a tensor that would escape the site.
    """
    if isinstance(tree, Tensor):
        return fn(tree, path) if torch.is_floating_point(tree) else tree
    if isinstance(tree, tuple):
        items = [_map_floats(v, fn, site, (*path, i)) for i, v in enumerate(tree)]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, list):
        return [_map_floats(v, fn, site, (*path, i)) for i, v in enumerate(tree)]
    if isinstance(tree, Mapping):
        out = copy.copy(tree)
        for k, v in tree.items():
            out[k] = _map_floats(v, fn, site, (*path, k))
        return out
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{
            f.name: _map_floats(getattr(tree, f.name), fn, site, (*path, f.name))
            for f in dataclasses.fields(tree) if f.init})
    if tree is None or isinstance(tree, (bool, int, float, complex, str, bytes)):
        return tree
    raise TypeError(
        f"site {site!r} returned {_path_name(path)} of type {type(tree).__name__}, which ulr "
        f"cannot look into; a site's value must be a tensor or a tuple/list/dict/dataclass of "
        f"them. Choose the submodule that produces the tensor, or mark the value inside forward "
        f"with ulr.perturb(name, x)"
    )


def _path_name(path: tuple) -> str:
    return "output" + "".join(f"[{k!r}]" for k in path)


def _batch_dims(module: nn.Module | None) -> Callable[[tuple], int]:
    """The batch dimension of each tensor of a module's nested output, by its path.

    torch's recurrent modules return ``(output, h_n)`` / ``(output, (h_n, c_n))`` with ``h_n``
    and ``c_n`` laid out ``[layers·directions, batch, hidden]`` and ``output`` batch-first only
    with ``batch_first=True``; ``nn.MultiheadAttention`` returns its output sequence-first
    unless ``batch_first=True`` and its attention weights batch-first. Everything else is
    batch-first.
    """
    if isinstance(module, nn.RNNBase):
        first = 0 if module.batch_first else 1
        return lambda path: first if path[:1] == (0,) else 1
    if isinstance(module, nn.MultiheadAttention):
        first = 0 if module.batch_first else 1
        return lambda path: first if path[:1] == (0,) else 0
    return lambda path: 0


def _graph_params(tensors: Iterable[Tensor]) -> dict[int, Tensor]:
    """The leaf tensors that require grad (parameters) reachable from ``tensors``' graphs."""
    found: dict[int, Tensor] = {}
    seen: set = set()
    stack = []
    for t in tensors:
        if not isinstance(t, Tensor) or not t.requires_grad:
            continue
        if t.grad_fn is None:
            found[id(t)] = t
        else:
            stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if isinstance(var, Tensor):
            found[id(var)] = var
        stack.extend(n for n, _ in node.next_functions)
    return found


def _model_rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """torch's global CPU RNG state and, once CUDA is in use, every device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_model_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _add(grads: dict[Tensor, Tensor], p: Tensor, g: Tensor) -> None:
    grads[p] = grads[p] + g if p in grads else g


class _PassRun:
    """One forward pass over copies ``[k0, k1)`` of the ``K`` of a :class:`Pass`.

    Hooks call :meth:`on_site`. Each perturbed site draws the noise of all ``K`` copies (so a
    chunk sees exactly the noise the whole pass would) and keeps the rows of its copies. With
    ``record`` the site leaves a :class:`_Record`; with ``weights`` (replay) it turns into
    gradients at once, inside the hook, and nothing is kept.
    """

    def __init__(self, est: LikelihoodRatio, spec: Pass | None, batch: int, *,
                 copies: tuple[int, int] = (0, 1), expand: bool = False,
                 tiled: dict[int, int] | None = None, record: bool = True,
                 weights: Tensor | None = None, sink: tuple | None = None,
                 probe: dict | None = None) -> None:
        self.est, self.spec, self.batch = est, spec, batch
        self.total_copies = spec.num_copies if spec is not None else 1
        self.k0, self.k1 = copies
        self.num_copies = self.k1 - self.k0
        self.rows = self.num_copies * batch
        self.rows_total = self.total_copies * batch
        self.expand = expand  # inputs hold B rows; tile at the first perturbed site
        # data_ptr -> numel of the replicated inputs: a site whose input is one of them (or a
        # contiguous view of one) sees identical copies of B rows.
        self.tiled = tiled or {}
        self.record, self.weights, self.sink = record, weights, sink
        #: a clean pass that notes, per site name, which parameters each call depends on
        self.probe: dict[str, list[tuple[str, dict[int, Tensor]]]] | None = probe
        self.records: list[_Record] = []
        self.fired: dict[str, None] = {}
        #: site outputs passed on without noise because the clean pass found them unused; in
        #: a pass with autograd they require grad, so that a use is caught (_UsesChangedError)
        self.tripwires: list[Tensor] = []
        #: the probe's stand-ins for those outputs: (site name, path, tensor)
        self.leaves: list[tuple[str, tuple, Tensor]] = []
        self.grad_enabled = torch.is_grad_enabled()

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.on_site(self.est._module_sites[module], output, args)

    def mark(self, name: str, x: Tensor) -> Tensor:
        site = self.est._mark_site(name)
        return x if site is None else self.on_site(site, x, None)

    def on_site(self, site: _Site, value: Any, args: tuple | None) -> Any:
        self.fired[site.name] = None
        if self.spec is None:  # clean pass: no noise, nothing recorded
            return self._probe(site, value, args) if self.probe is not None else value
        keep = self.record or self.weights is not None
        if keep and site.module is None and not self.grad_enabled:
            raise _NeedGradError
        perturbed = self.spec.sites is None or site.name in self.spec.sites
        records: list[_Record] = []
        if isinstance(value, Tensor):
            out = self._perturb(site, value, args, perturbed, records, "output", 0)
        elif site.weight_noise:
            raise TypeError(f"weight-noise site {site.name!r} returned "
                            f"{type(value).__name__}; weight noise needs a module that returns "
                            f"one tensor (a plain nn.Linear or nn.Conv)")
        else:
            dims = _batch_dims(site.module)
            unused = self.est._unused.get(site.name, ())

            def leaf(t: Tensor, path: tuple) -> Tensor:
                if path in unused:
                    return self._tripwire(t)
                return self._perturb(site, t, None, perturbed, records, _path_name(path),
                                     dims(path))

            out = _map_floats(value, leaf, site.name)
        if records:
            self._keep(records)  # after the sums: in replay this consumes the noise
        return out

    def _probe(self, site: _Site, value: Any, args: tuple | None) -> Any:
        """Clean pass with ``probe``: note the trainable parameters each site's value (and a
        weight-noise site's input) depends on since the previous site, and cut the graph."""
        uses = self.probe.setdefault(site.name, [])
        leaves = _tensors(value) if not isinstance(value, Tensor) else [value]
        uses.append(("value", _graph_params(leaves)))
        if site.weight_noise and args and isinstance(args[0], Tensor):
            uses.append(("input", _graph_params([args[0]])))
        if site.closed_form and args and isinstance(args[0], Tensor):
            uses.append(("closed-input", _graph_params([args[0]])))
        if isinstance(value, Tensor):
            return value.detach()

        def stand_in(t: Tensor, path: tuple) -> Tensor:
            # a leaf of its own: whether a later site or the output depends on it tells
            # whether this part of the output is used at all
            t = t.detach().requires_grad_()
            self.leaves.append((site.name, path, t))
            return t

        return _map_floats(value, stand_in, site.name)

    def _watched(self, x: Tensor) -> bool:
        """Whether ``x`` depends on a trainable parameter or a tripwire (since the last site)."""
        found = _graph_params([x])
        return any(i in found for i in self.est._watched_ids()) or any(
            id(t) in found for t in self.tripwires)

    def _tripwire(self, t: Tensor) -> Tensor:
        t = t.detach()
        if self.grad_enabled and self.spec is not None:
            t.requires_grad_()
            self.tripwires.append(t)
        return t

    def _is_tiled(self, x: Tensor) -> bool:
        if self.num_copies == 1:
            return False
        if self.tiled.get(x.data_ptr()) != x.numel() or not x.is_contiguous():
            return False
        # The storage test is a cheap filter; the equality check guards against in-place
        # changes (e.g. in-place dropout on the input) that made the copies differ.
        copies = x.view(self.num_copies, self.batch, -1)
        return bool((copies[1:] == copies[:1]).all())

    def _noise(self, site: _Site, row_shape: torch.Size, device: torch.device) -> Tensor:
        """The noise of this run's rows, ``[rows, *row_shape]`` (fp32)."""
        if self.num_copies == self.total_copies:
            return self.est._sample(site, row_shape, self.total_copies, self.batch, device)
        z = torch.empty((self.rows, *row_shape), device=device, dtype=torch.float32)
        for r, zb in self._blocks(site, row_shape, device):
            z[r:r + zb.shape[0]] = zb
        return z

    def _blocks(self, site: _Site, row_shape: torch.Size,
                device: torch.device) -> Iterator[tuple[int, Tensor]]:
        """This run's rows of the site's noise, block by block: ``(first row, [n, *row_shape])``
        (a chunk sees the noise the whole pass would)."""
        b = self.batch
        wanted = None if self.num_copies == self.total_copies else (self.k0, self.k1)
        for k, zb in self.est._noise_blocks(site, row_shape, self.total_copies, b, device,
                                            copies=wanted):
            lo, hi = max(k, self.k0), min(k + zb.shape[0], self.k1)
            if lo < hi:
                yield (lo - self.k0) * b, zb[lo - k:hi - k].reshape(-1, *row_shape)

    def _stream(self, site: _Site, base: Tensor, x: Tensor | None, shared: bool,
                owned: bool) -> Tensor:
        """``base`` + the site's noise, added one copy block at a time; with the input ``x`` of
        a Linear/Conv site (replay's second pass) each block is turned into gradients at once.
        Memory: the output and one noise block, never the ``K·B``-row noise."""
        b, rest = self.batch, base.shape[1:]
        if owned:
            out = base
        elif shared:
            out = torch.empty((self.rows, *rest), dtype=base.dtype, device=base.device)
        else:
            out = base.clone(memory_format=torch.contiguous_format)
        tiled = x is not None and (shared or self._is_tiled(x))
        # The closed-form terms of a block are fresh tensors: summed in place, so the site
        # holds one gradient-sized buffer per parameter, not two.
        acc: dict[Tensor, Tensor] = {}
        grads, wanted, params = self.sink if x is not None else (None, None, None)
        for r, z in self._blocks(site, rest, base.device):
            n = z.shape[0]
            zz = z if z.dtype == base.dtype else z.to(base.dtype)
            if shared:
                torch.add(zz.view(-1, b, *rest), base.unsqueeze(0),
                          out=out[r:r + n].view(-1, b, *rest))
            else:
                out[r:r + n].add_(zz)
            if x is not None:
                inputs = x.detach()[:b] if tiled else x.detach()[r:r + n]
                self.est._record_parts(
                    [(0, _Record(site, "closed", z, inputs=inputs, tiled=tiled))],
                    _Rows(self.rows_total, n // b, b), self.weights[r:r + n], wanted, params,
                    lambda i, p, g: acc.__setitem__(p, acc[p].add_(g) if p in acc else g))
        if x is not None:
            for p, g in acc.items():
                _add(grads, p, g)
            self.est._sites_done([site])
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

    def _perturb(self, site: _Site, value: Tensor, args: tuple | None, perturbed: bool,
                 records: list[_Record], where: str, dim: int) -> Tensor:
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
        shared = self.expand and n == self.batch and self.num_copies > 1
        if not shared and n != self.rows:
            raise ValueError(
                f"site {site.name!r} produced a value ({where}) of shape "
                f"{tuple(value.shape)}, but the pass has {self.rows} rows ({self.num_copies} "
                f"copies x batch {self.batch}); a site's values must be batch-first (use "
                f"batch_first=True layouts, or mark a batch-first value with ulr.perturb)"
            )
        x = args[0] if args is not None and len(args) == 1 else None
        keep = self.record or self.weights is not None
        base = value.detach()
        if site.weight_noise:
            return self._perturb_weights(site, base, x, shared, keep, records)
        # A Linear/Conv output that no autograd graph and no other hook holds is ours to
        # overwrite: adding the noise in place saves one activation-sized buffer per site.
        owned = (site.closed_form and not shared and not value.requires_grad
                 and value.dtype == torch.float32 and len(site.module._forward_hooks) == 1)
        closed = site.closed_form and isinstance(x, Tensor) and not x.requires_grad
        if not keep:
            return self._stream(site, base, None, shared, owned)
        if self.weights is not None and closed:
            return self._stream(site, base, x, shared, owned)
        z = self._noise(site, value.shape[1:], value.device)
        rec = None
        if closed:
            if shared or self._is_tiled(x):
                # Σ_rows g_r x_r^T = Σ_b (Σ_k g_kb) x_b^T: the weight gradient costs B rows.
                rec = _Record(site, "closed", z, inputs=x.detach()[: self.batch], tiled=True)
            else:
                rec = _Record(site, "closed", z, inputs=x.detach())
        elif value.requires_grad:
            rec = _Record(site, "vjp", z, value=value, tiled=shared)
        elif site.closed_form and not self.grad_enabled and x is not None:
            raise _NeedGradError
        elif site.noise.learnable:
            rec = _Record(site, "noise-only", z)
        out = base.add_(z) if owned else self._add(base, z, shared, consume=False)
        if rec is not None:
            records.append(rec)
        return out

    def _perturb_weights(self, site: _Site, base: Tensor, x: Any, shared: bool,
                         keep: bool, records: list[_Record]) -> Tensor:
        module = site.module
        if not isinstance(x, Tensor):
            raise TypeError(f"weight-noise site {site.name!r} must be called with one tensor")
        if x.requires_grad and self._watched(x):
            raise _UsesChangedError  # a parameter or an unused site output feeds it
        x = x.detach()
        if shared:
            x = replicate(x, self.num_copies)
        e = self._noise(site, module.weight.shape, x.device)
        eb = (self._noise(site, module.bias.shape, x.device)
              if module.bias is not None else None)
        extra = per_example_weight_output(module, x, e, eb)
        out = self._add(base, extra, shared, consume=True)
        if keep:
            records.append(_Record(site, "weight", e, bias_noise=eb))
        return out

    def _keep(self, records: list[_Record]) -> None:
        """The records of one site call (several for a module with several outputs)."""
        if self.weights is None:
            self.records.extend(records)
        else:  # replay: the weights are known, turn the records into gradients now (one VJP)
            grads, wanted, params = self.sink
            self.est._record_grads(records, self, self.weights, grads, wanted, params)


class LikelihoodRatio:
    r"""Gradient estimator by the unified likelihood ratio (ULR) method.

    Noise ``z`` is added at chosen **sites** (module outputs or :func:`ulr.perturb` marks) of
    ``model``; from the per-row losses of the noisy forward pass alone it estimates the gradient
    of the noise-smoothed loss :math:`F(θ) = E_{data} E_z[L(y, f(x; θ, z))]` and accumulates it
    into ``p.grad``, exactly where ``loss.backward()`` would put a gradient:

    .. math::
        \nabla_{θ_s} F \approx \frac{1}{K B} \sum_{k, b}
            w_{kb}\, J_{θ_s} v_s(x_b)^\top \bigl(-\nabla_z \ln f_s(z_{s,kb})\bigr)

    where ``v_s`` is the value of site ``s``, ``w = baseline(L)`` and ``K = num_copies``. The
    loss and everything after a site are never differentiated: they may be non-differentiable
    (thresholds, spikes, argmax, 0-1 loss, a black box). Each site's parameters get the local
    vector-Jacobian product of their own segment only: closed form for ``nn.Linear`` and
    ``nn.Conv{1,2,3}d`` (no autograd graph, so pure-Linear/Conv models run under no-grad),
    autograd inside the segment for any other module. Sites placed only at block outputs give
    backprop inside each block and LR between blocks.

    Copy layout: the batch of ``B`` examples is tiled into ``K`` copies, copy-major — row
    ``k·B + b`` is copy ``k`` of example ``b`` (see :func:`replicate`). Antithetic pairs are the
    two halves of the copy dimension.

    Args:
        model: the network; it is only hooked while an estimate runs and left unchanged after.
        sites: which values get noise — a spec from :mod:`ulr.sites`, a list of names, or
            ``None`` for the output of every module that directly owns a trainable parameter.
        noise: the noise of sites whose spec gives none: a :class:`ulr.Noise` (output noise),
            :func:`ulr.weight_noise` (per-example weight noise on Linear/Conv sites), a mapping
            site-name pattern -> either, or a callable name -> either. Default
            ``Gaussian(0.1)``. A noise made with ``learnable=True`` gets the LR gradient of its
            ``ln σ`` too (:meth:`noise_parameters`).
        num_copies: noise copies ``K`` per example (per pass; plans may override it).
        sampler: how copies are drawn jointly: :func:`ulr.iid` (default),
            :func:`ulr.antithetic`, :func:`ulr.sobol`.
        baseline: control variate from :mod:`ulr.baselines`; default
            :func:`~ulr.baselines.leave_one_out` (``none()`` when the sampler makes fewer than
            two independent copies, e.g. ``num_copies=1``).
        plan: which passes perturb which sites, from :mod:`ulr.plans`; default
            :func:`~ulr.plans.layerwise` (one pass per site). The defaults are the
            configuration with the lowest variance per forward row measured in
            docs/results/variance.md; :func:`~ulr.plans.all_sites` is cheaper per step.
        generator: the only source of randomness; default: a generator seeded from torch's
            global RNG at construction (so ``torch.manual_seed`` makes runs reproducible).
        exclude: parameter names (wildcards allowed) deliberately left without a gradient.
            Other trainable parameters that no site covers raise a ``ValueError``.
        replicate: ``replicate(inputs, K) -> inputs`` for inputs that are not a plain batch
            (default :func:`replicate`: tile every tensor along dim 0). Example: a whole graph
            whose ``B`` nodes are the rows — tile the node features and build a
            block-diagonal adjacency of ``K`` copies. With a custom function, ``B`` is the
            leading dimension of ``targets`` (of the first input tensor if there are none) and
            only the targets must be batch-first. The result must give every site ``K·B`` rows,
            copy-major.
        memory: how long the estimator holds what each site needs:

            * ``"store"`` (default): each site's input (or local graph) and noise for all
              ``K·B`` rows until the losses are known — about ``K×`` the activation memory of
              backprop on ``B`` rows;
            * ``"chunked"``: the copies in chunks of ``chunk_size``; memory bounded by a chunk
              (plus one block of noise while a site draws). The same estimate as ``"store"``
              for the same generator state. One forward sweep when the baseline is row-local
              (``none``, ``clean``), two when it needs all copies (``leave_one_out``,
              ``running_average``);
            * ``"replay"``: a first forward computes only the losses; the noise is then
              regenerated from the saved generator state in a second forward, where each site
              turns into gradients as soon as it fires — peak memory close to inference on
              ``K·B`` rows, for twice the forward compute.

            Noise is drawn in blocks of whole copies (at most 8 MB each; see
            :meth:`ulr.samplers.Sampler.blocks`) in every mode; at
            Linear/Conv sites, replay and the loss-only forwards of chunked add one block to the
            output (and replay turns it into gradient terms) before drawing the next, so they
            never hold a site's ``K·B``-row noise.
        chunk_size: copies per chunk for ``memory="chunked"``.
        workers: assemble the per-site gradients in this many threads once a pass's losses
            are known (on CUDA each thread on its own stream), overlapping with the next
            pass's forward; ``0`` (default): in the calling thread. Gradients are identical
            to ``workers=0`` (bitwise on CPU at the same intra-op thread count); at most two
            passes' records are held at once. Needs ``memory="store"`` or ``"chunked"``. See
            :mod:`ulr.parallel` and docs/rearrangement.md for what it buys.

    Example:
        >>> import torch, ulr
        >>> from torch import nn
        >>> import torch.nn.functional as F
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> est = ulr.LikelihoodRatio(model, num_copies=16)  # iid, leave-one-out, layer-wise
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> opt.zero_grad()
        >>> loss = est.loss_and_grads(lambda out, t: F.cross_entropy(out, t, reduction="none"),
        ...                           x, y)
        >>> model[0].weight.grad.shape
        torch.Size([8, 4])
        >>> est.sampler, est.baseline, est.plan
        (iid(), leave_one_out(), layerwise(groups=None, num_copies=None))
        >>> opt.step()

    References:
        Jiang, Zhang, Xu, Yu, Peng. *One Forward is Enough for Neural Network Training via
        Likelihood Ratio Method.* ICLR 2024. https://arxiv.org/abs/2305.08960
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sites: SiteSpec | Iterable[str] | None = None,
        noise: NoiseArg = None,
        num_copies: int = 32,
        sampler: Sampler | None = None,
        baseline: Baseline | None = None,
        plan: Plan | None = None,
        generator: torch.Generator | None = None,
        exclude: Iterable[str] = (),
        replicate: Callable[[Any, int], Any] | None = None,
        memory: Memory = "store",
        chunk_size: int | None = None,
        workers: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_copies, bool) or not isinstance(num_copies, int) or num_copies < 1:
            raise ValueError(f"num_copies must be an int >= 1, got {num_copies!r}")
        for arg, cls, fn in ((sampler, Sampler, "ulr.iid()/ulr.antithetic()/ulr.sobol()"),
                             (baseline, Baseline, "ulr.baselines.leave_one_out() etc."),
                             (plan, Plan, "ulr.plans.all_sites()/layerwise()")):
            if arg is not None and not isinstance(arg, cls):
                raise TypeError(f"expected a {cls.__name__} such as {fn}, got {arg!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {generator!r}")
        if not (noise is None or isinstance(noise, (Noise, WeightNoise, Mapping))
                or callable(noise)):
            raise TypeError(f"noise must be a ulr.Noise, a mapping or a callable, got {noise!r}")
        if replicate is not None and not callable(replicate):
            raise TypeError(f"replicate must be a callable (inputs, num_copies), got {replicate!r}")
        if memory not in ("store", "chunked", "replay"):
            raise ValueError(f"memory must be 'store', 'chunked' or 'replay', got {memory!r}")
        if memory == "chunked":
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
                raise ValueError(f"memory='chunked' needs chunk_size=<copies per chunk, >= 1>, "
                                 f"got {chunk_size!r}")
        elif chunk_size is not None:
            raise ValueError(f"chunk_size is only used with memory='chunked' (memory={memory!r})")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0 (0: assemble the gradients in the "
                             f"calling thread), got {workers!r}")
        if workers and memory == "replay":
            raise ValueError("workers > 0 needs memory='store' or 'chunked': with 'replay' each "
                             "site turns into gradients inside the forward pass, so there is "
                             "nothing left to assemble in parallel")

        self.model = model
        self.spec = as_spec(sites)
        self.noise = noise
        self.num_copies = num_copies
        self.sampler = sampler if sampler is not None else iid()
        if baseline is None:
            # leave-one-out needs two independent copies; one copy has nothing to leave out
            groups = self.sampler.copy_groups(num_copies)
            baseline = leave_one_out() if int(groups.unique().numel()) >= 2 else none()
        self.baseline = baseline
        self.plan = plan if plan is not None else layerwise()
        self.exclude = tuple(exclude)
        self.memory: Memory = memory
        self.chunk_size = chunk_size
        self.workers = workers
        self._assembler = Assembler(workers) if workers else None
        self._replicate_inputs = replicate
        self.sampler.check_num_copies(num_copies)
        self.baseline.check(num_copies, self.sampler.copy_groups(num_copies))

        names = [n for n, _ in model.named_parameters()]
        for pattern in self.exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"exclude pattern {pattern!r} matches no parameter of the model")

        self._module_sites: dict[nn.Module, _Site] = {}
        for name, module in model.named_modules():
            if module in self._module_sites:
                continue
            choice = self.spec.choose(name, module)
            if choice:
                self._module_sites[module] = self._make_site(name, module, choice)
        if not self._module_sites and not self.spec.selects_marks:
            raise ValueError(
                f"no site found: the spec {self.spec!r} selects no module of "
                f"{type(model).__name__}; check the types or names (see model.named_modules())"
            )
        self._mark_sites: dict[str, _Site | None] = {}
        self._needs_grad = not self._closed_form_covers_all()
        self._own_generator = generator is None
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            generator = torch.Generator(device=device).manual_seed(seed)
        self.generator = generator
        self._site_names: list[str] | None = None
        #: the sites the first call's clean pass met (None: probe at the next call)
        self._probed: set[str] | None = None
        #: per site, the paths of output parts that the clean pass found unused
        self._unused: dict[str, set[tuple]] = {}
        #: passes (keys) whose automatic prefix caching failed: they tile the inputs instead
        self._no_prefix: set[str] = set()
        self._fired: set[str] = set()
        #: Forward rows (examples × copies, summed over passes and sweeps) of the last call.
        self.last_forward_rows = 0

    # -- configuration helpers ----------------------------------------------------------------
    def _make_site(self, name: str, module: nn.Module | None, choice: Any) -> _Site:
        noise = self._resolve_noise(name, choice)
        weight = isinstance(noise, WeightNoise)
        if weight:
            if module is None or not has_closed_form(module):
                raise ValueError(
                    f"weight noise needs a plain nn.Linear or nn.Conv1d/2d/3d site, but "
                    f"{name!r} is {type(module).__name__ if module is not None else 'a mark'}; "
                    f"use output noise there"
                )
            noise = noise.noise
        return _Site(name, noise, module, module is not None and has_closed_form(module), weight)

    def _resolve_noise(self, name: str, choice: Any) -> Noise | WeightNoise:
        if isinstance(choice, (Noise, WeightNoise)):
            return choice
        noise = self.noise
        if noise is None:
            return Gaussian(DEFAULT_SIGMA)
        if isinstance(noise, (Noise, WeightNoise)):
            return noise
        if isinstance(noise, Mapping):
            for pattern, n in noise.items():
                if fnmatch.fnmatchcase(name, pattern):
                    if not isinstance(n, (Noise, WeightNoise)):
                        raise TypeError(f"noise[{pattern!r}] must be a ulr.Noise, got {n!r}")
                    return n
            raise ValueError(
                f"site {name!r} matches no pattern of the noise mapping {list(noise)}; "
                f"add an entry for it or a '*' default"
            )
        n = noise(name)
        if not isinstance(n, (Noise, WeightNoise)):
            raise TypeError(f"noise({name!r}) must return a ulr.Noise, got {n!r}")
        return n

    def _mark_site(self, name: str) -> _Site | None:
        if name not in self._mark_sites:
            choice = self.spec.choose(name, None)
            self._mark_sites[name] = self._make_site(name, None, choice) if choice else None
        return self._mark_sites[name]

    def _closed_form_covers_all(self) -> bool:
        if any(not s.closed_form for s in self._module_sites.values()):
            return False
        owners = {id(p) for m in self._module_sites for p in m.parameters(recurse=False)}
        return all(id(p) in owners for _, p in self._trainable())

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters()
                if p.requires_grad and not any(fnmatch.fnmatchcase(n, e) for e in self.exclude)]

    def noise_parameters(self) -> list[nn.Parameter]:
        """Learnable noise scales (``ln σ``) of the sites seen so far, for an optimizer."""
        seen: dict[int, nn.Parameter] = {}
        for s in [*self._module_sites.values(), *filter(None, self._mark_sites.values())]:
            for p in s.noise.parameters():
                seen[id(p)] = p
        return list(seen.values())

    def _cache_prefix(self, spec: Pass) -> bool:
        if spec.num_copies == 1:
            return False
        if spec.cache_prefix is None:
            # On for any model with plain batch inputs: a model that combines a value from
            # before the first perturbed site with one after it fails on the row counts, and
            # that pass then runs (and keeps running) on tiled inputs (see _forward).
            return self._replicate_inputs is None and spec.key not in self._no_prefix
        if spec.cache_prefix and self._replicate_inputs is not None:
            raise ValueError("cache_prefix=True cannot be combined with a custom replicate=; "
                             "use cache_prefix=False")
        return spec.cache_prefix

    def _generator_on(self, device: torch.device) -> torch.Generator:
        """The generator, moved to ``device`` (reseeded from itself) when it is our own."""
        gen = self.generator
        if gen.device != device and self._own_generator:
            seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
            gen = self.generator = torch.Generator(device=device).manual_seed(seed)
        return gen

    def _draw(self, site: _Site, row_shape: torch.Size, num_copies: int, batch: int,
              device: torch.device, out: Tensor | None = None,
              copies: tuple[int, int] | None = None) -> Iterator[tuple[int, Tensor]]:
        """The sampler's copy blocks ``(first copy, [n, B, *row_shape])`` of one site, on the
        generator's device (see :meth:`ulr.samplers.Sampler.blocks`)."""
        site.noise.check_shape(row_shape, site.name)
        gen = self._generator_on(device)
        return self.sampler.blocks(site.noise, num_copies, torch.Size((batch, *row_shape)),
                                   generator=gen, device=gen.device, out=out, copies=copies)

    def _sample(self, site: _Site, row_shape: torch.Size, num_copies: int, batch: int,
                device: torch.device) -> Tensor:
        """All of a site's noise, ``[K·B, *row_shape]``."""
        z = torch.empty((num_copies, batch, *row_shape), dtype=torch.float32,
                        device=self._generator_on(device).device)
        for _ in self._draw(site, row_shape, num_copies, batch, device, out=z):
            pass
        return z.view(num_copies * batch, *row_shape).to(device)

    def _noise_blocks(self, site: _Site, row_shape: torch.Size, num_copies: int, batch: int,
                      device: torch.device, copies: tuple[int, int] | None = None
                      ) -> Iterator[tuple[int, Tensor]]:
        """A site's noise one copy block at a time (memory: a block instead of ``K·B`` rows);
        with ``copies=(k0, k1)`` the blocks holding those copies."""
        for k, z in self._draw(site, row_shape, num_copies, batch, device, copies=copies):
            yield k, z.to(device)

    def _snapshot(self) -> tuple:
        """The noise stream's state and the model's own randomness (torch's global RNGs, which
        dropout and other train-mode layers draw from): restoring both makes a repeated forward
        see the same noise *and* the same dropout masks."""
        return self.generator.get_state(), self.sampler.snapshot(), _model_rng_state()

    def _restore(self, snapshot: tuple) -> None:
        self.generator.set_state(snapshot[0])
        self.sampler.restore(snapshot[1])
        _set_model_rng_state(snapshot[2])

    # -- running passes -----------------------------------------------------------------------
    def _forward(self, spec: Pass | None, inputs: Any, batch: int, *,
                 copies: tuple[int, int] = (0, 1), expand: bool = False, record: bool = True,
                 weights: Tensor | None = None, sink: tuple | None = None,
                 probe: dict | None = None) -> tuple[Any, _PassRun]:
        c = copies[1] - copies[0]
        auto = expand and spec is not None and spec.cache_prefix is None
        if auto and spec.key in self._no_prefix:
            expand = auto = False
        rep, tiled = self._tile(inputs, c, expand)
        snapshot = self._snapshot()
        # replay turns sites into gradients during the forward: a retry must drop them
        written = dict(sink[0]) if weights is not None and sink is not None else None
        grad = probe is not None or (self._needs_grad and spec is not None
                                     and (record or weights is not None))
        while True:
            run = _PassRun(self, spec, batch, copies=copies, expand=expand, tiled=tiled,
                           record=record, weights=weights, sink=sink, probe=probe)
            handles = [m.register_forward_hook(run.hook) for m in self._module_sites]
            stack = _stack()
            stack.append(run)
            try:
                with torch.set_grad_enabled(grad):
                    run.grad_enabled = grad
                    out = self.model(**rep) if isinstance(rep, dict) else self.model(*rep)
                if auto and c > 1 and any(t.shape[0] == batch for t in _tensors(out)):
                    raise _PrefixError  # the output did not take up the copies
                if spec is not None and grad:
                    self._check_output(out, run)
                self._fired.update(run.fired)
                return out, run
            except (_NeedGradError, _PrefixError, RuntimeError, ValueError) as err:
                retry_grad = isinstance(err, _NeedGradError)
                if not (retry_grad or auto):
                    if expand and isinstance(err, RuntimeError):
                        raise RuntimeError(
                            f"{err}\n(ulr: this pass computed the noise-free prefix on the "
                            f"{batch} examples and tiled it at the first perturbed site; a value "
                            f"from before that site is combined with one after it. Pass "
                            f"cache_prefix=False to the plan.)") from err
                    raise
                if retry_grad:
                    self._needs_grad = grad = True
                else:  # automatic prefix caching does not fit this model: tile the inputs
                    self._no_prefix.add(spec.key)
                    expand = auto = False
                    rep, tiled = self._tile(inputs, c, expand)
                self._restore(snapshot)
                if written is not None:
                    sink[0].clear()
                    sink[0].update(written)
            finally:
                stack.pop()
                for h in handles:
                    h.remove()

    def _tile(self, inputs: Any, copies: int, expand: bool) -> tuple[Any, dict[int, int]]:
        """The inputs of a pass of ``copies`` copies (as they are when the prefix is computed
        on the ``B`` examples), and the storage of the tiled tensors (see _PassRun.tiled)."""
        if expand:  # B rows; a copy, so that a model that changes its input in place
            return _clone_dense(inputs), {}  # leaves the user's batch alone
        if copies == 1:
            return inputs, {}
        rep = (replicate(inputs, copies) if self._replicate_inputs is None
               else self._replicate_inputs(inputs, copies))
        return rep, {t.data_ptr(): t.numel() for t in _tensors(rep)
                     if t.layout == torch.strided}

    def _losses(self, loss_fn: Callable, outputs: Any, targets: Any, rows: int) -> Tensor:
        with torch.no_grad():
            losses = loss_fn(outputs) if targets is None else loss_fn(outputs, targets)
        if not isinstance(losses, Tensor):
            raise TypeError(
                f"loss_fn must return a tensor with one loss per row (shape ({rows},)), got "
                f"{type(losses).__name__}; for torch losses pass reduction='none'"
            )
        if losses.shape != (rows,):
            hint = (" — it looks reduced; pass reduction='none'" if losses.dim() == 0 else
                    " — reduce the other dimensions per row, e.g. .mean(dim=1)"
                    if losses.dim() > 1 and losses.shape[0] == rows else "")
            raise ValueError(
                f"loss_fn must return one loss per row, shape ({rows},), but returned shape "
                f"{tuple(losses.shape)}{hint}"
            )
        losses = losses.detach()
        if losses.dtype != torch.float64:
            losses = losses.float()
        bad = (~torch.isfinite(losses)).sum().item()
        if bad:
            raise ValueError(
                f"loss_fn returned {bad} non-finite losses out of {rows} (NaN/inf); no gradient "
                f"was written. Lower the noise scale or the learning rate, or check the loss"
            )
        return losses

    def _record_grads(self, records: list[_Record], run: _PassRun, weights: Tensor,
                      grads: dict[Tensor, Tensor], wanted: set[int],
                      params: list[nn.Parameter]) -> None:
        """Turn records into gradients: ``weights [rows of run]``, normalised by all rows."""
        self._record_parts(list(enumerate(records)), run, weights, wanted, params,
                           lambda i, p, g: _add(grads, p, g))
        self._sites_done(list({id(rec.site): rec.site for rec in records}.values()))

    def _sites_done(self, sites: list[_Site]) -> None:
        """Called once the gradients of these site calls are in the step's sums (a hook for
        subclasses; the distributed rebuild stops its forward there)."""

    def _assemble(self, records: list[_Record], run: _PassRun, weights: Tensor,
                  grads: dict[Tensor, Tensor], wanted: set[int],
                  params: list[nn.Parameter]) -> None:
        """:meth:`_record_grads`, or with ``workers`` hand the records to the thread pool and
        return at once (the next pass's forward overlaps with this assembly)."""
        if self._assembler is None:
            self._record_grads(records, run, weights, grads, wanted, params)
            return
        # The records of at most two passes are alive: the one in the pool and this one.
        while self._assembler.pending() >= 1:
            self._assembler.merge_oldest(functools.partial(_add, grads))
        vjp = [(i, r) for i, r in enumerate(records) if r.kind == "vjp"]
        tasks = [functools.partial(self._collect_parts, [(i, r)], run, weights, wanted, params)
                 for i, r in enumerate(records) if r.kind != "vjp"]
        if vjp:
            tasks.append(functools.partial(self._collect_parts, vjp, run, weights, wanted,
                                           params))
        self._assembler.submit(len(records), tasks, weights.device)

    def _collect_parts(self, records: list[tuple[int, _Record]], run: _PassRun,
                       weights: Tensor, wanted: set[int], params: list[nn.Parameter]
                       ) -> tuple[dict[int, list[tuple[Tensor, Tensor]]], list]:
        """:meth:`_record_parts` into lists: terms per record index, and the VJP's terms."""
        per_record: dict[int, list[tuple[Tensor, Tensor]]] = {}
        tail: list[tuple[Tensor, Tensor]] = []

        def emit(i: int | None, p: Tensor, g: Tensor) -> None:
            (tail if i is None else per_record.setdefault(i, [])).append((p, g))

        self._record_parts(records, run, weights, wanted, params, emit)
        return per_record, tail

    def _record_parts(self, records: list[tuple[int, _Record]], run: _PassRun, weights: Tensor,
                      wanted: set[int], params: list[nn.Parameter],
                      emit: Callable[[int | None, Tensor, Tensor], None]) -> None:
        """Compute the gradient terms of ``(index, record)`` pairs and hand each to
        ``emit(index, parameter, gradient)`` in the order they are to be added; the terms of
        the one autograd VJP of all ``"vjp"`` records among them come last, with index None."""
        rows = run.rows_total
        outs, signals = [], []
        for i, rec in records:
            noise, module = rec.site.noise, rec.site.module
            if noise.learnable:
                emit(i, noise.log_scale, noise.log_scale_grad(rec.noise, weights, rows))
                if rec.bias_noise is not None:
                    emit(i, noise.log_scale, noise.log_scale_grad(rec.bias_noise, weights, rows))
            if rec.kind == "noise-only":
                continue
            # the record's noise is not needed after this: the signal takes its storage
            signal = noise.signal_(rec.noise, weights, rows)
            if rec.kind == "weight":
                if id(module.weight) in wanted:
                    emit(i, module.weight, signal.sum(0))
                if rec.bias_noise is not None and id(module.bias) in wanted:
                    emit(i, module.bias, noise.signal_(rec.bias_noise, weights, rows).sum(0))
                continue
            if rec.tiled:
                signal = signal.view(run.num_copies, run.batch, *signal.shape[1:]).sum(0)
            if rec.kind == "closed":
                for pname, g in module_grads(module, rec.inputs, signal).items():
                    p = getattr(module, pname)
                    if id(p) in wanted:
                        emit(i, p, g)
            else:
                outs.append(rec.value)
                signals.append(signal.to(rec.value.dtype))
        if outs and params:
            wires = run.tripwires
            found = torch.autograd.grad(outs, [*params, *wires], signals, allow_unused=True)
            if any(g is not None for g in found[len(params):]):
                raise _UsesChangedError
            for p, g in zip(params, found[:len(params)], strict=True):
                if g is not None:
                    emit(None, p, g)

    def _estimate_pass(self, spec: Pass, loss_fn: Callable, inputs: Any, targets: Any,
                       batch: int, clean: Tensor | None, grads: dict[Tensor, Tensor],
                       params: list[nn.Parameter]) -> tuple[float, int, int]:
        """Run one pass in the chosen memory mode; returns (loss sum, loss rows, forward rows)."""
        k = spec.num_copies
        self.sampler.check_num_copies(k)
        groups = self.sampler.copy_groups(k)
        self.baseline.check(k, groups)
        expand = self._cache_prefix(spec)
        wanted = {id(p) for p in params}
        sink = (grads, wanted, params)

        def forward(copies, record, weights=None):
            out, run = self._forward(spec, inputs, batch, copies=copies, expand=expand,
                                     record=record, weights=weights, sink=sink)
            if not run.fired:
                raise self._no_site_error()
            return out, run

        def losses_of(out, run):
            c = run.num_copies
            return self._losses(loss_fn, out, targets if c == 1 else replicate(targets, c),
                                run.rows)

        def weights_of(losses, copies):
            k0, k1 = copies
            ctx = Context(groups[k0:k1], clean, spec.key)
            return self.baseline(losses.view(k1 - k0, batch), ctx).reshape(-1)

        start = self._snapshot()
        if self.memory == "store":
            out, run = forward((0, k), True)
            losses = losses_of(out, run)
            del out
            self._assemble(run.records, run, weights_of(losses, (0, k)), grads, wanted, params)
            return float(losses.sum()), losses.numel(), k * batch
        if self.memory == "replay":
            with torch.no_grad():
                out, run = forward((0, k), False)
                losses = losses_of(out, run)
            del out
            self._restore(start)
            _, again = self._forward(spec, inputs, batch, copies=(0, k), expand=expand,
                                     record=False, weights=weights_of(losses, (0, k)), sink=sink)
            _same_sites(run, again)
            return float(losses.sum()), losses.numel(), 2 * k * batch
        chunks = [(c, min(c + self.chunk_size, k)) for c in range(0, k, self.chunk_size)]
        # The noise stream restarts for every chunk (each chunk takes its copies' rows of the
        # pass's noise); the model's randomness (dropout) runs on from chunk to chunk, and the
        # second sweep replays each chunk's.
        model_rng = [start[2]]
        if self.baseline.row_local:
            total, count = 0.0, 0
            for ch in chunks:
                self._restore((*start[:2], model_rng[-1], *start[3:]))
                out, run = forward(ch, True)
                model_rng.append(_model_rng_state())
                losses = losses_of(out, run)
                del out
                self._assemble(run.records, run, weights_of(losses, ch), grads, wanted, params)
                total, count = total + float(losses.sum()), count + losses.numel()
            return total, count, k * batch
        parts, first = [], None
        for ch in chunks:
            self._restore((*start[:2], model_rng[-1], *start[3:]))
            with torch.no_grad():
                out, run = forward(ch, False)
                parts.append(losses_of(out, run))
            first = first or run
            model_rng.append(_model_rng_state())
        losses = torch.cat(parts)
        weights = weights_of(losses, (0, k))
        for ch, rng in zip(chunks, model_rng, strict=False):
            self._restore((*start[:2], rng, *start[3:]))
            _, run = forward(ch, True)
            _same_sites(first, run)
            self._assemble(run.records, run, weights[ch[0] * batch:ch[1] * batch], grads,
                           wanted, params)
        return float(losses.sum()), losses.numel(), 2 * k * batch

    def loss_and_grads(self, loss_fn: Callable[..., Tensor], inputs: Any,
                       targets: Any = None) -> Tensor:
        """Run the perturbed pass(es), accumulate the LR gradient into ``p.grad``.

        Args:
            loss_fn: ``loss_fn(outputs, targets) -> [K·B]`` (or ``loss_fn(outputs)`` when
                ``targets`` is None): one loss per row, e.g.
                ``lambda out, y: F.cross_entropy(out, y, reduction="none")``. Any callable;
                it is never differentiated.
            inputs: the batch: a tensor ``[B, ...]``, a tuple of positional arguments or a dict
                of keyword arguments of ``model``; every tensor must be batch-first.
            targets: a tensor ``[B, ...]`` or a tuple/dict of them, replicated alongside.

        Returns:
            The mean noisy loss over all rows of all passes (a detached scalar).

        Raises:
            ValueError: the batch is empty, the loss has the wrong shape or is not finite, a
                site is not batch-first, a trainable parameter is covered by no site, or one
                of its uses lies after the last site (nothing is written to ``.grad`` then).
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        elif not isinstance(inputs, (tuple, dict)):
            inputs = (inputs,)
        custom = self._replicate_inputs is not None
        found = _tensors(targets) if custom else []
        found = found or _tensors(inputs)
        if not found:
            raise ValueError("inputs must contain at least one batch-first tensor")
        batch = found[0].shape[0]
        if batch == 0:
            raise ValueError("the batch is empty (0 rows): there is nothing to estimate a "
                             "gradient from; skip empty batches (e.g. DataLoader(..., "
                             "drop_last=True)). Nothing was written to .grad")
        if not custom:
            _check_batch(inputs, batch, "inputs")
        _check_batch(targets, batch, "targets")
        return self._step(loss_fn, inputs, targets, batch, retry=True)

    def _step(self, loss_fn: Callable, inputs: Any, targets: Any, batch: int,
              retry: bool) -> Tensor:
        params = [p for _, p in self._trainable()]
        norms = _batch_norms_in_training(self.model)
        clean_losses, rows_total = None, 0
        # The clean pass (B rows, no noise): on the first call it probes which parameters each
        # site and the output depend on, and learns the sites in firing order; with a
        # train-mode BatchNorm it is the one forward that updates the running statistics and
        # gives the batch statistics every noisy pass normalises with.
        probe = {} if self._probed is None else None
        stats: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        buffers = {m: {k: b.clone() for k, b in m._buffers.items() if b is not None}
                   for m in norms} if retry else {}
        if probe is not None or self.baseline.needs_clean or norms:
            with _capture_batch_stats(self.model, norms, stats), torch.no_grad():
                # on a copy: a model that changes its input in place must not change the
                # user's batch (the noisy passes, too, work on tiled copies)
                outputs, run = self._forward(None, _clone_dense(inputs), batch, probe=probe)
            rows_total += batch
            if not run.fired:
                raise self._no_site_error()
            if probe is not None:
                self._check_uses(probe, outputs)
                self._learn_unused(run.leaves, probe, outputs)
                self._site_names, self._probed = list(run.fired), set(run.fired)
            if self.baseline.needs_clean:
                clean_losses = self._losses(loss_fn, outputs, targets, batch)
            del outputs, run

        start = self._snapshot(), self.baseline.state_dict()
        self._fired = set()
        grads: dict[Tensor, Tensor] = {}
        loss_sum, loss_rows = 0.0, 0
        changed = False
        try:
            with _frozen_batch_stats(stats):
                for spec in self.plan.passes(self._site_names, self.num_copies):
                    s, n, f = self._estimate_pass(spec, loss_fn, inputs, targets, batch,
                                                  clean_losses, grads, params)
                    loss_sum, loss_rows = loss_sum + s, loss_rows + n
                    rows_total += f
                if self._assembler is not None:
                    self._assembler.merge_all(functools.partial(_add, grads))
        except _UsesChangedError:
            if not retry:
                raise ValueError(
                    "the model used a site output that its clean forward left unused, or a "
                    "parameter after the last site, in a noisy forward only (noise- or "
                    "randomness-dependent control flow): ulr cannot tell which parts of the "
                    "output need noise. Make the site's outputs used the same way in every "
                    "forward, or choose a site that returns only what is used") from None
            changed = True
        finally:
            if self._assembler is not None:
                self._assembler.discard()  # after an error: wait for the tasks, drop them
        if retry and (changed or not self._fired <= self._probed):
            # A site the clean pass had not met fired (input-dependent control flow): probe
            # and learn the sites again, and start over.
            self._probed = None
            self._restore(start[0])
            self.baseline.load_state_dict(start[1])
            with torch.no_grad():
                for m, kept in buffers.items():  # the clean pass runs again
                    for k, b in kept.items():
                        m._buffers[k].copy_(b)
            return self._step(loss_fn, inputs, targets, batch, retry=False)

        uncovered = [n for n, p in self._trainable() if p not in grads]
        if uncovered:
            raise ValueError(
                f"no site covers the trainable parameters {uncovered}: no noise site lies "
                f"downstream of them within their segment. Add a site after them (e.g. "
                f"ulr.sites.by_name(...) | ulr.sites.param_owners()), freeze them "
                f"(requires_grad_(False)), or leave them out with exclude=[...]"
            )
        with torch.no_grad():
            for p, g in grads.items():
                g = g.to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        self.last_forward_rows = rows_total
        return torch.tensor(loss_sum / loss_rows)

    def _check_uses(self, probe: dict[str, list[tuple[str, dict[int, Tensor]]]],
                    outputs: Any) -> None:
        """Every use of a trainable parameter must lie before a site that turns it into a
        gradient: refuse uses that reach the output past the last site, or the input of a
        weight-noise site (which passes no gradient back); a closed-form site whose input
        depends on a parameter needs autograd."""
        trainable = {id(p): n for n, p in self._trainable()}
        after = [trainable[i] for i in _graph_params(_tensors(outputs)) if i in trainable]
        lost: dict[str, list[str]] = {}
        for site, uses in probe.items():
            for kind, found in uses:
                hit = sorted({trainable[i] for i in found if i in trainable})
                if hit and kind == "input":
                    lost[site] = hit
                elif hit and kind == "closed-input":
                    self._needs_grad = True
        if after:
            raise ValueError(
                f"the trainable parameters {sorted(set(after))} are used after the last noise "
                f"site: that use reaches the model's output without passing a site, so the "
                f"estimate cannot see it and their gradient would be wrong. Put a site after "
                f"the use: make the output a site (sites=ulr.sites.param_owners() | "
                f"ulr.sites.by_name(''), '' naming the root module), or pass the value through "
                f"ulr.perturb(name, x) in forward and select it with ulr.sites.marked(name); "
                f"or leave them out with exclude=[...]. Nothing was written to .grad")
        if lost:
            site, names = next(iter(lost.items()))
            raise ValueError(
                f"the trainable parameters {names} feed the input of the weight-noise site "
                f"{site!r}, which passes no gradient to its input, so their gradient would be "
                f"missed. Put a site between them and {site!r} (e.g. output noise on the "
                f"module before it), or use output noise at {site!r}")

    def _check_output(self, outputs: Any, run: _PassRun) -> None:
        """In a noisy pass every path to the output passes a site: the output depends on no
        trainable parameter and no site output that the clean pass found unused."""
        found = _graph_params(_tensors(outputs))
        if not found:
            return
        watched = self._watched_ids() | {id(t) for t in run.tripwires}
        if watched.intersection(found):
            raise _UsesChangedError

    def _watched_ids(self) -> set[int]:
        return {id(p) for _, p in self._trainable()}

    def _learn_unused(self, leaves: list[tuple[str, tuple, Tensor]],
                      probe: dict[str, list[tuple[str, dict[int, Tensor]]]],
                      outputs: Any) -> None:
        """Parts of nested site outputs (e.g. an LSTM's ``c_n``) that neither the output nor a
        later site depends on get no noise: it would add variance and nothing else."""
        found = set(_graph_params(_tensors(outputs)))
        for uses in probe.values():
            for _, hit in uses:
                found.update(hit)
        paths: dict[str, set[tuple]] = {}
        used: dict[str, set[tuple]] = {}
        for site, path, t in leaves:
            paths.setdefault(site, set()).add(path)
            if id(t) in found:
                used.setdefault(site, set()).add(path)
        self._unused = {site: ps - used.get(site, set()) for site, ps in paths.items()
                        if ps - used.get(site, set())}

    def _no_site_error(self) -> ValueError:
        return ValueError(
            f"no site fired during the forward pass of {type(self.model).__name__}: the spec "
            f"{self.spec!r} selected {[s.name for s in self._module_sites.values()] or 'no module'}"
            f" and no selected ulr.perturb mark was reached"
        )

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Generator, sampler and baseline state, learnable noise scales and the site names a
        layer-wise plan has learnt (for exact resumption)."""
        sites = [*self._module_sites.values(), *filter(None, self._mark_sites.values())]
        return {
            "generator": self.generator.get_state(),
            "generator_device": str(self.generator.device),
            "sampler": self.sampler.state_dict(),
            "baseline": self.baseline.state_dict(),
            "noise": {s.name: s.noise.log_scale.detach().clone() for s in sites
                      if s.noise.learnable},
            "site_names": None if self._site_names is None else list(self._site_names),
            # what the first call's clean pass learnt: a resumed run need not probe again
            "probe": None if self._probed is None else {
                "sites": sorted(self._probed), "needs_grad": self._needs_grad,
                "unused": {k: [list(p) for p in v] for k, v in self._unused.items()}},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {"generator", "sampler", "baseline"} - set(state)
        if missing:
            raise ValueError(f"estimator state is missing {sorted(missing)}; was it saved by "
                             f"LikelihoodRatio.state_dict()?")
        device = torch.device(state.get("generator_device", str(self.generator.device)))
        if device != self.generator.device:
            self.generator = torch.Generator(device=device)
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])
        self.baseline.load_state_dict(state["baseline"])
        names = state.get("site_names")
        self._site_names = None if names is None else list(names)
        probe = state.get("probe")
        if probe is None or names is None:  # an older checkpoint: probe at the next call
            self._probed, self._unused = None, {}
        else:
            self._probed = set(probe["sites"])
            self._needs_grad = self._needs_grad or bool(probe["needs_grad"])
            self._unused = {k: {tuple(p) for p in v} for k, v in probe["unused"].items()}
        sites = {s.name: s for s in self._module_sites.values()}
        for name, value in state.get("noise", {}).items():
            site = sites.get(name) or self._mark_site(name)
            if site is None or not site.noise.learnable:
                raise ValueError(f"estimator state has a learnable noise scale for site "
                                 f"{name!r}, which has no learnable noise here")
            with torch.no_grad():
                site.noise.log_scale.copy_(value)

    def __repr__(self) -> str:
        sites = ", ".join(s.name or "<root>" for s in self._module_sites.values())
        return (f"LikelihoodRatio(sites=[{sites}], num_copies={self.num_copies}, "
                f"sampler={self.sampler!r}, baseline={self.baseline!r}, plan={self.plan!r}, "
                f"memory={self.memory!r}" + (f", workers={self.workers}" if self.workers else "")
                + ")")


def _same_sites(losses_run: _PassRun, grads_run: _PassRun) -> None:
    """The forward that computed the losses (without autograd) and the one that turns the
    sites into gradients must meet the same sites."""
    if list(losses_run.fired) != list(grads_run.fired):
        raise ValueError(
            f"the model met other noise sites without autograd ({list(losses_run.fired)}) than "
            f"with it ({list(grads_run.fired)}), e.g. the fast path that nn.TransformerEncoder"
            f"Layer takes in eval mode under no_grad, which skips its submodules' hooks; the "
            f"losses would not match the gradient terms. Use memory='store', or sites that "
            f"fire on both paths (e.g. the encoder layer itself)")


def _batch_norms_in_training(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


@contextlib.contextmanager
def _capture_batch_stats(model: nn.Module, norms: list[nn.Module],
                         stats: dict[nn.Module, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Note each train-mode BatchNorm's batch mean and (biased) variance as it runs."""
    calls: dict[nn.Module, int] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        stats[module] = (mean, var)
        calls[module] = calls.get(module, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    names = {m: n for n, m in model.named_modules()}
    twice = [names[m] for m, c in calls.items() if c > 1]
    if twice:
        raise ValueError(
            f"BatchNorm {twice} is called more than once per forward in training mode; ulr "
            f"normalises the noisy copies with the clean batch's statistics of each BatchNorm, "
            f"which needs one call per forward. Use one BatchNorm module per call, or run the "
            f"estimate with model.eval()")


@contextlib.contextmanager
def _frozen_batch_stats(stats: dict[nn.Module, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Train-mode BatchNorms normalise every noisy row with the clean batch's statistics
    (as in eval mode with those statistics in place of the running ones) and leave their
    running statistics alone; restored on exit."""
    saved = []
    try:
        for m, (mean, var) in stats.items():
            saved.append((m, m.training, m._buffers["running_mean"], m._buffers["running_var"]))
            kept = m._buffers["running_mean"]
            dtype = kept.dtype if kept is not None else mean.dtype
            m.training = False
            m._buffers["running_mean"] = mean.to(dtype)
            m._buffers["running_var"] = var.to(dtype)
        yield
    finally:
        for m, training, mean, var in saved:
            m.training = training
            m._buffers["running_mean"], m._buffers["running_var"] = mean, var
