"""What a run measures besides its loss: evaluation on a split, the per-layer gradient
diagnostics against backprop, the accuracy counted during training, the best epoch and
early stopping, the peak resident memory, the peak allocation of a training step and the
environment of the process."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from .recipes import row_loss

__all__ = ["environment"]


def call(model: nn.Module, inputs: Any) -> Tensor:
    """``model(inputs)``, or ``model(*inputs)`` for a tuple such as a graph's (x, adjacency)."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def num_rows(inputs: Any) -> int:
    return len(inputs[0]) if isinstance(inputs, tuple) else len(inputs)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    return obj.to(device)


class Counting:
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
def evaluate(model: nn.Module, split: tuple[Any, Any], task: str,
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
            out = call(model, x)
        finally:
            model.train()
        loss = F.cross_entropy(out[mask], labels[mask])
        return float(loss), float((out[mask].argmax(1) == labels[mask]).double().mean())
    if len(x) == 0:
        return None, None
    loss_fn = row_loss(task)
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


def diagnose(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor,
              y: Tensor, rng_devices: list[int]) -> tuple[dict, dict, float | None]:
    """Cosine and norm ratio of ``p.grad`` (the estimate) against backprop, per layer.

    Backprop uses ``torch.autograd.grad``, so ``p.grad`` is left as it is; the global RNG is
    forked so that modules drawing from it leave the training stream untouched.
    """
    groups = _layer_groups(model)
    params = [p for ps in groups.values() for p in ps]
    with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
        loss = loss_fn(call(model, x), y).mean()
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



class MemoryMonitor:
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
            return lifetime_peak_rss_mb()
        self.peak = max(self.peak, self._current())
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self._current())
            except (OSError, ValueError, IndexError):
                return

    def __enter__(self) -> MemoryMonitor:
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


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # The profiler's C++ side logs start/stop lines to file descriptor 2.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_profiler_warned = False


def _spend_profiler_warning() -> None:
    # torch's CPU allocator warns once per process, on stderr, when a block allocated before a
    # memory profile is freed inside it (which every training step does). Spend that warning
    # on a silenced dummy profile, so the measured steps neither print it nor need stderr
    # silenced while the user's own code runs.
    global _profiler_warned
    if _profiler_warned:
        return
    from torch.profiler import ProfilerActivity, profile

    held = torch.empty(256)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        del held
    _profiler_warned = True


@contextlib.contextmanager
def allocation_peak(device: torch.device | str = "cpu") -> Iterator[dict[str, float | None]]:
    """The peak of the memory allocated inside the block above what was allocated when it
    began, in bytes, into the yielded dict's ``"bytes"`` (``None`` if it cannot be measured:
    another torch profiler already running).

    CPU: the torch profiler's allocation events at operator granularity (every thread's), so
    the block runs a little slower. CUDA: ``torch.cuda.max_memory_allocated`` after resetting
    the peak statistics (the caller keeps any longer-running peak it needs first)."""
    device = torch.device(device)
    result: dict[str, float | None] = {"bytes": None}
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["bytes"] = float(torch.cuda.max_memory_allocated(device) - before)
        return
    from torch.profiler import ProfilerActivity, profile

    if torch._C._autograd._profiler_enabled():  # the user's profiler: leave it alone
        yield result
        return
    _spend_profiler_warning()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        yield result
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    result["bytes"] = float(peak)


def peak_step_memory(step: Callable[[], None], device: torch.device | str = "cpu") -> float:
    """Peak of net allocations during ``step()`` (bytes; memory held before is not counted),
    by :func:`allocation_peak`."""
    with allocation_peak(device) as result:
        step()
    return float(result["bytes"] or 0.0)


class StepMemory:
    """The peak allocation of a few training steps of a run (:func:`allocation_peak`): the
    estimator's working memory (noise, copies, activations, gradients, the optimizer's
    temporaries) without the weights, optimizer state and data held between steps.

    The first ``skip`` steps of each process are warm-up (ULR's probing pass, the optimizer's
    state appearing) and are not measured; the next ``steps`` steps without a gradient
    diagnostic are, and :attr:`peak_mb` is their maximum. Profiling slows just those steps.
    For CUDA runs it also keeps the run's peak allocated memory (:meth:`cuda_peak_mb`), which
    the per-step measurement resets.
    """

    def __init__(self, device: torch.device, steps: int = 2, skip: int = 1) -> None:
        self.device, self.steps, self.skip = device, steps, skip
        self.seen = self.measured = 0
        self.peak_mb: float | None = None
        self._cuda_floor = 0

    def due(self, diag: bool) -> bool:
        """Whether the next step is measured (``diag``: it runs a gradient diagnostic)."""
        self.seen += 1
        return self.seen > self.skip and self.measured < self.steps and not diag

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float | None]]:
        """Measure the block; the yielded dict gets ``"mb"`` (``None`` if not measured)."""
        if self.device.type == "cuda":
            self._cuda_floor = max(self._cuda_floor,
                                   torch.cuda.max_memory_allocated(self.device))
        out: dict[str, float | None] = {"mb": None}
        with allocation_peak(self.device) as result:
            yield out
        if result["bytes"] is not None:
            self.measured += 1
            out["mb"] = result["bytes"] / 2**20
            self.peak_mb = max(self.peak_mb or 0.0, out["mb"])

    def cuda_peak_mb(self) -> float:
        """The run's peak allocated GPU memory (MB), across the per-step resets."""
        return max(self._cuda_floor, torch.cuda.max_memory_allocated(self.device)) / 2**20


def lifetime_peak_rss_mb() -> float | None:
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



def best_epoch(history: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
    """The epoch row of best validation score (accuracy; loss for regression), trimmed to the
    summary's ``best`` entry; ``None`` before any scored epoch."""
    key = "val_loss" if task == "regression" else "val_acc"
    scored = [r for r in history if r.get(key) is not None]
    if not scored:
        return None
    pick = (min if task == "regression" else max)(scored, key=lambda r: r[key])
    return {"epoch": pick["epoch"], "step": pick["step"], key: pick[key],
            "test_acc": pick.get("test_acc"), "test_loss": pick.get("test_loss")}



def patience_spent(history: list[dict[str, Any]], task: str, patience: int) -> bool:
    """Early stopping: ``patience`` epochs have passed since the best validation score."""
    best = best_epoch(history, task)
    return bool(patience) and best is not None and history[-1]["epoch"] - best["epoch"] >= patience

