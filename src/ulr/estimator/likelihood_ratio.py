"""The likelihood-ratio estimator, :class:`LikelihoodRatio`: its configuration, its state, and
the hooks a variant (e.g. :class:`ulr.distributed.DistributedLikelihoodRatio`) overrides. The
work of a step is done by the modules beside this one (see :mod:`ulr.estimator`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..baselines import Baseline, leave_one_out, none
from ..contract import (
    check_finite,
    check_model,
    check_positive_int,
    generator_state,
    load_generator_state,
    make_generator,
    trainable,
)
from ..noise import Noise, WeightNoise
from ..parallel import Assembler
from ..plans import Pass, Plan, layerwise
from ..samplers import Sampler, iid
from ..sites import SiteSpec, as_spec
from . import step
from .memory import MODES, PassMode
from .noise_stream import NoiseStream
from .probe import Probe
from .site_table import NoiseArg, SiteTable
from .trees import check_batch, tensors

__all__ = ["LikelihoodRatio", "Memory"]

Memory = Literal["store", "chunked", "replay"]


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

    #: Whether the loss weights of every pass wait for the step's last pass (one exchange of
    #: losses per step): set by a variant whose weights need other processes' losses.
    _one_exchange_per_step = False

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
        _check_args(model, num_copies, sampler, baseline, plan, generator, noise, replicate,
                    memory, chunk_size, workers)
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
        #: the memory mode's pass function, chosen once (see :mod:`ulr.estimator.memory`)
        self._pass_mode: PassMode = MODES[memory]
        self.sampler.check_num_copies(num_copies)
        self.baseline.check(num_copies, self.sampler.copy_groups(num_copies))
        trainable(model, self.exclude, required=False)  # refuse a pattern that matches nothing
        self.sites = SiteTable(model, self.spec, noise)
        self.probe = Probe(needs_grad=not self.sites.closed_form_covers(
            [p for _, p in self._trainable()]))
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.noise_stream = NoiseStream(make_generator(generator, device), self.sampler,
                                        own=generator is None)
        self._site_names: list[str] | None = None
        #: passes (keys) whose automatic shared prefix failed: they tile the inputs instead
        self._no_prefix: set[str] = set()
        self._fired: set[str] = set()
        #: Forward rows (examples × copies, summed over passes and sweeps) of the last call.
        self.last_forward_rows = 0

    @property
    def generator(self) -> torch.Generator:
        """The only source of the estimator's randomness."""
        return self.noise_stream.generator

    @generator.setter
    def generator(self, generator: torch.Generator) -> None:
        self.noise_stream.generator = generator

    @property
    def _module_sites(self) -> dict[nn.Module, Any]:  # read by older callers
        return self.sites.modules

    def noises(self) -> list[Noise]:
        """Every noise this estimator uses: those of its sites (the marks met so far) and the
        default ``noise=`` when it is a :class:`ulr.Noise` (for :class:`ulr.NoiseSchedule`)."""
        found = [s.noise for s in self.sites.all()]
        if isinstance(self.noise, Noise):
            found.append(self.noise)
        return found

    def noise_parameters(self) -> list[nn.Parameter]:
        """Learnable noise scales (``ln σ``) of the sites seen so far, for an optimizer."""
        seen: dict[int, nn.Parameter] = {}
        for s in self.sites.all():
            for p in s.noise.parameters():
                seen[id(p)] = p
        return list(seen.values())

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return trainable(self.model, self.exclude, required=False)

    def _watched_ids(self) -> set[int]:
        return {id(p) for _, p in self._trainable()}

    def _shares_prefix(self, plan_pass: Pass) -> bool:
        """Whether ``plan_pass`` runs its noise-free prefix on the ``B`` examples."""
        if plan_pass.num_copies == 1:
            return False
        if plan_pass.cache_prefix is None:
            # On for any model with plain batch inputs: a model that combines a value from
            # before the first perturbed site with one after it fails on the row counts, and
            # that pass then runs (and keeps running) on tiled inputs (see forward.run_forward).
            return self._replicate_inputs is None and plan_pass.key not in self._no_prefix
        if plan_pass.cache_prefix and self._replicate_inputs is not None:
            raise ValueError("cache_prefix=True cannot be combined with a custom replicate=; "
                             "use cache_prefix=False")
        return plan_pass.cache_prefix

    def _no_site_error(self) -> ValueError:
        return ValueError(
            f"no site fired during the forward pass of {type(self.model).__name__}: the spec "
            f"{self.spec!r} selected {[s.name for s in self.sites.modules.values()] or 'no module'}"
            f" and no selected ulr.perturb mark was reached"
        )

    # -- hooks for a variant that splits the copies over processes -------------------------------
    def _owned_copies(self, num_copies: int) -> tuple[int, int]:
        """The copies ``[k0, k1)`` of a pass of ``num_copies`` that this process runs."""
        return 0, num_copies

    def _gather_losses(self, parts: list[tuple[tuple[int, int], Tensor]],
                       num_copies: list[int]) -> list[tuple[tuple[int, int], Tensor]]:
        """The losses of these passes' copies ``parts = [(copies, losses)]`` (of passes of
        ``num_copies`` copies) -> the losses the weights are computed from, with their copies;
        refuses non-finite losses. Here: the same."""
        for _, losses in parts:
            check_finite(losses)
        return parts

    def _finish_grads(self, grads: dict[Tensor, Tensor]) -> None:
        """Called with the step's gradients before they are written to ``.grad``."""

    # -- the estimate ----------------------------------------------------------------------------
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
        found = (tensors(targets) if custom else []) or tensors(inputs)
        if not found:
            raise ValueError("inputs must contain at least one batch-first tensor")
        batch = found[0].shape[0]
        if batch == 0:
            raise ValueError("the batch is empty (0 rows): there is nothing to estimate a "
                             "gradient from; skip empty batches (e.g. DataLoader(..., "
                             "drop_last=True)). Nothing was written to .grad")
        if not custom:
            check_batch(inputs, batch, "inputs")
        check_batch(targets, batch, "targets")
        return step.run_step(self, loss_fn, inputs, targets, batch)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Generator, sampler and baseline state, learnable noise scales and the site names a
        layer-wise plan has learnt (for exact resumption)."""
        return {
            **generator_state(self.generator),
            "sampler": self.sampler.state_dict(),
            "baseline": self.baseline.state_dict(),
            "noise": {s.name: s.noise.log_scale.detach().clone() for s in self.sites.all()
                      if s.noise.learnable},
            "site_names": None if self._site_names is None else list(self._site_names),
            # what the first call's clean pass learnt: a resumed run need not probe again
            "probe": self.probe.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {"generator", "sampler", "baseline"} - set(state)
        if missing:
            raise ValueError(f"estimator state is missing {sorted(missing)}; was it saved by "
                             f"LikelihoodRatio.state_dict()?")
        self.generator = load_generator_state(self.generator, state, "LikelihoodRatio")
        self.sampler.load_state_dict(state["sampler"])
        self.baseline.load_state_dict(state["baseline"])
        names = state.get("site_names")
        self._site_names = None if names is None else list(names)
        # an older checkpoint without a probe (or without site names): probe at the next call
        self.probe.load_state_dict(state.get("probe") if names is not None else None)
        for name, value in state.get("noise", {}).items():
            site = self.sites.by_name(name)
            if site is None or not site.noise.learnable:
                raise ValueError(f"estimator state has a learnable noise scale for site "
                                 f"{name!r}, which has no learnable noise here")
            with torch.no_grad():
                site.noise.log_scale.copy_(value)

    def __repr__(self) -> str:
        sites = ", ".join(s.name or "<root>" for s in self.sites.modules.values())
        return (f"LikelihoodRatio(sites=[{sites}], num_copies={self.num_copies}, "
                f"sampler={self.sampler!r}, baseline={self.baseline!r}, plan={self.plan!r}, "
                f"memory={self.memory!r}" + (f", workers={self.workers}" if self.workers else "")
                + ")")


def _check_args(model: Any, num_copies: Any, sampler: Any, baseline: Any, plan: Any,
                generator: Any, noise: Any, replicate: Any, memory: Any, chunk_size: Any,
                workers: Any) -> None:
    """Refuse bad constructor arguments, each with the fix."""
    check_model(model)
    check_positive_int("num_copies", num_copies)
    for arg, cls, what in ((sampler, Sampler, "a Sampler such as ulr.iid()/ulr.antithetic()"),
                           (baseline, Baseline, "a Baseline (a ulr.transforms.Transform) such "
                                                "as ulr.baselines.leave_one_out()"),
                           (plan, Plan, "a Plan such as ulr.plans.all_sites()/layerwise()")):
        if arg is not None and not isinstance(arg, cls):
            raise TypeError(f"expected {what}, got {arg!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {generator!r}")
    if not (noise is None or isinstance(noise, (Noise, WeightNoise, Mapping)) or callable(noise)):
        raise TypeError(f"noise must be a ulr.Noise, a mapping or a callable, got {noise!r}")
    if replicate is not None and not callable(replicate):
        raise TypeError(f"replicate must be a callable (inputs, num_copies), got {replicate!r}")
    if memory not in MODES:
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

