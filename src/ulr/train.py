"""The training loop behind ``ulr train``: one :class:`~ulr.config.RunConfig` -> one run.

:func:`fit` trains a reference model on a registry dataset with the likelihood-ratio estimator
(``method="ulr"``), with backpropagation (``method="bp"``), with backpropagation through the
ULR training noise (``method="bp-noise"``) or with a peer estimator of :mod:`ulr.peers`
(``"es"``, ``"spsa"``, ``"forward-gradient"``), evaluates it every epoch and,
given a run directory, records everything needed to analyse and continue the run:

``config.toml`` / ``config.json``
    the fully resolved config (``ulr train --config DIR/config.toml`` reruns it).
``metrics.jsonl``
    one JSON object per line, told apart by ``kind``: ``"start"`` (versions, device, threads),
    ``"step"`` (step, epoch, loss, acc, lr, samples_per_s, forward_rows, forward_passes),
    ``"diag"`` (per-layer ``cosine`` and ``norm_ratio`` of the ULR gradient against backprop)
    and ``"epoch"`` (train/val/test loss and accuracy, wall and train time, cumulative forward
    rows, peak memory). ``acc`` and ``train_acc`` of a ULR or peer run are measured on the
    rows it evaluates (noisy rows, perturbed weights).
``checkpoint.pt``
    replaced atomically after every epoch (and at ``max_steps``): model, optimizer, scheduler,
    estimator state, data-order generator, global RNG, counters and the epoch history.
``summary.json``
    written when the run finishes: final and best metrics, time, forward rows, peak memory,
    versions and platform.

Randomness comes from four generators, each seeded from its own stream of ``config.seed``: the
initial weights (the same for every method), the data order, the estimator's noise and the
global RNG (for modules that draw from it, such as dropout; the caller's global RNG state is
restored afterwards). The last three are checkpointed with the weights, so a resumed run
continues bit-identically on the same device and thread count: 1 epoch + resume to 2 epochs
gives the metrics and weights of 2 epochs straight.

Example:
    >>> from ulr.config import RunConfig
    >>> from ulr.train import fit
    >>> summary = fit(RunConfig(epochs=1, max_steps=2, threads=1))   # no run directory
    >>> summary["steps"]
    2
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__, baselines, data, distributed, hybrid, models, plans
from .config import RunConfig, to_toml
from .estimator import LikelihoodRatio
from .noise import Gaussian, Laplace, Logistic, weight_noise
from .samplers import antithetic, iid, sobol
from .sites import by_name

__all__ = [
    "Callback",
    "CheckpointError",
    "ConsoleProgress",
    "TrainingInterrupted",
    "RESUMABLE",
    "environment",
    "fit",
    "format_table",
    "resume_config",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG_JSON = "config.json"
CONFIG_TOML = "config.toml"
#: the weights at the epoch of best validation score (accuracy, or loss for regression)
BEST = "best.pt"
#: the epoch rows of metrics.jsonl as a table, for spreadsheets and pandas
METRICS_CSV = "metrics.csv"
_FORMAT = "ulr-run-checkpoint"
_FORMAT_VERSION = 1

#: Config fields that ``--resume`` may change; any other change makes a different run.
RESUMABLE = ("epochs", "max_steps", "threads", "diag_every", "eval_batch_size", "workers",
             "log_every", "checkpoint_every", "early_stop")
#: seconds of training between checkpoints inside an epoch when checkpoint_every is not set
CHECKPOINT_SECONDS = 600.0

#: Datasets that ``ulr train`` is tested with (others of the same kind work too).
_TRAINABLE = ("digits", "mnist-subset", "fashion-mnist", "mnist1d", "adding", "sequential-digits",
              "karate", "sbm")
#: What ``ulr train`` trains: batches of (x, y) examples, or one graph's nodes.
_TASKS = ("classification", "regression", "node-classification")
_STREAMS = {"init": 1, "data": 2, "noise": 3, "global": 4}
_NOISES = {"gaussian": Gaussian, "laplace": Laplace, "logistic": Logistic}


def _lock_run_dir(run_dir: Path, stack: contextlib.ExitStack) -> None:
    """Own ``run_dir`` until ``stack`` closes: an exclusive, non-blocking ``flock`` on the
    directory itself (no file is left behind), so that a second run or ``--resume`` of the
    same directory stops before it writes anything (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(
            f"run directory {run_dir} is in use by another ulr process; nothing was changed. "
            f"Wait for it to finish, or choose another --out") from None
    stack.callback(os.close, fd)  # closing the descriptor releases the lock


class CheckpointError(RuntimeError):
    """A run directory cannot be resumed (missing, corrupt or mismatched checkpoint) or would
    be overwritten. Nothing in the directory has been changed when this is raised."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`; the run directory holds the last checkpoint.

    Attributes:
        run_dir: the run directory (``None`` for a run without one).
        epoch: completed epochs in the checkpoint.
        step: optimizer steps in the checkpoint.
    """

    def __init__(self, run_dir: Path | None, epoch: int, step: int) -> None:
        self.run_dir, self.epoch, self.step = run_dir, epoch, step
        where = (f"{run_dir} holds the checkpoint after epoch {epoch} (step {step}); continue "
                 f"with: ulr train --resume {run_dir}" if run_dir is not None
                 else "the run had no directory, so nothing was saved")
        super().__init__(f"training interrupted; {where}")


class Callback:
    """Hooks called by :func:`fit`; override the ones you need. Rows are the dicts written to
    ``metrics.jsonl`` (see the module docstring)."""

    def on_train_start(self, info: dict[str, Any]) -> None:
        """Before the first step. ``info``: config, label, steps_per_epoch, total_steps,
        start_step, start_epoch, num_params, environment, run_dir."""

    def on_epoch_start(self, epoch: int, num_steps: int) -> None:
        """Before epoch ``epoch`` (1-based) of ``num_steps`` steps (fewer after a resume)."""

    def on_step(self, row: dict[str, Any]) -> None:
        """After each optimizer step."""

    def on_diag(self, row: dict[str, Any]) -> None:
        """After each gradient diagnostic."""

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        """After each evaluation (``row["partial"]`` when ``max_steps`` ended an epoch)."""

    def on_train_end(self, summary: dict[str, Any]) -> None:
        """After the run, with the summary that :func:`fit` returns."""


# ---------------------------------------------------------------------------------------------
# Building the pieces of a run


def _stream_seed(seed: int, stream: str) -> int:
    state = np.random.SeedSequence([seed, _STREAMS[stream]]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


@functools.lru_cache(maxsize=1)
def _dataset(name: str, root: str | None, seed: int, val_fraction: float) -> data.Dataset:
    # Cached so that the runs of one comparison share one copy (datasets are never mutated).
    return data.load(name, root=root, seed=seed, val_fraction=val_fraction)


def _device(name: str) -> torch.device:
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


def _build_model(config: RunConfig, ds: Any) -> nn.Module:
    outputs = ds.num_classes if ds.task != "regression" else 1
    # Initialised on the CPU from its own stream: the same weights for every method and device.
    torch.manual_seed(_stream_seed(config.seed, "init"))
    try:
        return models.build(config.model, in_shape=ds.input_shape, num_classes=outputs,
                            **config.model_args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"cannot build model {config.model!r} for dataset {config.data!r} "
                      f"(examples of shape {ds.input_shape}): {e}") from None


def _estimator(config: RunConfig, model: nn.Module, device: torch.device,
               replicate: Callable[..., Any] | None = None) -> Any:
    """The gradient estimator of ``config.method`` (``None`` for plain backprop);
    ``replicate`` makes the noise copies of inputs that are not a plain batch (a graph)."""
    if config.method in ("bp", "bp-noise"):
        return None
    generator = torch.Generator(device=device).manual_seed(_stream_seed(config.seed, "noise"))
    if config.method != "ulr":
        if distributed.is_distributed():
            raise ValueError(f"method {config.method!r} runs in one process; several processes "
                             f"(--nproc, torchrun) train ulr and bp")
        from . import peers

        try:
            return peers.build(config.method, model, generator=generator, **config.method_args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"method {config.method!r}, method_args "
                             f"{config.method_args}: {e}") from None
    cls = _NOISES[config.noise]
    _check_patterns("site_sigma patterns", config.site_sigma, config, model)
    # The noise mapping takes the first matching pattern: --site-sigma, then the recommended
    # per-layer scales, then --sigma.
    noise: Any = {p: cls(s) for p, s in config.site_sigma.items()}
    copies = None
    if config.recommended:
        rec = models.recommended_config(model)
        # A weight-noise site yields only its own layer's gradient, so block ends of hybrid
        # runs (--blocks) take output noise there.
        weights = {} if config.blocks is not None else rec.get("weight_sigma", {})
        noise.update({n: cls(s) for n, s in rec["sigma"].items() if n not in noise})
        noise.update({n: weight_noise(cls(s)) for n, s in weights.items() if n not in noise})
        copies = rec["num_copies"]
    noise = {**noise, "*": cls(config.sigma)} if noise else cls(config.sigma)
    baseline = {
        "none": baselines.none,
        "leave-one-out": baselines.leave_one_out,
        "clean": baselines.clean,
        "running-average": lambda: baselines.running_average(config.baseline_decay),
    }[config.baseline]()
    plan = plans.layerwise(num_copies=copies) if config.plan == "layerwise" else plans.all_sites()
    _check_patterns("sites", config.sites or [], config, model)
    sites = None if config.sites is None else by_name(*config.sites)
    if config.blocks is not None:
        sites = hybrid.blocks(model, config.blocks)
    # Several processes: every rank draws the same noise stream and runs its share of copies.
    cls, extra = ((distributed.DistributedLikelihoodRatio, {"exchange": config.exchange})
                  if distributed.is_distributed() else (LikelihoodRatio, {}))
    return cls(
        model,
        sites=sites,
        noise=noise,
        num_copies=config.num_copies,
        sampler={"antithetic": antithetic, "iid": iid, "sobol": sobol,
                 "antithetic-sobol": lambda: antithetic(sobol())}[config.sampler](),
        baseline=baseline,
        plan=plan,
        generator=generator,
        memory=config.memory,
        chunk_size=config.chunk_size if config.memory == "chunked" else None,
        replicate=replicate,
        workers=config.workers,
        **extra,
    )


def _check_patterns(what: str, patterns: Iterable[str], config: RunConfig,
                    model: nn.Module) -> None:
    """Every module-name pattern of ``what`` (``sites``, ``site_sigma``) must name some module:
    a typo would silently change nothing."""
    names = [n for n, _ in model.named_modules() if n]
    unknown = [p for p in patterns if not fnmatch.filter(names, p)]
    if unknown:
        raise ValueError(f"{what} {unknown} match no module of {config.model}; its modules are "
                         f"{names}")


def _site_sigma(config: RunConfig, name: str, fallback: float) -> float:
    """The noise scale of site ``name``: its first matching ``site_sigma`` pattern, else
    ``fallback``."""
    return next((s for p, s in config.site_sigma.items() if fnmatch.fnmatchcase(name, p)),
                fallback)


class _NoiseInjection:
    """``method="bp-noise"``: the ULR training noise added to the site outputs of every
    training-mode forward pass, which backprop then differentiates.

    The sites and noise are the estimator's (``config.sites`` or every module that owns a
    parameter; ``config.noise`` with ``config.site_sigma``, then the model's recommended
    per-layer sigma with ``config.recommended``, then ``config.sigma``); all sites get noise at
    once, one draw per example and step
    (the all-sites smoothed loss that ULR estimates the gradient of, at the cost of one forward).
    Evaluation (``model.eval()``) is noise-free. The draws come from the run's noise stream and
    are checkpointed with it.
    """

    def __init__(self, config: RunConfig, model: nn.Module, device: torch.device) -> None:
        cls = _NOISES[config.noise]
        per_layer: dict[str, float] = {}
        if config.recommended:
            rec = models.recommended_config(model)
            if rec.get("weight_sigma"):
                raise ValueError(
                    f"method 'bp-noise' adds output noise only, but the recommended config of "
                    f"{config.model} puts weight noise on {sorted(rec['weight_sigma'])}; drop "
                    f"--recommended (one --sigma everywhere) for bp-noise")
            per_layer = dict(rec["sigma"])
        modules = dict(model.named_modules())
        _check_patterns("sites", config.sites or [], config, model)
        _check_patterns("site_sigma patterns", config.site_sigma, config, model)
        if config.sites is not None:
            names = [n for n in modules if n and any(fnmatch.fnmatch(n, p) for p in config.sites)]
        else:
            names = [n for n, m in modules.items()
                     if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.noises = {n: cls(_site_sigma(config, n, per_layer.get(n, config.sigma)))
                       for n in names}
        self.generator = torch.Generator(device=device).manual_seed(
            _stream_seed(config.seed, "noise"))
        self.handles = [modules[n].register_forward_hook(self._hook(self.noises[n]))
                        for n in names]

    def _hook(self, noise: Any) -> Callable[..., Tensor]:
        def add_noise(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            if not module.training:
                return out
            z = noise.sample(out.shape, generator=self.generator, device=out.device,
                             dtype=out.dtype)
            return out + z

        return add_noise

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _optimizer(config: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    lr, wd = config.resolved_lr, config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def _scheduler(config: RunConfig, opt: torch.optim.Optimizer) -> Any:
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, config.step_size, config.gamma)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    return None


def _row_loss(task: str) -> Callable[[Tensor, Any], Tensor]:
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    if task == "node-classification":
        return _masked_node_loss
    return lambda out, y: (out.reshape(out.shape[0], -1)[:, 0] - y).square()


def _training_loss(config: RunConfig, task: str) -> Callable[[Tensor, Any], Tensor]:
    """The per-row loss that ``config.loss`` trains on for a dataset of kind ``task``."""
    if config.loss == "zero-one":
        if task != "classification":
            raise ValueError(
                f"loss 'zero-one' is the error of a classifier, but dataset {config.data!r} is "
                f"a {task} task; use loss 'auto' (its own loss) or a classification dataset "
                f"such as digits")
        from .models.binary import zero_one_loss

        return zero_one_loss
    return _row_loss(task)


def _masked_node_loss(out: Tensor, targets: tuple[Tensor, Tensor]) -> Tensor:
    """Per-node cross-entropy of one graph, zero off the mask and scaled by ``N / |mask|`` so
    that its mean over the ``N`` rows is the mean loss of the selected nodes."""
    y, mask = targets
    m = mask.to(out.dtype)
    return F.cross_entropy(out, y, reduction="none") * m * (len(m) / m.sum().clamp(min=1))


def _call(model: nn.Module, inputs: Any) -> Tensor:
    """``model(inputs)``, or ``model(*inputs)`` for a tuple such as a graph's (x, adjacency)."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _num_rows(inputs: Any) -> int:
    return len(inputs[0]) if isinstance(inputs, tuple) else len(inputs)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj.to(device)


class _Counting:
    """Wraps the per-row loss to count correct predictions of the rows it sees (free accuracy:
    for ULR these are the noisy rows)."""

    def __init__(self, loss: Callable[[Tensor, Any], Tensor], classification: bool) -> None:
        self.loss, self.classification = loss, classification
        self.correct = self.rows = 0
        self.node_loss_sum = 0.0

    def __call__(self, out: Tensor, y: Any) -> Tensor:
        if self.classification:
            if isinstance(y, tuple):  # (labels, mask) of a graph: the selected nodes count
                labels, mask = y
                self.correct += int(((out.argmax(1) == labels) & mask).sum())
                self.rows += int(mask.sum())
                self.node_loss_sum += float(
                    F.cross_entropy(out.detach()[mask], labels[mask], reduction="sum"))
            else:
                self.correct += int((out.argmax(1) == y).sum())
                self.rows += y.shape[0]
        return self.loss(out, y)

    def take(self) -> tuple[int, int]:
        """(correct, rows) since the last call."""
        counts = self.correct, self.rows
        self.correct = self.rows = 0
        return counts

    def take_node_loss(self) -> float | None:
        """Mean loss of the selected nodes seen since the last call (graphs), else None."""
        mean = self.node_loss_sum / self.rows if self.rows else None
        self.node_loss_sum = 0.0
        return mean


@torch.no_grad()
def _evaluate(model: nn.Module, split: tuple[Any, Any], task: str,
              batch_size: int) -> tuple[float | None, float | None]:
    """(mean loss, accuracy) on a split; accuracy is None for regression, both None if empty.
    A graph is evaluated whole, on the nodes its split's mask selects."""
    x, y = split
    if task == "node-classification":
        labels, mask = y
        if not mask.any():
            return None, None
        model.eval()
        try:
            out = _call(model, x)
        finally:
            model.train()
        loss = F.cross_entropy(out[mask], labels[mask])
        return float(loss), float((out[mask].argmax(1) == labels[mask]).double().mean())
    if len(x) == 0:
        return None, None
    loss_fn = _row_loss(task)
    model.eval()
    try:
        total, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            out = model(x[start:start + batch_size])
            yb = y[start:start + batch_size]
            total += float(loss_fn(out, yb).double().sum())
            if task == "classification":
                correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train()
    return total / len(x), (correct / len(x) if task == "classification" else None)


def _layer_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0] or name, []).append(p)
    return groups


def _diagnose(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor,
              y: Tensor, rng_devices: list[int]) -> tuple[dict, dict, float | None]:
    """Cosine and norm ratio of ``p.grad`` (the estimate) against backprop, per layer.

    Backprop uses ``torch.autograd.grad``, so ``p.grad`` is left as it is; the global RNG is
    forked so that modules drawing from it leave the training stream untouched.
    """
    groups = _layer_groups(model)
    params = [p for ps in groups.values() for p in ps]
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
        loss = loss_fn(_call(model, x), y).mean()
        exact = torch.autograd.grad(loss, params, allow_unused=True)
    bp = {p: (g if g is not None else torch.zeros_like(p)) for p, g in zip(params, exact)}

    def flat(ps: list[nn.Parameter], est: bool) -> Tensor:
        return torch.cat([(p.grad if est else bp[p]).detach().double().flatten()
                          if not est or p.grad is not None
                          else torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
                          for p in ps])

    def cosine(u: Tensor, v: Tensor) -> float | None:
        nu, nv = float(u.norm()), float(v.norm())
        if nu == 0 or nv == 0:
            return None
        return max(-1.0, min(1.0, float(u @ v) / (nu * nv)))

    cos, ratio = {}, {}
    for layer, ps in groups.items():
        u, v = flat(ps, True), flat(ps, False)
        cos[layer] = cosine(u, v)
        nv = float(v.norm())
        ratio[layer] = float(u.norm()) / nv if nv > 0 else None
    overall = cosine(flat(params, True), flat(params, False))
    return cos, ratio, overall


# ---------------------------------------------------------------------------------------------
# Memory, environment and files


class _MemoryMonitor:
    """Peak resident memory (MB) of this process while a run is active.

    A daemon thread samples the current RSS every ``interval`` seconds, so the peak belongs to
    this run even when several runs share the process (the kernel's own high-water mark only
    grows); peaks shorter than the interval can be missed. Without /proc (macOS, Windows) it
    falls back to the process-lifetime peak from ``getrusage``.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0
        self._fd: int | None = None

    def _current(self) -> float:
        # pread has no shared file offset, so the sampling thread and sample() never interfere.
        return int(os.pread(self._fd, 256, 0).split()[1]) * self._page_mb

    def sample(self) -> float | None:
        """Update and return the peak so far."""
        if self._fd is None:
            return _lifetime_peak_rss_mb()
        self.peak = max(self.peak, self._current())
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self._current())
            except (OSError, ValueError, IndexError):
                return

    def __enter__(self) -> _MemoryMonitor:
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
            self.sample()
        except (OSError, ValueError, IndexError, AttributeError):
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
        if self._fd is not None:
            self._thread = threading.Thread(target=self._run, name="ulr-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._fd is not None:
            self.sample()
            os.close(self._fd)
            self._fd = None


def _lifetime_peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions and platform of this process (no hostname or user name)."""
    device = torch.device(device)
    env = {
        "ulr": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            # A run killed mid-write leaves a truncated last line: skip what does not parse.
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The config stored in a run directory, with ``overrides`` applied (for ``--resume``).

    Raises:
        CheckpointError: the directory has no readable ``config.json``.
    """
    path = Path(run_dir) / CONFIG_JSON
    try:
        stored = json.loads(path.read_text())
        config = RunConfig.from_dict(stored, source=str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot resume {run_dir}: {path} is missing or unreadable ({e}); "
                              f"is it a run directory written by ulr train?") from None
    return config.replace(**overrides) if overrides else config


def _config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} -> {db[k]!r}" for k in da if k not in RESUMABLE and da[k] != db[k]]


def _load_checkpoint(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: it has no {CHECKPOINT}; start a new run "
                              f"(without --resume) or pass the directory of an earlier run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"cannot resume {run_dir}: {path} is corrupt or unreadable ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); nothing was changed. Start a new run "
            f"with another --out"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise CheckpointError(f"cannot resume {run_dir}: {path} is not a ulr train checkpoint; "
                              f"nothing was changed")
    if ckpt.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(f"cannot resume {run_dir}: checkpoint format version "
                              f"{ckpt.get('format_version')} is not {_FORMAT_VERSION}")
    try:
        saved = RunConfig.from_dict(ckpt["config"], source=f"{path} config")
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot resume {run_dir}: the checkpoint's config is invalid "
                              f"({e}); nothing was changed") from None
    diff = _config_diff(saved, config)
    if diff:
        raise CheckpointError(
            f"cannot resume {run_dir}: the checkpoint was made with a different config "
            f"({'; '.join(diff)}). Only {', '.join(RESUMABLE)} may change on resume; nothing "
            f"was changed. Start a new run with another --out for a different config"
        )
    if config.schedule == "cosine" and config.epochs != saved.epochs:
        raise CheckpointError(
            f"cannot resume {run_dir} with epochs={config.epochs}: its cosine schedule anneals "
            f"over epochs={saved.epochs}, so changing it would change the schedule of the epochs "
            f"already trained; nothing was changed. Start a new run"
        )
    return ckpt


def _check_empty(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(
            f"run directory {run_dir} already exists and is not empty; choose another --out, "
            f"or continue that run with --resume {run_dir}"
        )


def _restore(ckpt: dict[str, Any], run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
             sched: Any, est: Any) -> None:
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        if est is not None:
            est.load_state_dict(ckpt["estimator"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"cannot resume {run_dir}: the checkpoint does not fit this model/optimizer "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); nothing was changed"
        ) from None


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Progress:
    """Counters that a checkpoint carries over."""

    epoch: int = 0  # completed epochs
    step: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    forward_rows: int = 0
    forward_passes: int = 0
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    # Sums over the steps of the epoch in progress.
    loss_sum: float = 0.0
    loss_count: int = 0
    correct: int = 0
    rows: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _best(history: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
    key = "val_loss" if task == "regression" else "val_acc"
    scored = [r for r in history if r.get(key) is not None]
    if not scored:
        return None
    pick = (min if task == "regression" else max)(scored, key=lambda r: r[key])
    return {"epoch": pick["epoch"], "step": pick["step"], key: pick[key],
            "test_acc": pick.get("test_acc"), "test_loss": pick.get("test_loss")}


def fit(
    config: RunConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    label: str | None = None,
) -> dict[str, Any]:
    """Train one run and return its summary.

    Args:
        config: the run. ``device="auto"`` and an unset ``lr`` are resolved before anything is
            written.
        out_dir: run directory, created if needed (it must be empty unless ``resume``); ``None``
            writes no files.
        resume: continue the run in ``out_dir`` from its checkpoint. ``config`` must equal the
            stored one except for :data:`RESUMABLE` fields (use :func:`resume_config`).
        callbacks: progress hooks (see :class:`Callback`, :class:`ConsoleProgress`).
        label: name of the run in callbacks and tables (default: ``config.method``).

    Inside a ``torch.distributed`` process group of several ranks (``ulr train --nproc N``,
    ``torchrun``), every rank calls ``fit`` with the same config: ULR splits the noise copies
    over the ranks (:class:`ulr.distributed.DistributedLikelihoodRatio`, ``config.exchange``),
    backprop splits the batch, and only rank 0 writes ``out_dir`` (see docs/distributed.md).

    Returns:
        The summary (also written to ``summary.json``): ``final`` and ``best`` metrics, steps,
        epochs_completed, wall_time_s, train_time_s, forward_rows, forward_passes, samples,
        peak_rss_mb (peak resident memory of the process during the run), peak_cuda_mb,
        num_params, environment, config, run_dir, status.

    Raises:
        CheckpointError: ``out_dir`` holds another run (without ``resume``) or cannot be
            resumed; the directory is left unchanged.
        TrainingInterrupted: on Ctrl-C; the directory holds the last checkpoint.
        ValueError: a model that does not fit the data, an unavailable device, or an
            estimator error (e.g. non-finite losses).
    """
    device = _device(config.device)
    config = config.replace(device=device.type, lr=config.resolved_lr)
    label = label or config.method
    run_dir = Path(out_dir) if out_dir is not None else None
    ckpt = None
    if distributed.is_distributed():
        distributed.check_same(config.to_dict(), "the run config")
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs the out_dir of the run to continue")
        # Rank 0 reads the checkpoint and hands it to the others (their disk may differ).
        ckpt = distributed.on_rank0(_load_checkpoint, run_dir, config)
    elif run_dir is not None:
        distributed.on_rank0(_check_empty, run_dir)

    ds = _dataset(config.data, config.data_dir, config.seed, config.val_fraction)
    if getattr(ds, "task", None) not in _TASKS:
        raise ValueError(
            f"dataset {config.data!r} is a {type(ds).__name__} (task "
            f"{getattr(ds, 'task', '?')!r}); ulr train handles in-memory (x, y) datasets for "
            f"classification or regression and graphs for node classification, such as "
            f"{', '.join(_TRAINABLE)}; train other kinds with ulr.LikelihoodRatio in your own "
            f"loop"
        )
    previous_threads = torch.get_num_threads()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        with torch.random.fork_rng(devices=rng_devices):
            model = _build_model(config, ds).to(device)
            torch.manual_seed(_stream_seed(config.seed, "global"))
            trainer = _Trainer(config, ds, model, device, run_dir, ckpt, callbacks, label,
                               rng_devices)
            return trainer.run()
    finally:
        torch.set_num_threads(previous_threads)


class _Trainer:
    """One run in progress: the model, optimiser, estimator, generators, counters and files."""

    def __init__(self, config: RunConfig, ds: data.Dataset, model: nn.Module,
                 device: torch.device, run_dir: Path | None, ckpt: dict[str, Any] | None,
                 callbacks: Sequence[Callback], label: str, rng_devices: list[int]) -> None:
        self.config, self.task, self.model, self.device = config, ds.task, model, device
        self.run_dir, self.callbacks, self.label = run_dir, callbacks, label
        self.rng_devices = rng_devices
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # A model's own constraint after each update (e.g. BinaryMLP clips its latent weights).
        after_step = getattr(model, "after_step", None)
        self.after_step = after_step if callable(after_step) else None
        self.opt = _optimizer(config, self.params)
        self.sched = _scheduler(config, self.opt)
        self.train_split = _to(ds.train, device)
        self.splits = {"val": _to(ds.val, device), "test": _to(ds.test, device)}
        self.graph = ds.task == "node-classification"
        if self.graph and distributed.is_distributed():
            raise ValueError(f"dataset {config.data!r} is one graph: ulr train runs it in one "
                             f"process (drop --nproc / torchrun)")
        loss = _training_loss(config, self.task)
        bp_only = config.method == "ulr" and config.blocks == 0  # --blocks 0: no noise site
        if self.graph:
            hops = getattr(model, "loss_hops", None)
            if hops is None:
                raise ValueError(
                    f"model {config.model!r} does not take a graph (it has no loss_hops, the "
                    f"reach of its graph layers); use --model gcn with --data {config.data}")
            from .models import gnn

            adj = self.train_split[0][1]  # inputs (x, adjacency)
            # Nodes influence each other: ULR weights each node's noise by the losses of the
            # labelled nodes within its reach (NodeLoss); whole-graph copies share adj.
            if config.method == "ulr" and not bp_only:
                loss = gnn.NodeLoss(adj, hops=hops)
            self.est = (None if bp_only
                        else _estimator(config, model, device, replicate=gnn.tile_graph))
        else:
            self.est = None if bp_only else _estimator(config, model, device)
        self.injection = (_NoiseInjection(config, model, device) if config.method == "bp-noise"
                          else None)
        self.data_gen = torch.Generator().manual_seed(_stream_seed(config.seed, "data"))
        self.prog = _Progress()
        self.resumed = ckpt is not None
        if ckpt is not None:
            assert run_dir is not None
            _restore(ckpt, run_dir, model, self.opt, self.sched, self.est)
            self.data_gen.set_state(ckpt["data_generator"])
            if self.injection is not None:
                self.injection.load_state_dict(ckpt["noise_injection"])
            torch.set_rng_state(ckpt["global_rng"])
            if rng_devices and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
            self.prog = _Progress(**ckpt["progress"])
        # A graph is one example: one full-graph step per epoch.
        self.steps_per_epoch = (1 if self.graph
                                else math.ceil(len(ds.train[0]) / config.batch_size))
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.loss_fn = _Counting(loss, self.task != "regression")
        self.plain_loss = _row_loss(self.task)
        self.env = environment(device)
        # Several processes (torchrun / --nproc): rank 0 alone writes files and prints.
        self.multi = distributed.is_distributed()
        self.writer = distributed.rank() == 0
        if self.multi:
            self.env.update(world_size=distributed.world_size(), rank=distributed.rank(),
                            backend=torch.distributed.get_backend())
        self.memory = _MemoryMonitor()
        self.log: Any = None
        self.forward_calls = 0
        self.saved_at = (self.prog.epoch, self.prog.step)
        self.saved_train_s = self.prog.train_time_s
        self.clock = 0.0

    def estimator_text(self) -> str:
        """What estimated the gradients, with the settings it really used (a peer's
        population, the ULR copies and plan), for the run's records."""
        if self.est is None:
            return ("backprop with the training noise of ULR's sites"
                    if self.injection is not None else "backprop")
        return repr(self.est)

    # -- files ------------------------------------------------------------------------------------
    def open_files(self, stack: contextlib.ExitStack) -> None:
        run_dir, config = self.run_dir, self.config
        if run_dir is None or not self.writer:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _lock_run_dir(run_dir, stack)
        if self.resumed:
            prog = self.prog
            keep = [r for r in _read_rows(run_dir / METRICS)
                    if r.get("step", 0) <= prog.step and not r.get("partial")
                    and not (r.get("kind") == "epoch" and r.get("epoch", 0) > prog.epoch)]
            _write_atomic(run_dir / METRICS,
                          lambda f: f.writelines(json.dumps(r) + "\n" for r in keep))
            with contextlib.suppress(FileNotFoundError):
                (run_dir / SUMMARY).unlink()
        _write_json(run_dir / CONFIG_JSON, config.to_dict())
        header = (f"ulr train config of run {run_dir.name!r} (ulr {__version__}); rerun with: "
                  f"ulr train --config {run_dir / CONFIG_TOML}")
        _write_atomic(run_dir / CONFIG_TOML, lambda f: f.write(to_toml(config, header)))
        self.log = stack.enter_context(open(run_dir / METRICS, "a"))  # noqa: SIM115

    def write(self, row: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(json.dumps(row) + "\n")

    def write_csv(self) -> None:
        """``metrics.csv``: one line per finished epoch (the epoch rows of metrics.jsonl),
        rewritten atomically, so a resumed run's table matches its history."""
        if self.run_dir is None or not self.writer:
            return
        import csv

        rows = self.prog.history
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "kind"))

        def write(f: Any) -> None:
            out = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            out.writeheader()
            out.writerows(rows)

        _write_atomic(self.run_dir / METRICS_CSV, write)

    def save_best(self, row: dict[str, Any]) -> None:
        """Keep the weights of the best validation score so far in ``best.pt`` (beside the
        latest in ``checkpoint.pt``): the model and config, in the checkpoint's format."""
        best = _best(self.prog.history, self.task)
        if (best is None or best["epoch"] != row["epoch"] or self.run_dir is None
                or not self.writer):
            return
        state = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "kind": "best",
                 "config": self.config.to_dict(), "model": self.model.state_dict(),
                 "best": best}
        _write_atomic(self.run_dir / BEST, lambda f: torch.save(state, f), mode="wb")

    def _checkpoint_due(self) -> bool:
        every = self.config.checkpoint_every
        if every is not None:
            return every > 0 and self.prog.step % every == 0
        return self.prog.train_time_s - self.saved_train_s >= CHECKPOINT_SECONDS

    def save(self, epoch_start_state: Tensor) -> None:
        """Checkpoint; ``epoch_start_state`` is the data generator as it was when the epoch in
        progress (or the next one) drew its order."""
        self.saved_at = (self.prog.epoch, self.prog.step)
        self.saved_train_s = self.prog.train_time_s
        if self.run_dir is None or not self.writer:
            return
        self.log.flush()
        state = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else None,
            "estimator": self.est.state_dict() if self.est is not None else None,
            "noise_injection": (self.injection.state_dict() if self.injection is not None
                                else None),
            "data_generator": epoch_start_state,
            "global_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.rng_devices else None,
            "progress": vars(self.prog),
        }
        _write_atomic(self.run_dir / CHECKPOINT, lambda f: torch.save(state, f), mode="wb")

    # -- steps and evaluation -------------------------------------------------------------------
    def evaluate(self, epoch: int, partial: bool) -> dict[str, Any]:
        prog, config = self.prog, self.config
        val_loss, val_acc = _evaluate(self.model, self.splits["val"], self.task,
                                      config.eval_batch_size)
        test_loss, test_acc = _evaluate(self.model, self.splits["test"], self.task,
                                        config.eval_batch_size)
        prog.wall_time_s = time.perf_counter() - self.clock
        row = {
            "kind": "epoch", "epoch": epoch, "step": prog.step,
            "train_loss": prog.loss_sum / prog.loss_count if prog.loss_count else None,
            "train_acc": prog.correct / prog.rows if prog.rows else None,
            "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss,
            "test_acc": test_acc, "lr": self.opt.param_groups[0]["lr"],
            "wall_time_s": prog.wall_time_s, "train_time_s": prog.train_time_s,
            "samples": prog.samples, "forward_rows": prog.forward_rows,
            "forward_passes": prog.forward_passes, "peak_rss_mb": self.memory.sample(),
        }
        if self.device.type == "cuda":
            row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if partial:
            row["partial"] = True
        self.write(row)
        for cb in self.callbacks:
            cb.on_epoch_end(row)
        return row

    def step(self, epoch: int, xb: Tensor, yb: Tensor) -> None:
        prog, config, est = self.prog, self.config, self.est
        calls_before = self.forward_calls
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        sent = None
        if est is not None:
            loss = float(est.loss_and_grads(self.loss_fn, xb, yb))
            rows = est.last_forward_rows
            sent = getattr(est, "last_bytes_sent", None)
        elif self.multi:
            loss, rows, sent = self._bp_step(xb, yb)
        else:
            loss_t = self.loss_fn(_call(self.model, xb), yb).mean()
            loss_t.backward()
            loss, rows = float(loss_t.detach()), _num_rows(xb)
        passes = self.forward_calls - calls_before
        diag = None
        if est is not None and config.diag_every and (prog.step + 1) % config.diag_every == 0:
            t_diag = time.perf_counter()
            diag = _diagnose(self.model, self.plain_loss, xb, yb, self.rng_devices)
            t0 += time.perf_counter() - t_diag  # diagnostics are not training time
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, config.grad_clip)
        self.opt.step()
        if self.after_step is not None:
            self.after_step()
        dt = time.perf_counter() - t0
        node_loss = self.loss_fn.take_node_loss()
        if self.graph and node_loss is not None:
            # ULR's graph loss returns receptive-field weights, whose mean is not the loss:
            # report the mean loss of the labelled nodes it saw (all copies), as for bp.
            loss = node_loss
        correct, acc_rows = self.loss_fn.take()
        if self.multi:  # each rank counted the rows it ran
            counts = torch.tensor([correct, acc_rows], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(counts)
            correct, acc_rows = int(counts[0]), int(counts[1])
        prog.step += 1
        prog.batch_in_epoch += 1
        prog.samples += _num_rows(xb)
        prog.forward_rows += rows
        prog.forward_passes += passes
        prog.train_time_s += dt
        prog.loss_sum += loss
        prog.loss_count += 1
        prog.correct += correct
        prog.rows += acc_rows
        row = {"kind": "step", "step": prog.step, "epoch": epoch, "loss": loss,
               "acc": correct / acc_rows if acc_rows else None,
               "lr": self.opt.param_groups[0]["lr"],
               "samples_per_s": _num_rows(xb) / dt if dt > 0 else None,
               "forward_rows": rows, "forward_passes": passes}
        if sent is not None:
            row["bytes_sent"] = sent
        self.write(row)
        for cb in self.callbacks:
            cb.on_step(row)
        if diag is not None:
            cos, ratio, overall = diag
            drow = {"kind": "diag", "step": prog.step, "epoch": epoch, "cosine": cos,
                    "norm_ratio": ratio, "cosine_all": overall}
            self.write(drow)
            for cb in self.callbacks:
                cb.on_diag(drow)

    def _bp_step(self, xb: Tensor, yb: Tensor) -> tuple[float, int, int]:
        """Backprop over several processes: each rank takes its share of the batch, the
        gradients (of the mean over the whole batch) are summed by one all-reduce."""
        r, n = distributed.rank(), distributed.world_size()
        b0, b1 = len(xb) * r // n, len(xb) * (r + 1) // n
        part = self.loss_fn(self.model(xb[b0:b1]), yb[b0:b1]).sum() / len(xb)
        part.backward()
        sent = distributed.all_reduce_grads(self.params)
        loss = part.detach().double().reshape(1)
        torch.distributed.all_reduce(loss)
        return float(loss), b1 - b0, sent + loss.element_size()

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        self.forward_calls += 1

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        config, prog = self.config, self.prog
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with contextlib.ExitStack() as stack:
            self.open_files(stack)
            stack.enter_context(self.memory)
            hook = self.model.register_forward_pre_hook(self._count_forward)
            stack.callback(hook.remove)
            for cb in self.callbacks:
                cb.on_train_start({
                    "config": config, "label": self.label,
                    "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                    "start_step": prog.step, "start_epoch": prog.epoch,
                    "num_params": sum(p.numel() for p in self.params),
                    "environment": self.env, "run_dir": self.run_dir,
                })
            self.write({"kind": "start", "step": prog.step, "epoch": prog.epoch,
                        "estimator": self.estimator_text(),
                        "label": self.label, "resumed": self.resumed, **self.env})
            if not self.resumed:
                self.save(self.data_gen.get_state())
            self.clock = time.perf_counter() - prog.wall_time_s
            try:
                last = self._epochs()
            except KeyboardInterrupt:
                raise TrainingInterrupted(self.run_dir, *self.saved_at) from None
        summary = _summary(config, self.task, prog, last, self.env, self.run_dir, self.label,
                           sum(p.numel() for p in self.params), self.memory.peak or None)
        summary["estimator"] = self.estimator_text()
        if self.device.type == "cuda":
            summary["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.run_dir is not None and self.writer:
            _write_json(self.run_dir / SUMMARY, summary)
        for cb in self.callbacks:
            cb.on_train_end(summary)
        return summary

    def _epochs(self) -> dict[str, Any]:
        """Train until the epoch or step budget is spent; return the last evaluation row."""
        config, prog = self.config, self.prog
        last: dict[str, Any] | None = None
        for epoch in range(prog.epoch + 1, config.epochs + 1):
            if config.max_steps is not None and prog.step >= config.max_steps:
                break
            if _patience_spent(prog.history, self.task, config.early_stop):
                break
            epoch_start_state = self.data_gen.get_state()
            batches: Iterator = (iter([self.train_split]) if self.graph else
                                 data.batches(*self.train_split, config.batch_size,
                                              shuffle=True, generator=self.data_gen))
            for _ in range(prog.batch_in_epoch):  # a run resumed inside this epoch
                next(batches)
            for cb in self.callbacks:
                cb.on_epoch_start(epoch, self.steps_per_epoch - prog.batch_in_epoch)
            stopped = False
            for xb, yb in batches:
                self.step(epoch, xb, yb)
                if config.max_steps is not None and prog.step >= config.max_steps:
                    stopped = prog.batch_in_epoch < self.steps_per_epoch
                    break
                if prog.batch_in_epoch < self.steps_per_epoch and self._checkpoint_due():
                    self.save(epoch_start_state)  # inside the epoch: resumes from here
            if stopped:
                last = self.evaluate(epoch, partial=True)
                self.save(epoch_start_state)
                break
            prog.epoch, prog.batch_in_epoch = epoch, 0
            last = self.evaluate(epoch, partial=False)
            prog.history.append(last)
            self.save_best(last)
            self.write_csv()
            prog.loss_sum, prog.loss_count, prog.correct, prog.rows = 0.0, 0, 0, 0
            if self.sched is not None:
                self.sched.step()
            self.save(self.data_gen.get_state())
        if last is None:  # resumed a run whose budget was already spent
            partial = prog.batch_in_epoch > 0
            last = (self.evaluate(prog.epoch + 1, partial=True) if partial or not prog.history
                    else prog.history[-1])
        return last


def _patience_spent(history: list[dict[str, Any]], task: str, patience: int) -> bool:
    """Early stopping: ``patience`` epochs have passed since the best validation score."""
    best = _best(history, task)
    return bool(patience) and best is not None and history[-1]["epoch"] - best["epoch"] >= patience


def _summary(config: RunConfig, task: str, prog: _Progress, last: dict[str, Any],
             env: dict[str, Any], run_dir: Path | None, label: str,
             num_params: int, peak_rss_mb: float | None) -> dict[str, Any]:
    finished = prog.epoch >= config.epochs
    keys = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
            "test_acc")
    return {
        "label": label,
        "status": ("complete" if finished else
                   f"stopped early after epoch {prog.epoch} (patience {config.early_stop})"
                   if _patience_spent(prog.history, task, config.early_stop) else
                   f"stopped at max_steps={config.max_steps}"),
        "method": config.method,
        "model": config.model,
        "data": config.data,
        "task": task,
        "seed": config.seed,
        "epochs_completed": prog.epoch,
        "steps": prog.step,
        "final": {k: last.get(k) for k in keys},
        "best": _best(prog.history or [last], task),
        "wall_time_s": prog.wall_time_s,
        "train_time_s": prog.train_time_s,
        "samples": prog.samples,
        "forward_rows": prog.forward_rows,
        "forward_passes": prog.forward_passes,
        "peak_rss_mb": peak_rss_mb if peak_rss_mb is not None else _lifetime_peak_rss_mb(),
        "peak_cuda_mb": None,
        "num_params": num_params,
        "environment": env,
        "config": config.to_dict(),
        "run_dir": str(run_dir) if run_dir is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# Reporting


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A plain-text table comparing run summaries (as :func:`fit` returns), one row per run.

    Classification runs show test accuracy after the last epoch, the best validation accuracy
    (and its epoch) with the test accuracy at that epoch; regression runs the same for the
    loss (MSE). Then wall time (whole run), training time (optimizer steps only), steps,
    forward passes and rows (examples x copies), and peak memory: the process's resident memory
    on the CPU, the allocated GPU memory (marked ``GPU``) for CUDA runs.
    """
    regression = bool(summaries) and all(s.get("task") == "regression" for s in summaries)
    head = (["run", "test MSE", "best val MSE (ep)", "test MSE @best"] if regression else
            ["run", "test acc", "best val acc (ep)", "test acc @best"])
    head += ["wall s", "train s", "steps", "fwd passes", "fwd rows", "peak mem MB"]
    lines = []
    for s in summaries:
        final, best = s.get("final") or {}, s.get("best") or {}
        if regression:
            cells = [_num(final.get("test_loss")),
                     f"{_num(best.get('val_loss'))} ({best.get('epoch', '-')})" if best else "-",
                     _num(best.get("test_loss"))]
        else:
            cells = [_pct(final.get("test_acc")),
                     f"{_pct(best.get('val_acc'))} ({best.get('epoch', '-')})" if best else "-",
                     _pct(best.get("test_acc"))]
        gpu = s.get("peak_cuda_mb")
        peak = f"{gpu:.0f} GPU" if gpu is not None else _num(s.get("peak_rss_mb"), ".0f")
        lines.append([str(s.get("label", s.get("method", "?"))), *cells,
                      _num(s.get("wall_time_s"), ".1f"), _num(s.get("train_time_s"), ".1f"),
                      str(s.get("steps", "-")), _count(s.get("forward_passes")),
                      _count(s.get("forward_rows")), peak])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *map(fmt, lines)])


#: seconds between step lines when no progress bar shows and log_every is not set
LOG_SECONDS = 60.0


class ConsoleProgress(Callback):
    """A tqdm progress bar over the run (loss, accuracy, samples/s) and one line per epoch.

    Args:
        label: prefix of every line, e.g. the method.
        quiet: print nothing at all.
        bar: ``None`` shows the bar only when stderr is a terminal; ``False`` never.
        file: where epoch lines go (default ``sys.stdout``).
        log_every: a step line (loss, accuracy, samples/s, ETA) every N steps; 0 never;
            ``None``: every :data:`LOG_SECONDS` of wall time while no bar shows.
    """

    def __init__(self, label: str = "", *, quiet: bool = False, bar: bool | None = None,
                 file: Any = None, log_every: int | None = None) -> None:
        self.label, self.quiet, self.show_bar, self.file = label, quiet, bar, file
        self.log_every = log_every
        self.total = self.start_step = 0
        self.started = self.logged = time.perf_counter()
        self.bar: Any = None
        self.epochs = 0
        self.speed: float | None = None
        self.cosine: float | None = None

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        out = self.file or sys.stdout
        if self.bar is not None:
            self.bar.write(text, file=out)
        else:
            print(text, file=out, flush=True)

    def on_train_start(self, info: dict[str, Any]) -> None:
        config = info["config"]
        self.epochs = config.epochs
        self.label = self.label or info["label"]
        start = f" (resumed at step {info['start_step']})" if info["start_step"] else ""
        threads = info["environment"]["threads"]
        self.total, self.start_step = info["total_steps"], info["start_step"]
        self.started = self.logged = time.perf_counter()
        self._print(f"[{self.label}] {config.model} on {config.data}, {info['num_params']:,} "
                    f"parameters, {info['steps_per_epoch']} steps/epoch, device "
                    f"{info['environment']['device']}, {threads} "
                    f"thread{'s' if threads != 1 else ''}{start}")
        if self.quiet or self.show_bar is False:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=info["total_steps"], initial=info["start_step"],
                        desc=self.label, unit="step", dynamic_ncols=True, leave=True,
                        disable=None if self.show_bar is None else not self.show_bar)

    def on_step(self, row: dict[str, Any]) -> None:
        if row["samples_per_s"] is not None:
            s = row["samples_per_s"]
            self.speed = s if self.speed is None else 0.9 * self.speed + 0.1 * s
        if self._log_due(row["step"]):
            self._print(self._step_line(row))
        if self.bar is None:
            return
        post = {"loss": f"{row['loss']:.3f}"}
        if row["acc"] is not None:
            post["acc"] = f"{100 * row['acc']:.1f}%"
        if self.speed is not None:
            post["samples/s"] = f"{self.speed:,.0f}"
        if self.cosine is not None:
            post["cos"] = f"{self.cosine:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def _log_due(self, step: int) -> bool:
        if self.quiet:
            return False
        if self.log_every is not None:
            return self.log_every > 0 and step % self.log_every == 0
        hidden = self.bar is None or getattr(self.bar, "disable", False)
        return hidden and time.perf_counter() - self.logged >= LOG_SECONDS

    def _step_line(self, row: dict[str, Any]) -> str:
        now = time.perf_counter()
        self.logged = now
        step, done = row["step"], row["step"] - self.start_step
        parts = [f"[{self.label}] step {step}/{self.total}", f"loss {row['loss']:.4f}"]
        if row["acc"] is not None:
            parts.append(f"acc {100 * row['acc']:.1f}%")
        if self.speed is not None:
            parts.append(f"{self.speed:,.0f} samples/s")
        if done > 0 and self.total > step:
            eta = (now - self.started) / done * (self.total - step)
            parts.append(f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:"
                         f"{int(eta % 60):02d}")
        return "  ".join(parts)

    def on_diag(self, row: dict[str, Any]) -> None:
        self.cosine = row["cosine_all"]

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        ep = f"epoch {row['epoch']:>{len(str(self.epochs))}}/{self.epochs}"
        if row.get("partial"):
            ep += " (partial)"
        parts = [f"[{self.label}] {ep}", f"loss {_num(row['train_loss'])}"]
        if row["train_acc"] is not None:
            parts.append(f"train acc {_pct(row['train_acc'])}")
        if row["val_acc"] is not None or row["test_acc"] is not None:
            parts += [f"val acc {_pct(row['val_acc'])}", f"test acc {_pct(row['test_acc'])}"]
        else:
            parts += [f"val MSE {_num(row['val_loss'])}", f"test MSE {_num(row['test_loss'])}"]
        speed = row["samples"] / row["train_time_s"] if row["train_time_s"] else 0.0
        parts += [f"lr {row['lr']:.2g}", f"{row['wall_time_s']:.1f} s", f"{speed:,.0f} samples/s"]
        self._print("  ".join(parts))

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
