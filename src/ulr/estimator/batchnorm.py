"""Train-mode BatchNorm under noise: the clean pass notes each BatchNorm's batch statistics,
and every noisy pass normalises with them (so the noise copies do not change the statistics,
and the running statistics are updated once per step, by the clean pass)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["BatchStats", "batch_norms_in_training", "capture_batch_stats", "frozen_batch_stats",
           "restore_buffers", "saved_buffers"]

BatchStats = dict[nn.Module, tuple[Tensor, Tensor]]


def batch_norms_in_training(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


@contextlib.contextmanager
def capture_batch_stats(model: nn.Module, norms: list[nn.Module],
                        stats: BatchStats) -> Iterator[None]:
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
def frozen_batch_stats(stats: BatchStats) -> Iterator[None]:
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


def saved_buffers(norms: list[nn.Module]) -> dict[nn.Module, dict[str, Tensor]]:
    """Copies of the BatchNorms' buffers, for a step that starts over (its clean pass runs
    again and must not update the running statistics twice)."""
    return {m: {k: b.clone() for k, b in m._buffers.items() if b is not None} for m in norms}


def restore_buffers(saved: dict[nn.Module, dict[str, Tensor]]) -> None:
    with torch.no_grad():
        for m, kept in saved.items():
            for k, b in kept.items():
                m._buffers[k].copy_(b)
