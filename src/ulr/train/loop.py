"""The training loop behind ``ulr train``: one :class:`~ulr.train.RunConfig` -> one run.

:func:`fit` trains a reference model on a registry dataset with the likelihood-ratio estimator
(``method="ulr"``), with backpropagation (``method="bp"``), with backpropagation through the
ULR training noise (``method="bp-noise"``) or with a peer estimator of :mod:`ulr.peers`
(``"es"``, ``"spsa"``, ``"forward-gradient"``), evaluates it every epoch and,
given a run directory, records everything needed to analyse and continue the run (see
:mod:`ulr.train.rundir`).

One optimizer step (:meth:`_Trainer.step`) is the same for every method: zero the gradients,
``estimator.loss_and_grads`` (backprop too, as :class:`ulr.peers.Backprop`), clip, step.
Evaluation, diagnostics, checkpoints and progress happen around it.

Randomness comes from four generators, each seeded from its own stream of ``config.seed``: the
initial weights (the same for every method), the data order, the estimator's noise and the
global RNG (for modules that draw from it, such as dropout; the caller's global RNG state is
restored afterwards). The last three are checkpointed with the weights, so a resumed run
continues bit-identically on the same device and thread count: 1 epoch + resume to 2 epochs
gives the metrics and weights of 2 epochs straight.

Example:
    >>> from ulr.train import RunConfig, fit
    >>> summary = fit(RunConfig(epochs=1, max_steps=2, threads=1))   # no run directory
    >>> summary["steps"]
    2
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import data, distributed
from . import checkpoints, recipes
from .bp_noise import NoiseInjection
from .config import RunConfig
from .metrics import (
    Counting,
    MemoryMonitor,
    StepMemory,
    best_epoch,
    diagnose,
    environment,
    evaluate,
    lifetime_peak_rss_mb,
    num_rows,
    patience_spent,
    to_device,
)
from .progress import Callback
from .rundir import BEST, CHECKPOINT, RunWriter, check_empty, tensorboard_writer

__all__ = ["TrainingInterrupted", "fit"]

#: seconds of training between checkpoints inside an epoch when checkpoint_every is not set
CHECKPOINT_SECONDS = 600.0
#: Datasets that ``ulr train`` is tested with (others of the same kind work too).
_TRAINABLE = ("digits", "mnist-subset", "fashion-mnist", "mnist1d", "adding", "sequential-digits",
              "karate", "sbm")
#: What ``ulr train`` trains: batches of (x, y) examples, or one graph's nodes.
_TASKS = ("classification", "regression", "node-classification")


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
    step_peak_mb: float | None = None  # the measured steps' peak allocation (StepMemory)
    # Sums over the steps of the epoch in progress.
    loss_sum: float = 0.0
    loss_count: int = 0
    correct: int = 0
    rows: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def fit(
    config: RunConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    label: str | None = None,
    model: nn.Module | None = None,
    dataset: data.Dataset | None = None,
) -> dict[str, Any]:
    """Train one run and return its summary.

    Args:
        config: the run. ``device="auto"`` and an unset ``lr`` are resolved before anything is
            written.
        out_dir: run directory, created if needed (it must be empty unless ``resume``); ``None``
            writes no files.
        resume: continue the run in ``out_dir`` from its checkpoint. ``config`` must equal the
            stored one except for :data:`~ulr.train.RESUMABLE` fields (use :func:`resume_config`).
        callbacks: progress hooks (see :class:`Callback`, :class:`ConsoleProgress`).
        label: name of the run in callbacks and tables (default: ``config.method``).
        model: train this module (in place) instead of building ``config.model``; its own
            initial weights are kept.
        dataset: train on this :class:`ulr.data.Dataset` instead of loading ``config.data``
            (:func:`ulr.train.custom.as_dataset` makes one of other forms).

    Inside a ``torch.distributed`` process group of several ranks (``ulr train --nproc N``,
    ``torchrun``), every rank calls ``fit`` with the same config: ULR splits the noise copies
    over the ranks (:class:`ulr.distributed.DistributedLikelihoodRatio`, ``config.exchange``),
    backprop splits the batch, and only rank 0 writes ``out_dir`` (see docs/distributed.md).

    Returns:
        The summary (also written to ``summary.json``): ``final`` and ``best`` metrics, steps,
        epochs_completed, wall_time_s, train_time_s, forward_rows, forward_passes, samples,
        peak_rss_mb (peak resident memory of the process during the run), peak_cuda_mb,
        step_peak_mb (the peak allocation of a training step, measured on a few steps:
        :class:`~ulr.train.metrics.StepMemory`),
        num_params, environment, config, run_dir, status.

    Raises:
        CheckpointError: ``out_dir`` holds another run (without ``resume``) or cannot be
            resumed; the directory is left unchanged.
        TrainingInterrupted: on Ctrl-C; the directory holds the last checkpoint.
        ValueError: a model that does not fit the data, an unavailable device, or an
            estimator error (e.g. non-finite losses).
    """
    device = recipes.device(config.device)
    config = config.replace(device=device.type, lr=config.resolved_lr)
    label = label or config.method
    run_dir = Path(out_dir) if out_dir is not None else None
    if config.tensorboard:  # fail before anything is written when tensorboard is missing
        tensorboard_writer(None)
    ckpt = None
    if distributed.is_distributed():
        distributed.check_same(config.to_dict(), "the run config")
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs the out_dir of the run to continue")
        # Rank 0 reads the checkpoint and hands it to the others (their disk may differ).
        ckpt = distributed.on_rank0(checkpoints.load, run_dir, config)
    elif run_dir is not None:
        distributed.on_rank0(check_empty, run_dir)

    ds = dataset if dataset is not None else recipes.dataset(
        config.data, config.data_dir, config.seed, config.val_fraction)
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
            record = recipes.model_record(config, ds)
            model = (model if model is not None else recipes.build_model(config, ds)).to(device)
            torch.manual_seed(recipes.stream_seed(config.seed, "global"))
            trainer = _Trainer(config, ds, model, device, run_dir, ckpt, callbacks, label,
                               rng_devices)
            trainer.record = record
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
        self.opt = recipes.optimizer(config, self.params)
        self.graph = ds.task == "node-classification"
        # A graph is one example: one full-graph step per epoch.
        self.steps_per_epoch = (1 if self.graph
                                else math.ceil(len(ds.train[0]) / config.batch_size))
        self.sched = recipes.scheduler(config, self.opt, self.steps_per_epoch)
        self.step_sched = recipes.per_step(config)
        self.record: dict[str, Any] = {}
        self.train_split = to_device(ds.train, device)
        self.splits = {"val": to_device(ds.val, device), "test": to_device(ds.test, device)}
        self.est, loss = self._estimator_and_loss()
        self.backprop = recipes.is_backprop(config)
        self.injection = (NoiseInjection(config, model, device) if config.method == "bp-noise"
                          else None)
        self.data_gen = torch.Generator().manual_seed(recipes.stream_seed(config.seed, "data"))
        self.prog = _Progress()
        self.resumed = ckpt is not None
        if ckpt is not None:
            self._restore(ckpt)
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.loss_fn = Counting(loss, self.task != "regression")
        self.plain_loss = recipes.row_loss(self.task)
        self.env = environment(device)
        # Several processes (torchrun / --nproc): rank 0 alone writes files and prints.
        self.multi = distributed.is_distributed()
        if self.multi:
            self.env.update(world_size=distributed.world_size(), rank=distributed.rank(),
                            backend=torch.distributed.get_backend())
        self.files = RunWriter(run_dir, writer=distributed.rank() == 0)
        self.memory = MemoryMonitor()
        self.step_memory = StepMemory(device)
        self.forward_calls = 0
        self.saved_at = (self.prog.epoch, self.prog.step)
        self.saved_train_s = self.prog.train_time_s
        self.clock = 0.0

    def _estimator_and_loss(self) -> tuple[Any, Any]:
        """The run's estimator and the per-row loss it trains on."""
        config, model = self.config, self.model
        loss = recipes.training_loss(config, self.task)
        if not self.graph:
            return recipes.build_estimator(config, model, self.device), loss
        if distributed.is_distributed():
            raise ValueError(f"dataset {config.data!r} is one graph: ulr train runs it in one "
                             f"process (drop --nproc / torchrun)")
        hops = getattr(model, "loss_hops", None)
        if hops is None:
            raise ValueError(
                f"model {config.model!r} does not take a graph (it has no loss_hops, the "
                f"reach of its graph layers); use --model gcn with --data {config.data}")
        from ..models import gnn

        # Nodes influence each other: ULR weights each node's noise by the losses of the
        # labelled nodes within its reach (NodeLoss); whole-graph copies share adj.
        if config.method == "ulr" and config.blocks != 0:
            loss = gnn.NodeLoss(self.train_split[0][1], hops=hops)  # inputs (x, adjacency)
        return recipes.build_estimator(config, model, self.device,
                                       replicate=gnn.tile_graph), loss

    def _restore(self, ckpt: dict[str, Any]) -> None:
        assert self.run_dir is not None
        checkpoints.restore(ckpt, self.run_dir, self.model, self.opt, self.sched, self.est)
        self.data_gen.set_state(ckpt["data_generator"])
        if self.injection is not None:
            self.injection.load_state_dict(ckpt["noise_injection"])
        torch.set_rng_state(ckpt["global_rng"])
        if self.rng_devices and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self.prog = _Progress(**ckpt["progress"])

    def estimator_text(self) -> str:
        """What estimated the gradients, with the settings it really used (a peer's
        population, the ULR copies and plan), for the run's records."""
        if self.backprop:
            return ("backprop with the training noise of ULR's sites"
                    if self.injection is not None else "backprop")
        return repr(self.est)

    # -- the step ---------------------------------------------------------------------------------
    def step(self, epoch: int, xb: Any, yb: Any) -> None:
        """One optimizer step, the same for every method. A few steps also measure their peak
        allocation (:class:`StepMemory`)."""
        measured = self.step_memory.due(self._diag_due())
        with (self.step_memory.measure() if measured
              else contextlib.nullcontext({"mb": None})) as memory:
            t0, calls = time.perf_counter(), self.forward_calls
            self.opt.zero_grad(set_to_none=True)
            loss = float(self.est.loss_and_grads(self.loss_fn, xb, yb))
            passes = self.forward_calls - calls
            diag, diag_s = self._diagnose(xb, yb)
            if self.config.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            self.opt.step()
            if self.step_sched:
                self.sched.step()
            if self.after_step is not None:
                self.after_step()
            dt = time.perf_counter() - t0 - diag_s
        self._record(epoch, xb, loss, dt, passes, diag, memory["mb"])

    def _diag_due(self) -> bool:
        every = self.config.diag_every
        return bool(not self.backprop and every and (self.prog.step + 1) % every == 0)

    def _diagnose(self, xb: Any, yb: Any) -> tuple[Any, float]:
        """Every ``diag_every`` steps of an estimator other than backprop: its gradient against
        backprop's, per layer, and the seconds that took (not training time)."""
        if not self._diag_due():
            return None, 0.0
        t = time.perf_counter()
        diag = diagnose(self.model, self.plain_loss, xb, yb, self.rng_devices)
        return diag, time.perf_counter() - t

    def _record(self, epoch: int, xb: Any, loss: float, dt: float, passes: int,
                diag: Any, step_mb: float | None = None) -> None:
        """Count the step and report it (metrics.jsonl and the callbacks)."""
        prog = self.prog
        rows, sent = self.est.last_forward_rows, getattr(self.est, "last_bytes_sent", None)
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
        prog.samples += num_rows(xb)
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
               "samples_per_s": num_rows(xb) / dt if dt > 0 else None,
               "forward_rows": rows, "forward_passes": passes}
        if sent is not None:
            row["bytes_sent"] = sent
        if step_mb is not None:
            row["step_peak_mb"] = step_mb
            prog.step_peak_mb = max(prog.step_peak_mb or 0.0, step_mb)
        self._report("on_step", row)
        if diag is not None:
            cos, ratio, overall = diag
            self._report("on_diag", {"kind": "diag", "step": prog.step, "epoch": epoch,
                                     "cosine": cos, "norm_ratio": ratio, "cosine_all": overall})

    def _report(self, hook: str, row: dict[str, Any]) -> None:
        self.files.row(row)
        for cb in self.callbacks:
            getattr(cb, hook)(row)

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        self.forward_calls += 1

    # -- evaluation and checkpoints ---------------------------------------------------------------
    def evaluate(self, epoch: int, partial: bool) -> dict[str, Any]:
        prog, config = self.prog, self.config
        val_loss, val_acc = evaluate(self.model, self.splits["val"], self.task,
                                     config.eval_batch_size)
        test_loss, test_acc = evaluate(self.model, self.splits["test"], self.task,
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
            row["peak_cuda_mb"] = self.step_memory.cuda_peak_mb()
        if partial:
            row["partial"] = True
        self._report("on_epoch_end", row)
        return row

    def save_best(self, row: dict[str, Any]) -> None:
        """Keep the weights of the best validation score so far in ``best.pt`` (beside the
        latest in ``checkpoint.pt``): the model and config, in the checkpoint's format."""
        best = best_epoch(self.prog.history, self.task)
        if best is None or best["epoch"] != row["epoch"]:
            return
        state = checkpoints.state(self.config, self.model, head={"kind": "best"}, best=best,
                                  model_source=self.record)
        self.files.save(BEST, lambda f: torch.save(state, f), mode="wb")

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
        if self.files.run_dir is None:
            return
        self.files.flush()
        state = checkpoints.state(
            self.config, self.model,
            optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict() if self.sched is not None else None,
            estimator=None if self.backprop else self.est.state_dict(),
            noise_injection=self.injection.state_dict() if self.injection is not None else None,
            data_generator=epoch_start_state,
            global_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(self.device) if self.rng_devices else None,
            progress=vars(self.prog), model_source=self.record)
        self.files.save(CHECKPOINT, lambda f: torch.save(state, f), mode="wb")

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        config, prog = self.config, self.prog
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with contextlib.ExitStack() as stack:
            self.files.open(config, stack, (prog.epoch, prog.step) if self.resumed else None)
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
            self.files.row({"kind": "start", "step": prog.step, "epoch": prog.epoch,
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
        summary["model_source"] = self.record
        if self.device.type == "cuda":
            summary["peak_cuda_mb"] = self.step_memory.cuda_peak_mb()
        self.files.summary(summary)
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
            if patience_spent(prog.history, self.task, config.early_stop):
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
            self.files.csv(prog.history)
            prog.loss_sum, prog.loss_count, prog.correct, prog.rows = 0.0, 0, 0, 0
            if self.sched is not None and not self.step_sched:
                self.sched.step()
            self.save(self.data_gen.get_state())
        if last is None:  # resumed a run whose budget was already spent
            partial = prog.batch_in_epoch > 0
            last = (self.evaluate(prog.epoch + 1, partial=True) if partial or not prog.history
                    else prog.history[-1])
        return last

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
                   if patience_spent(prog.history, task, config.early_stop) else
                   f"stopped at max_steps={config.max_steps}"),
        "method": config.method,
        "model": config.model,
        "data": config.data,
        "task": task,
        "seed": config.seed,
        "epochs_completed": prog.epoch,
        "steps": prog.step,
        "final": {k: last.get(k) for k in keys},
        "best": best_epoch(prog.history or [last], task),
        "wall_time_s": prog.wall_time_s,
        "train_time_s": prog.train_time_s,
        "samples": prog.samples,
        "forward_rows": prog.forward_rows,
        "forward_passes": prog.forward_passes,
        "peak_rss_mb": peak_rss_mb if peak_rss_mb is not None else lifetime_peak_rss_mb(),
        "peak_cuda_mb": None,
        "step_peak_mb": prog.step_peak_mb,
        "num_params": num_params,
        "environment": env,
        "config": config.to_dict(),
        "run_dir": str(run_dir) if run_dir is not None else None,
    }
