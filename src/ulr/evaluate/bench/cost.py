"""Cost per step: CPU and wall time, forward rows and peak memory of one training step of each
method in its training configuration."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ...train.metrics import peak_step_memory
from .harness import BATCH, ce, generator_for, initial_model, load_dataset, progress
from .methods import build_estimator, describe
from .settings import Settings


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

