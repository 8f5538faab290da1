"""Where the names of a :class:`~ulr.train.RunConfig` become objects: the one place.

A method name becomes a gradient estimator (``ulr``, the peers of :mod:`ulr.peers`, and
backprop, which :class:`ulr.peers.Backprop` puts under the same contract), and so do the names
of the model, the dataset, the device, the optimizer, the schedule, the loss, the noise and the
sampler and baseline. A model's recommended noise is translated here once
(:func:`noise_for`), for the estimator and for bp-noise alike. Each random stream of a run
(initial weights, data order, noise, global RNG) is seeded here from ``config.seed``.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import baselines, data, distributed, hybrid, models, plans
from ..estimator import LikelihoodRatio
from ..noise import Gaussian, Laplace, Logistic, Noise, weight_noise
from ..samplers import Sampler, antithetic, iid, sobol
from ..sites import by_name
from . import custom
from .config import STEP_SCHEDULES, ConfigError, RunConfig

__all__ = ["MODEL_DEFAULTS", "build_estimator", "build_model", "model_defaults", "model_record",
           "recommended_noise", "noise_for", "stream_seed"]

_STREAMS = {"init": 1, "data": 2, "noise": 3, "global": 4}
NOISES = {"gaussian": Gaussian, "laplace": Laplace, "logistic": Logistic}
SAMPLERS: dict[str, Callable[[], Sampler]] = {
    "antithetic": antithetic, "iid": iid, "sobol": sobol,
    "antithetic-sobol": lambda: antithetic(sobol())}


#: Config values a built-in model trains with where the user sets none: the best configuration
#: measured for it (each entry cites its measurement). ULR options apply to the methods that
#: read them (see :func:`model_defaults`); the others to every method of the run.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    # docs/results/cnn.md: noise after each conv block's ReLU + max-pool (backprop inside the
    # block) and at the fc layers, 64 antithetic copies per pass, sigma 0.05: 82.7% after one
    # Fashion-MNIST epoch at 15.6x backprop's time (the generic defaults: 71.1% at 16.1x). A
    # constant lr plateaus at 86-87%; a per-step cosine decay over 18 epochs ends near 89% in
    # about 23 minutes on the 2-core CPU (docs/results/cnn-long.md).
    "lenet5": {"sites": ["pool1", "pool2", "fc1", "fc2", "fc3"], "num_copies": 64,
               "sampler": "antithetic", "sigma": 0.05, "schedule": "cosine-steps",
               "epochs": 18},
}


def model_defaults(model: str, method: str, given: Iterable[str]) -> dict[str, Any]:
    """The values of :data:`MODEL_DEFAULTS` that a run of ``method`` on ``model`` takes, the
    user having set the keys ``given``: each key the user did not set, ULR options only for the
    methods that read them (every one for ``ulr``, the noise for ``bp-noise``). ``blocks``
    chooses the sites itself, and ``recommended`` is a whole estimator configuration of its
    own, so either drops the model's estimator values."""
    from .config import ULR_OPTIONS, reads

    given = set(given)
    own_estimator = bool(given & {"blocks", "recommended"})
    return {k: v for k, v in MODEL_DEFAULTS.get(model, {}).items()
            if k not in given and reads(method, k)
            and not (own_estimator and k in ULR_OPTIONS)}


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one random stream of a run (``init``, ``data``, ``noise``, ``global``):
    independent streams, so that e.g. every method starts from the same weights."""
    state = np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def noise_generator(config: RunConfig, device: torch.device) -> torch.Generator:
    """The generator of the run's noise stream (the estimator's, or bp-noise's)."""
    return torch.Generator(device=device).manual_seed(stream_seed(config.seed, "noise"))


