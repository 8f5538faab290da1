"""The likelihood-ratio estimator: orchestration of the perturbed passes (the math lives in
:mod:`ulr.functional`)."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .baselines import Baseline, Context, none
from .functional import has_closed_form, lr_signal, module_grads
from .noise import Gaussian, Noise
from .plans import Pass, Plan, all_sites
from .samplers import Sampler, iid
from .sites import SiteSpec, _stack, as_spec

__all__ = ["LikelihoodRatio", "replicate"]

DEFAULT_SIGMA = 0.1

NoiseArg = Noise | Mapping[str, Noise] | Callable[[str], Noise] | None


@dataclass(frozen=True)
class _Site:
    name: str
    noise: Noise
    module: nn.Module | None  # None for marks
    closed_form: bool


@dataclass
class _ClosedRecord:
    site: _Site
    inputs: Tensor
    noise: Tensor
    tiled: bool = False  # inputs holds the B rows that all K copies share


@dataclass
class _VJPRecord:
    site: _Site
    value: Tensor  # still attached to its local graph
    noise: Tensor


class _NeedGradError(Exception):
    """A pass run without autograd met a site that needs a local VJP: rerun it with grad."""


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


def _first_tensor(tree: Any) -> Tensor | None:
    if isinstance(tree, Tensor):
        return tree if tree.dim() > 0 else None
    if isinstance(tree, dict):
        items = tree.values()
    else:
        items = tree if isinstance(tree, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _tensors(tree: Any) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _check_batch(tree: Any, batch: int, what: str) -> None:
    if isinstance(tree, Tensor):
        if tree.dim() > 0 and tree.shape[0] != batch:
            raise ValueError(
                f"{what} has a tensor of shape {tuple(tree.shape)} whose first dimension is not "
                f"the batch size {batch}; every tensor in inputs and targets must be batch-first"
            )
    elif isinstance(tree, dict):
        for v in tree.values():
            _check_batch(v, batch, what)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            _check_batch(v, batch, what)


class _PassRun:
    """State of one forward pass: hooks call :meth:`on_site`; records wait for the losses."""

    def __init__(self, est: LikelihoodRatio, spec: Pass | None, batch: int,
                 tiled: dict[int, int] | None = None) -> None:
        self.est, self.spec, self.batch = est, spec, batch
        # data_ptr -> numel of the replicated inputs: a site whose input is one of them (or a
        # contiguous view of one) sees K identical copies of B rows.
        self.tiled = tiled or {}
        self.num_copies = spec.num_copies if spec is not None else 1
        self.rows = self.num_copies * batch
        self.closed: list[_ClosedRecord] = []
        self.vjp: list[_VJPRecord] = []
        self.fired: dict[str, None] = {}
        self.grad_enabled = torch.is_grad_enabled()

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.on_site(self.est._module_sites[module], output, args)

    def mark(self, name: str, x: Tensor) -> Tensor:
        site = self.est._mark_site(name)
        return x if site is None else self.on_site(site, x, None)

    def on_site(self, site: _Site, value: Any, args: tuple | None) -> Any:
        self.fired[site.name] = None
        if self.spec is None:  # discovery / clean pass: no noise, nothing recorded
            return value
        if site.module is None and not self.grad_enabled:
            raise _NeedGradError
        perturbed = self.spec.sites is None or site.name in self.spec.sites
        if isinstance(value, Tensor):
            return self._perturb(site, value, args, perturbed)
        if isinstance(value, (tuple, list)):
            return type(value)(
                self._perturb(site, v, None, perturbed)
                if isinstance(v, Tensor) and torch.is_floating_point(v) else v
                for v in value
            )
        raise TypeError(
            f"site {site.name!r} returned {type(value).__name__}; a site's value must be a "
            f"tensor or a tuple of tensors. Choose the submodule that produces the tensor, or "
            f"mark the value inside forward with ulr.perturb(name, x)"
        )

    def _is_tiled(self, x: Tensor) -> bool:
        if self.tiled.get(x.data_ptr()) != x.numel() or not x.is_contiguous():
            return False
        # The storage test is a cheap filter; the equality check guards against in-place
        # changes (e.g. in-place dropout on the input) that made the copies differ.
        copies = x.view(self.num_copies, self.batch, -1)
        return bool((copies[1:] == copies[:1]).all())

    def _perturb(self, site: _Site, value: Tensor, args: tuple | None, perturbed: bool) -> Tensor:
        if not perturbed:
            return value.detach()
        if value.dim() == 0 or value.shape[0] != self.rows:
            raise ValueError(
                f"site {site.name!r} produced a value of shape {tuple(value.shape)}, but the pass "
                f"has {self.rows} rows ({self.num_copies} copies x batch {self.batch}); a site's "
                f"first dimension must be the batch (use batch_first=True layouts, or mark a "
                f"batch-first value with ulr.perturb)"
            )
        z = self.est._sample(site, value, self.num_copies, self.batch)
        x = args[0] if args is not None and len(args) == 1 else None
        if site.closed_form and isinstance(x, Tensor) and not x.requires_grad:
            if self._is_tiled(x):
                # Σ_rows g_r x_r^T = Σ_b (Σ_k g_kb) x_b^T: the weight gradient costs B rows.
                self.closed.append(_ClosedRecord(site, x.detach()[: self.batch], z, tiled=True))
            else:
                self.closed.append(_ClosedRecord(site, x.detach(), z))
        elif value.requires_grad:
            self.vjp.append(_VJPRecord(site, value, z))
        elif site.closed_form and self.grad_enabled is False and x is not None:
            raise _NeedGradError
        return value.detach() + z.to(value.dtype)


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
        noise: the noise of sites whose spec gives none: a :class:`ulr.Noise`, a mapping
            site-name pattern -> noise, or a callable name -> noise. Default
            ``Gaussian(0.1)``.
        num_copies: noise copies ``K`` per example (per pass; plans may override it).
        sampler: how copies are drawn jointly (:func:`ulr.iid`, :func:`ulr.antithetic`).
        baseline: control variate from :mod:`ulr.baselines` (default: none).
        plan: which passes perturb which sites, from :mod:`ulr.plans` (default: all at once).
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

    Example:
        >>> import torch, ulr
        >>> from torch import nn
        >>> import torch.nn.functional as F
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.1), num_copies=16,
        ...                           sampler=ulr.antithetic())
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> opt.zero_grad()
        >>> loss = est.loss_and_grads(lambda out, t: F.cross_entropy(out, t, reduction="none"),
        ...                           x, y)
        >>> model[0].weight.grad.shape
        torch.Size([8, 4])
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_copies, bool) or not isinstance(num_copies, int) or num_copies < 1:
            raise ValueError(f"num_copies must be an int >= 1, got {num_copies!r}")
        for arg, cls, fn in ((sampler, Sampler, "ulr.iid()/ulr.antithetic()"),
                             (baseline, Baseline, "ulr.baselines.leave_one_out() etc."),
                             (plan, Plan, "ulr.plans.all_sites()/layerwise()")):
            if arg is not None and not isinstance(arg, cls):
                raise TypeError(f"expected a {cls.__name__} such as {fn}, got {arg!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {generator!r}")
        if not (noise is None or isinstance(noise, (Noise, Mapping)) or callable(noise)):
            raise TypeError(f"noise must be a ulr.Noise, a mapping or a callable, got {noise!r}")

        self.model = model
        self.spec = as_spec(sites)
        self.noise = noise
        self.num_copies = num_copies
        self.sampler = sampler if sampler is not None else iid()
        self.baseline = baseline if baseline is not None else none()
        self.plan = plan if plan is not None else all_sites()
        self.exclude = tuple(exclude)
        if replicate is not None and not callable(replicate):
            raise TypeError(f"replicate must be a callable (inputs, num_copies), got {replicate!r}")
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
                self._module_sites[module] = _Site(
                    name, self._resolve_noise(name, choice), module, has_closed_form(module)
                )
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
        self._warned_batchnorm = False
        #: Forward rows (examples × copies, summed over passes) of the last call.
        self.last_forward_rows = 0

    # -- configuration helpers ----------------------------------------------------------------
    def _resolve_noise(self, name: str, choice: Noise | bool) -> Noise:
        if isinstance(choice, Noise):
            return choice
        noise = self.noise
        if noise is None:
            return Gaussian(DEFAULT_SIGMA)
        if isinstance(noise, Noise):
            return noise
        if isinstance(noise, Mapping):
            for pattern, n in noise.items():
                if fnmatch.fnmatchcase(name, pattern):
                    if not isinstance(n, Noise):
                        raise TypeError(f"noise[{pattern!r}] must be a ulr.Noise, got {n!r}")
                    return n
            raise ValueError(
                f"site {name!r} matches no pattern of the noise mapping {list(noise)}; "
                f"add an entry for it or a '*' default"
            )
        n = noise(name)
        if not isinstance(n, Noise):
            raise TypeError(f"noise({name!r}) must return a ulr.Noise, got {n!r}")
        return n

    def _mark_site(self, name: str) -> _Site | None:
        if name not in self._mark_sites:
            choice = self.spec.choose(name, None)
            site = _Site(name, self._resolve_noise(name, choice), None, False) if choice else None
            self._mark_sites[name] = site
        return self._mark_sites[name]

    def _closed_form_covers_all(self) -> bool:
        owners = {id(p) for m, s in self._module_sites.items() if s.closed_form
                  for p in m.parameters(recurse=False)}
        if any(not s.closed_form for s in self._module_sites.values()):
            return False
        return all(id(p) in owners for _, p in self._trainable())

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters()
                if p.requires_grad and not any(fnmatch.fnmatchcase(n, e) for e in self.exclude)]

    def _sample(self, site: _Site, value: Tensor, num_copies: int, batch: int) -> Tensor:
        row_shape = value.shape[1:]
        site.noise.check_shape(row_shape, site.name)
        gen = self.generator
        if gen.device != value.device and self._own_generator:
            seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
            gen = self.generator = torch.Generator(device=value.device).manual_seed(seed)
        z = self.sampler.sample(site.noise, num_copies, torch.Size((batch, *row_shape)),
                                generator=gen, device=gen.device)
        return z.reshape(num_copies * batch, *row_shape).to(value.device)

    def _warn_batchnorm(self) -> None:
        if self._warned_batchnorm:
            return
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                self._warned_batchnorm = True
                warnings.warn(
                    f"BatchNorm layer {name!r} is in training mode: its batch statistics mix "
                    f"the noise copies of different examples, which biases the LR estimate. "
                    f"Run the estimate with model.eval() (frozen statistics), or use GroupNorm/"
                    f"LayerNorm, which normalise each row on its own",
                    UserWarning, stacklevel=3,
                )
                return

    # -- running passes -----------------------------------------------------------------------
    def _forward(self, spec: Pass | None, inputs: Any, batch: int) -> tuple[Any, _PassRun]:
        k = spec.num_copies if spec is not None else 1
        rep = (inputs if k == 1 else replicate(inputs, k) if self._replicate_inputs is None
               else self._replicate_inputs(inputs, k))
        tiled = {t.data_ptr(): t.numel() for t in _tensors(rep) if t.dim() > 0} if k > 1 else {}
        state = self.generator.get_state()
        grad = self._needs_grad and spec is not None
        while True:
            run = _PassRun(self, spec, batch, tiled)
            handles = [m.register_forward_hook(run.hook) for m in self._module_sites]
            stack = _stack()
            stack.append(run)
            try:
                with torch.set_grad_enabled(grad):
                    run.grad_enabled = grad
                    out = self.model(**rep) if isinstance(rep, dict) else self.model(*rep)
                return out, run
            except _NeedGradError:
                self._needs_grad = grad = True
                self.generator.set_state(state)
            finally:
                stack.pop()
                for h in handles:
                    h.remove()

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
        losses = losses.detach().float()
        bad = (~torch.isfinite(losses)).sum().item()
        if bad:
            raise ValueError(
                f"loss_fn returned {bad} non-finite losses out of {rows} (NaN/inf); no gradient "
                f"was written. Lower the noise scale or the learning rate, or check the loss"
            )
        return losses

    def _accumulate(self, run: _PassRun, weights: Tensor, grads: dict[Tensor, Tensor],
                    params: list[tuple[str, nn.Parameter]]) -> None:
        rows = run.rows
        wanted = {id(p) for _, p in params}
        for rec in run.closed:
            signal = lr_signal(weights, rec.site.noise.score(rec.noise), rows)
            if rec.tiled:
                signal = signal.view(run.num_copies, run.batch, *signal.shape[1:]).sum(0)
            for pname, g in module_grads(rec.site.module, rec.inputs, signal).items():
                p = getattr(rec.site.module, pname)
                if id(p) in wanted:
                    grads[p] = grads[p] + g if p in grads else g
        if run.vjp:
            outs = [r.value for r in run.vjp]
            signals = [lr_signal(weights, r.site.noise.score(r.noise), rows).to(r.value.dtype)
                       for r in run.vjp]
            plist = [p for _, p in params]
            for p, g in zip(plist, torch.autograd.grad(outs, plist, signals, allow_unused=True),
                            strict=True):
                if g is not None:
                    grads[p] = grads[p] + g if p in grads else g

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
            ValueError: the loss has the wrong shape or is not finite, a site is not
                batch-first, or a trainable parameter is covered by no site (nothing is
                written to ``.grad`` then).
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        elif not isinstance(inputs, (tuple, dict)):
            inputs = (inputs,)
        custom = self._replicate_inputs is not None
        first = _first_tensor(targets) if custom else None
        if first is None:
            first = _first_tensor(inputs)
        if first is None:
            raise ValueError("inputs must contain at least one batch-first tensor")
        batch = first.shape[0]
        if not custom:
            _check_batch(inputs, batch, "inputs")
        _check_batch(targets, batch, "targets")
        self._warn_batchnorm()

        params = self._trainable()
        clean_losses, site_names = None, ()
        rows_total = 0
        if self.plan.needs_site_names or self.baseline.needs_clean:
            with torch.no_grad():
                outputs, run = self._forward(None, inputs, batch)
            rows_total += batch
            site_names = list(run.fired)
            if not site_names:
                raise self._no_site_error()
            if self.baseline.needs_clean:
                clean_losses = self._losses(loss_fn, outputs, targets, batch)

        grads: dict[Tensor, Tensor] = {}
        loss_sum, rows_loss = 0.0, 0
        for spec in self.plan.passes(site_names, self.num_copies):
            k = spec.num_copies
            self.sampler.check_num_copies(k)
            groups = self.sampler.copy_groups(k)
            self.baseline.check(k, groups)
            outputs, run = self._forward(spec, inputs, batch)
            if not run.fired:
                raise self._no_site_error()
            rows_total += run.rows
            losses = self._losses(loss_fn, outputs,
                                  replicate(targets, k) if k > 1 else targets, run.rows)
            del outputs
            weights = self.baseline(losses.view(k, batch),
                                    Context(groups, clean_losses, spec.key)).reshape(-1)
            self._accumulate(run, weights, grads, params)
            loss_sum += float(losses.sum())
            rows_loss += run.rows

        uncovered = [n for n, p in params if p not in grads]
        if uncovered:
            raise ValueError(
                f"no site covers the trainable parameters {uncovered}: no noise site lies "
                f"downstream of them within their segment. Add a site after them (e.g. "
                f"ulr.sites.by_name(...) | ulr.sites.param_owners()), freeze them "
                f"(requires_grad_(False)), or leave them out with exclude=[...]"
            )
        with torch.no_grad():
            for _, p in params:
                g = grads[p].to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        self.last_forward_rows = rows_total
        return torch.tensor(loss_sum / rows_loss)

    def _no_site_error(self) -> ValueError:
        return ValueError(
            f"no site fired during the forward pass of {type(self.model).__name__}: the spec "
            f"{self.spec!r} selected {[s.name for s in self._module_sites.values()] or 'no module'}"
            f" and no selected ulr.perturb mark was reached"
        )

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Generator state and the state of the sampler and baseline (for exact resumption)."""
        return {
            "generator": self.generator.get_state(),
            "generator_device": str(self.generator.device),
            "sampler": self.sampler.state_dict(),
            "baseline": self.baseline.state_dict(),
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

    def __repr__(self) -> str:
        sites = ", ".join(s.name or "<root>" for s in self._module_sites.values())
        return (f"LikelihoodRatio(sites=[{sites}], num_copies={self.num_copies}, "
                f"sampler={self.sampler!r}, baseline={self.baseline!r}, plan={self.plan!r})")
