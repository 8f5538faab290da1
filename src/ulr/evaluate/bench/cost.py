"""Cost per step: CPU and wall time, forward rows and peak memory of one training step of each
method in its training configuration."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .harness import BATCH, ce, generator_for, initial_model, load_dataset, progress
from .methods import build_estimator, describe
from .settings import Settings


@contextlib.contextmanager
def _quiet_stderr():
    # The profiler's C++ side logs start/stop lines to file descriptor 2; keep progress readable.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_memory(step: Callable[[], None]) -> float:
    """Peak of net CPU allocations during ``step`` (bytes), from the torch profiler's
    allocation events at operator granularity (memory held before the step is not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return float(peak)


def cost(settings: Settings, verbose: bool = False) -> list[dict[str, Any]]:
    """Per (model, method) in the training configuration, batch 32: median CPU and wall time
    per step (``loss_and_grads`` + Adam step) over ``cost_steps`` steps after two warm-up
    steps, forward rows per step, and the peak memory of one step."""
    out = []
    shapes = {"mlp": "digits", "lenet5": "mnist-subset"}
    for model_name in dict.fromkeys(m for _, m, _ in settings.tta):
        ds = load_dataset(shapes.get(model_name, "digits"), settings.seeds[0])
        x, y = ds.train
        xb, yb = x[:BATCH], y[:BATCH]
        for method in settings.methods:
            model = initial_model(model_name, ds, settings.seeds[0])
            est = build_estimator(method, model, generator_for(0, 3))
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)

            def step():
                opt.zero_grad(set_to_none=True)
                est.loss_and_grads(ce, xb, yb)
                opt.step()

            step()
            step()
            cpu, wall = [], []
            for _ in range(settings.cost_steps):
                t_cpu, t_wall = time.process_time(), time.perf_counter()
                step()
                cpu.append(time.process_time() - t_cpu)
                wall.append(time.perf_counter() - t_wall)
            peak = peak_step_memory(step)
            params = sum(p.numel() for p in model.parameters())
            out.append({"model": model_name, "input": list(ds.input_shape), "method": method,
                        "config": describe(method, model), "params": params,
                        "rows_per_step": est.last_forward_rows,
                        "cpu_ms": 1e3 * statistics.median(cpu),
                        "wall_ms": 1e3 * statistics.median(wall), "peak_mb": peak / 2**20,
                        "weights_mb": params * 4 / 2**20})
            progress(f"cost {model_name} {method}: {out[-1]['cpu_ms']:.1f} ms, "
                 f"{out[-1]['peak_mb']:.2f} MB", verbose)
    return out