@functools.lru_cache(maxsize=1)
def dataset(name: str, root: str | None, seed: int, val_fraction: float) -> data.Dataset:
    """The registry dataset, or the user's (``module:callable``, :mod:`ulr.train.custom`);
    cached so that the runs of one comparison share one copy (datasets are never mutated)."""
    if custom.is_spec(name):
        return custom.load_data(name, seed=seed, val_fraction=val_fraction, data_dir=root)
    return data.load(name, root=root, seed=seed, val_fraction=val_fraction)


def device(name: str) -> torch.device:
    """``config.device`` as a torch device: ``auto`` picks CUDA when there is one; under
    several processes ``cuda`` means this local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but torch sees no CUDA device; use "
                         f"--device cpu (or auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} was requested but torch sees "
                         f"{torch.cuda.device_count()} CUDA device(s): cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if name == "cuda" and distributed.is_distributed():  # one GPU per local rank
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", distributed.rank())))
    return torch.device(name)


def build_model(config: RunConfig, ds: Any = None, *,
                shape: tuple[tuple[int, ...], int] | None = None) -> nn.Module:
    """The model of ``config`` for dataset ``ds`` (or for ``shape = (in_shape, num_outputs)``,
    as :func:`model_record` keeps it), with the run's initial weights (drawn on the CPU from
    the ``init`` stream: the same for every method and device). A ``module:callable`` model is
    the user's (:mod:`ulr.train.custom`)."""
    in_shape, outputs = shape if shape is not None else model_shape(ds)
    torch.manual_seed(stream_seed(config.seed, "init"))
    try:
        if custom.is_spec(config.model):
            return custom.build_model(config.model, config.model_args, in_shape, outputs)
        return models.build(config.model, in_shape=in_shape, num_classes=outputs,
                            **config.model_args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"cannot build model {config.model!r} for dataset {config.data!r} "
                      f"(examples of shape {in_shape}): {e}") from None


def model_shape(ds: Any) -> tuple[tuple[int, ...], int]:
    """``(in_shape, num_outputs)`` of the model for dataset ``ds``."""
    return tuple(ds.input_shape), (ds.num_classes if ds.task != "regression" else 1)


