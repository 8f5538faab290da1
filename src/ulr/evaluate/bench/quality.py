"""Gradient quality: the per-layer cosine of each estimate with the exact minibatch gradient at
equal forward rows, its summary over seeds, and ULR's ratio to ES and SPSA."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from ...peers import Backprop
from .harness import (
    BATCH,
    accuracy,
    ce,
    cosine,
    generator_for,
    initial_model,
    layer_grads,
    load_dataset,
    mean_std,
    progress,
)
from .methods import build_estimator, describe
from .settings import Settings


def gradient_quality(settings: Settings, verbose: bool = False) -> list[dict[str, Any]]:
    """Per-layer cosine of each estimate with the exact minibatch gradient, per budget.

    For each quality model, seed, state (``init``; ``trained`` after
    ``quality_warmup_steps`` backprop steps) and minibatch of 32, every method estimates the
    gradient at every rows-per-example level (its configuration sized to spend about that many
    forward rows per example; the row count actually spent is recorded).

    Returns:
        One row per (model, state, method, level, seed, batch) with ``rows_per_example``,
        ``cosine`` (``{layer: cos}``) and ``mean_cosine`` (the unweighted mean over layers).
    """
    rows_out: list[dict[str, Any]] = []
    for model_name, data_name in settings.quality_models:
        levels = settings.quality_levels[model_name]
        for seed in settings.seeds:
            ds = load_dataset(data_name, seed)
            x_all, y_all = ds.train
            model = initial_model(model_name, ds, seed)
            states = ["init"] + (["trained"] if settings.quality_warmup_steps > 0 else [])
            for state in states:
                if state == "trained":
                    bp_warmup(model, x_all, y_all, settings.quality_warmup_steps, seed)
                acc = accuracy(model, *ds.test)
                pick = generator_for(seed, 77)
                for b in range(settings.quality_batches):
                    idx = torch.randperm(len(x_all), generator=pick)[:BATCH]
                    xb, yb = x_all[idx], y_all[idx]
                    model.zero_grad(set_to_none=True)
                    Backprop(model).loss_and_grads(ce, xb, yb)
                    true = layer_grads(model)
                    for mi, key in enumerate(settings.methods):
                        if key == "bp":
                            continue
                        for li, level in enumerate(levels):
                            gen = generator_for(seed, b, li, mi, 5)
                            est = build_estimator(key, model, gen, level)
                            model.zero_grad(set_to_none=True)
                            t = time.process_time()
                            est.loss_and_grads(ce, xb, yb)
                            dt = time.process_time() - t
                            got = layer_grads(model)
                            cos = {n: cosine(got[n], true[n]) for n in true}
                            rows_out.append({
                                "model": model_name, "dataset": data_name, "state": state,
                                "test_acc_at_state": acc, "method": key, "level": level,
                                "config": describe(key, model, level), "seed": seed,
                                "batch": b, "rows_per_example": est.last_forward_rows / BATCH,
                                "cpu_s": dt, "cosine": cos,
                                "mean_cosine": statistics.fmean(cos.values()),
                            })
                    model.zero_grad(set_to_none=True)
                progress(f"quality {model_name} seed {seed} {state} done", verbose)
    return rows_out


def bp_warmup(model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = generator_for(seed, 91)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        opt.zero_grad(set_to_none=True)
        ce(model(x[idx]), y[idx]).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def summarize_quality(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over batches per seed, then mean ± std over seeds, per (model, state, method,
    level) and layer."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["state"], r["method"], r["level"]), {}).setdefault(
            r["seed"], []).append(r)
    out = []
    for (model, state, method, level), by_seed in groups.items():
        layers = list(next(iter(by_seed.values()))[0]["cosine"])
        per_seed = {n: [statistics.fmean(r["cosine"][n] for r in rs) for rs in by_seed.values()]
                    for n in layers}
        mean_seed = [statistics.fmean(r["mean_cosine"] for r in rs) for rs in by_seed.values()]
        rpe = [statistics.fmean(r["rows_per_example"] for r in rs) for rs in by_seed.values()]
        first = next(iter(by_seed.values()))[0]
        out.append({
            "model": model, "state": state, "method": method, "level": level,
            "config": first["config"], "rows_per_example": statistics.fmean(rpe),
            "layers": {n: mean_std(v) for n, v in per_seed.items()},
            "mean_cosine": mean_std(mean_seed), "seeds": len(by_seed),
            "cpu_s": statistics.fmean(r["cpu_s"] for rs in by_seed.values() for r in rs),
        })
    return out


def quality_floor(summary: list[dict[str, Any]], model: str = "mlp") -> list[dict[str, Any]]:
    """Per level, state and layer: ULR-best cosine / ES cosine and / SPSA cosine (the issue's
    floor is >= 2 on the MLP). A peer cosine <= 0 gives ``inf`` when ULR's is positive."""
    index = {(s["model"], s["state"], s["method"], s["level"]): s for s in summary}
    out = []
    for (m, state, method, level), s in index.items():
        if m != model or method != "ulr":
            continue
        for peer in ("es", "spsa"):
            p = index.get((m, state, peer, level))
            if p is None:
                continue
            for layer, (cu, _) in s["layers"].items():
                cp = p["layers"][layer][0]
                ratio = cu / cp if cp > 0 else (math.inf if cu > 0 else float("nan"))
                out.append({"state": state, "level": level, "peer": peer, "layer": layer,
                            "ulr": cu, "peer_cos": cp, "ratio": ratio,
                            "ulr_rows": s["rows_per_example"],
                            "peer_rows": p["rows_per_example"]})
    return out