def model_record(config: RunConfig, ds: Any) -> dict[str, Any]:
    """How to rebuild the run's model without its data (kept in checkpoints and the summary):
    the spec and arguments, the shapes it was called with, and for a file its path and
    SHA-256 (so that :func:`ulr.load_run` notices a changed file)."""
    in_shape, outputs = model_shape(ds)
    record: dict[str, Any] = {"model": config.model, "model_args": dict(config.model_args),
                              "in_shape": list(in_shape), "num_outputs": outputs,
                              "cwd": os.getcwd()}
    path = custom.file_of(config.model)
    if path is not None and path.is_file():
        import hashlib

        record.update(file=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    return record


def check_patterns(what: str, patterns: Iterable[str], config: RunConfig,
                   model: nn.Module) -> None:
    """Every module-name pattern of ``what`` (``sites``, ``site_sigma``) must name some module:
    a typo would silently change nothing."""
    names = [n for n, _ in model.named_modules() if n]
    unknown = [p for p in patterns if not fnmatch.filter(names, p)]
    if unknown:
        raise ValueError(f"{what} {unknown} match no module of {config.model}; its modules are "
                         f"{names}")


def recommended_noise(model: nn.Module, make: Callable[[float], Noise], *,
                      weights: bool = True) -> tuple[dict[str, Any], Any]:
    """A model's recommended noise as ``({site: noise}, num_copies)``: output noise of scale
    ``rec["sigma"]``, and (``weights=True``) weight noise of scale ``rec["weight_sigma"]``."""
    rec = models.recommended_config(model)
    noise: dict[str, Any] = {n: make(s) for n, s in rec["sigma"].items()}
    if weights:
        noise.update({n: weight_noise(make(s)) for n, s in rec.get("weight_sigma", {}).items()
                      if n not in noise})
    return noise, rec["num_copies"]


def noise_for(config: RunConfig, model: nn.Module, *, weights: bool = True) -> tuple[Any, Any]:
    """``(noise, num_copies)`` of the run's sites: the first matching pattern of
    ``site_sigma``, then (``recommended``) the model's per-layer scales, then ``sigma``; one
    noise object when nothing is per-site. ``num_copies`` is the recommended per-layer count
    (``None``: ``config.num_copies``)."""
    cls = NOISES[config.noise]
    check_patterns("site_sigma patterns", config.site_sigma, config, model)
    noise: dict[str, Any] = {p: cls(s) for p, s in config.site_sigma.items()}
    copies = None
    if config.recommended:
        rec, copies = recommended_noise(model, cls, weights=weights)
        noise.update({n: z for n, z in rec.items() if n not in noise})
    return ({**noise, "*": cls(config.sigma)} if noise else cls(config.sigma)), copies


def baseline(config: RunConfig) -> baselines.Baseline:
    """The control variate named by ``config.baseline``."""
    return {
        "none": baselines.none,
        "leave-one-out": baselines.leave_one_out,
        "clean": baselines.clean,
        "running-average": lambda: baselines.running_average(config.baseline_decay),
    }[config.baseline]()


def check_estimator(config: RunConfig) -> None:
    """Judge the ULR options of ``config`` by the library's own checks: build the estimator's
    memory mode, sampler and baseline on a stand-in model.

    Raises:
        ConfigError: the library's message, after the config keys it is about.
    """
    sampler, base, k = SAMPLERS[config.sampler](), baseline(config), config.num_copies
    checks: list[tuple[tuple[str, ...], Callable[[], Any]]] = [
        (("memory", "chunk_size", "workers"), lambda: LikelihoodRatio(
            # skip_init: a stand-in that draws nothing from the caller's global RNG
            nn.utils.skip_init(nn.Linear, 1, 1), num_copies=2, generator=torch.Generator(),
            memory=config.memory,  # type: ignore[arg-type]
            chunk_size=config.chunk_size if config.memory == "chunked" else None,
            workers=config.workers)),
        (("sampler", "num_copies"), lambda: sampler.check_num_copies(k)),
        (("baseline", "sampler", "num_copies"), lambda: base.check(k, sampler.copy_groups(k))),
    ]
    for keys, check in checks:
        try:
            check()
        except (TypeError, ValueError) as e:
            values = config.to_dict()
            named = ", ".join(f"{key}={values[key]!r}" for key in keys)
            raise ConfigError(f"{named}: {e}") from None


def is_backprop(config: RunConfig) -> bool:
    """Whether the run's gradients are backprop's: ``bp``, ``bp-noise``, or ``ulr`` with
    ``blocks=0`` (no noise site)."""
    return config.method in ("bp", "bp-noise") or (config.method == "ulr" and config.blocks == 0)


def build_estimator(config: RunConfig, model: nn.Module, device: torch.device,
                    replicate: Callable[..., Any] | None = None) -> Any:
    """The gradient estimator of ``config.method``: every method, backprop included, writes
    ``p.grad`` through ``loss_and_grads``. ``replicate`` makes the noise copies of inputs
    that are not a plain batch (a graph)."""
    from .. import peers

    if is_backprop(config):
        return ShardedBackprop(model) if distributed.is_distributed() else peers.Backprop(model)
    generator = noise_generator(config, device)
    if config.method != "ulr":
        if distributed.is_distributed():
            raise ValueError(f"method {config.method!r} runs in one process; several processes "
                             f"(--nproc, torchrun) train ulr and bp")
        try:
            return peers.build(config.method, model, generator=generator, **config.method_args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"method {config.method!r}, method_args "
                             f"{config.method_args}: {e}") from None
    # A weight-noise site yields only its own layer's gradient, so block ends of hybrid runs
    # (--blocks) take output noise there.
    noise, copies = noise_for(config, model, weights=config.blocks is None)
    plan = plans.layerwise(num_copies=copies) if config.plan == "layerwise" else plans.all_sites()
    check_patterns("sites", config.sites or [], config, model)
    sites = None if config.sites is None else by_name(*config.sites)
    if config.blocks is not None:
        sites = hybrid.blocks(model, config.blocks)
    # Several processes: every rank draws the same noise stream and runs its share of copies.
    cls, extra = ((distributed.DistributedLikelihoodRatio, {"exchange": config.exchange})
                  if distributed.is_distributed() else (LikelihoodRatio, {}))
    return cls(model, sites=sites, noise=noise, num_copies=config.num_copies,
               sampler=SAMPLERS[config.sampler](), baseline=baseline(config), plan=plan,
               generator=generator, memory=config.memory,
               chunk_size=config.chunk_size if config.memory == "chunked" else None,
               replicate=replicate, workers=config.workers, **extra)


class ShardedBackprop:
    """Backprop over several processes, under the estimator contract: each rank takes its share
    of the batch, and one all-reduce sums the gradients of the mean over the whole batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.last_forward_rows = 0
        self.last_bytes_sent = 0

    def loss_and_grads(self, loss_fn: Callable[..., Tensor], inputs: Tensor,
                       targets: Tensor) -> Tensor:
        r, n = distributed.rank(), distributed.world_size()
        b0, b1 = len(inputs) * r // n, len(inputs) * (r + 1) // n
        part = loss_fn(self.model(inputs[b0:b1]), targets[b0:b1]).sum() / len(inputs)
        part.backward()
        sent = distributed.all_reduce_grads(self.params)
        loss = part.detach().double().reshape(1)
        torch.distributed.all_reduce(loss)
        self.last_forward_rows, self.last_bytes_sent = b1 - b0, sent + loss.element_size()
        return loss[0]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore."""

    def __repr__(self) -> str:
        return "Backprop()"


def optimizer(config: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer named by ``config.optimizer``."""
    lr, wd = config.resolved_lr, config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def scheduler(config: RunConfig, opt: torch.optim.Optimizer,
              steps_per_epoch: int = 1) -> Any:
    """The learning-rate schedule named by ``config.schedule`` (``None``: constant); the loop
    steps it once per epoch, or once per optimizer step when :func:`per_step` says so."""
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, config.step_size, config.gamma)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    if not per_step(config):
        return None
    warm, total = config.warmup_steps, config.epochs * steps_per_epoch
    decay = config.schedule

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if decay == "none":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine-steps" else 1.0 - t

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def per_step(config: RunConfig) -> bool:
    """Whether the run's schedule is stepped after every optimizer step (a per-step decay, or
    a warmup)."""
    return config.schedule in STEP_SCHEDULES or (config.schedule == "none"
                                                 and config.warmup_steps > 0)


def row_loss(task: str) -> Callable[[Tensor, Any], Tensor]:
    """The per-row loss of a task: cross-entropy, the masked node loss, or squared error."""
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    if task == "node-classification":
        return masked_node_loss
    return lambda out, y: (out.reshape(out.shape[0], -1)[:, 0] - y).square()


def training_loss(config: RunConfig, task: str) -> Callable[[Tensor, Any], Tensor]:
    """The per-row loss that ``config.loss`` trains on for a dataset of kind ``task``."""
    if config.loss == "zero-one":
        if task != "classification":
            raise ValueError(
                f"loss 'zero-one' is the error of a classifier, but dataset {config.data!r} is "
                f"a {task} task; use loss 'auto' (its own loss) or a classification dataset "
                f"such as digits")
        from ..models.binary import zero_one_loss

        return zero_one_loss
    return row_loss(task)


def masked_node_loss(out: Tensor, targets: tuple[Tensor, Tensor]) -> Tensor:
    """Per-node cross-entropy of one graph, zero off the mask and scaled by ``N / |mask|`` so
    that its mean over the ``N`` rows is the mean loss of the selected nodes."""
    y, mask = targets
    m = mask.to(out.dtype)
    return F.cross_entropy(out, y, reduction="none") * m * (len(m) / m.sum().clamp(min=1))
