"""Time to accuracy: train every method for the same CPU-time budget (the same initial
weights and data order), with its Adam learning rate tuned on seed 0, and summarise."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .harness import (
    BATCH,
    accuracy,
    ce,
    generator_for,
    initial_model,
    load_dataset,
    progress,
)
from .methods import build_estimator
from .settings import Settings


def train_step(model: nn.Module, estimator: Any, optimizer: torch.optim.Optimizer,
               x: Tensor, y: Tensor) -> bool:
    """One training step: estimate the gradients into ``.grad`` and step the optimizer.

    Returns:
        ``False`` when the loss or a gradient is not finite (the run diverged; the weights are
        left as they were), else ``True``.
    """
    optimizer.zero_grad(set_to_none=True)
    try:
        loss = estimator.loss_and_grads(ce, x, y)
    except ValueError as e:  # the estimators refuse non-finite losses: the run diverged
        if "non-finite" not in str(e):
            raise
        return False
    if not all(torch.isfinite(p.grad).all() for p in model.parameters()
               if p.grad is not None) or not math.isfinite(float(loss)):
        return False
    optimizer.step()
    return True


def minibatches(x: Tensor, y: Tensor, generator: torch.Generator) -> Iterator[tuple]:
    """Minibatches of :data:`~.harness.BATCH` examples, reshuffled every epoch, without end."""
    from ...data import batches

    while True:
        yield from batches(x, y, BATCH, shuffle=True, generator=generator)


def train_run(dataset: str, model_name: str, method: str, lr: float, seed: int,
              budget_s: float, eval_fractions: Sequence[float]) -> dict[str, Any]:
    """Train one model with one estimator and Adam(lr) for ``budget_s`` CPU seconds.

    Returns:
        ``curve`` (list of ``{cpu_s, wall_s, rows, steps, test_acc}``, the first at 0),
        ``final_test_acc``, ``final_val_acc``, ``steps``, ``rows``, ``epochs`` and ``diverged``
        (a non-finite loss stopped the run; the accuracy is that of the last finite weights).
    """
    ds = load_dataset(dataset, seed)
    x, y = ds.train
    xv, yv = ds.val
    xt, yt = ds.test
    model = initial_model(model_name, ds, seed)
    est = build_estimator(method, model, generator_for(seed, 2))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    stream = minibatches(x, y, generator_for(seed, 1))

    # The measuring: CPU time of the steps only; the test accuracy at each fraction of the budget.
    marks = sorted({min(1.0, max(0.0, f)) for f in eval_fractions})
    curve = [{"cpu_s": 0.0, "wall_s": 0.0, "rows": 0, "steps": 0,
              "test_acc": accuracy(model, xt, yt)}]
    cpu = wall = 0.0
    rows = steps = examples = 0
    diverged = False
    next_mark = 0
    while next_mark < len(marks) and not diverged:
        xb, yb = next(stream)
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        diverged = not train_step(model, est, opt, xb, yb)
        cpu += time.process_time() - t_cpu
        wall += time.perf_counter() - t_wall
        rows += est.last_forward_rows
        steps += 1
        examples += len(xb)
        while next_mark < len(marks) and (cpu >= marks[next_mark] * budget_s or diverged):
            curve.append({"cpu_s": cpu, "wall_s": wall, "rows": rows, "steps": steps,
                          "test_acc": accuracy(model, xt, yt)})
            next_mark += 1
    return {"dataset": dataset, "model": model_name, "method": method, "lr": lr, "seed": seed,
            "budget_s": budget_s, "curve": curve, "final_test_acc": curve[-1]["test_acc"],
            "final_val_acc": accuracy(model, xv, yv) if len(xv) else float("nan"),
            "steps": steps, "rows": rows, "epochs": examples / len(x), "diverged": diverged,
            "cpu_s": cpu, "wall_s": wall}


LR_LADDER: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def choose_lr(val_acc: dict[float, float]) -> tuple[float, float | None]:
    """The learning rate with the best validation accuracy, and the rate to try next.

    Ties go to a rate inside the tried range if there is one (else to the smaller rate). The
    next rate is the :data:`LR_LADDER` neighbour beyond the chosen rate when the chosen rate is
    at an edge of the tried range, strictly better than its inner neighbour, and the ladder goes
    on; otherwise ``None``.
    """
    tried = sorted(val_acc)
    top = max(val_acc.values())
    best = [lr for lr in tried if val_acc[lr] == top]
    inner = [lr for lr in best if tried[0] < lr < tried[-1]]
    lr = inner[0] if inner else best[0]
    if inner or len(tried) < 2:
        return lr, None
    i = tried.index(lr)
    neighbour = tried[1] if i == 0 else tried[-2]
    if val_acc[lr] <= val_acc[neighbour]:
        return lr, None
    rung = min(range(len(LR_LADDER)), key=lambda k: abs(math.log(LR_LADDER[k] / lr)))
    step = rung - 1 if i == 0 else rung + 1
    nxt = LR_LADDER[step] if 0 <= step < len(LR_LADDER) else None
    return lr, nxt if nxt is not None and nxt not in val_acc else None


def time_to_accuracy(settings: Settings, verbose: bool = False) -> list[dict[str, Any]]:
    """Tune each method's learning rate on seed ``seeds[0]``, then train the other seeds at it.

    Every method first runs ``lr_grid``; while a method's best final validation accuracy is at
    an edge of the rates it tried (and strictly better than the next rate in), its grid is
    extended one :data:`LR_LADDER` step beyond that edge, at most ``lr_extend`` times
    (:func:`choose_lr`). Methods are interleaved so that every method sees the same conditions.
    Returns every run; ``tuning=True`` marks the seed-0 grid runs, ``selected=True`` the runs at
    the chosen rate.
    """
    runs: list[dict[str, Any]] = []
    first, *rest = settings.seeds

    def tune(dataset, model_name, budget, method, lr, tried):
        r = train_run(dataset, model_name, method, lr, first, budget, settings.eval_fractions)
        tried[method].append(r)
        progress(f"tta {dataset}/{model_name} {method} lr={lr:g} seed={first}: "
             f"test {r['final_test_acc']:.3f} val {r['final_val_acc']:.3f} "
             f"steps {r['steps']}", verbose)

    for dataset, model_name, budget in settings.tta:
        tried: dict[str, list[dict]] = {m: [] for m in settings.methods}
        for lr in settings.lr_grid:
            for method in settings.methods:
                tune(dataset, model_name, budget, method, lr, tried)
        for _ in range(settings.lr_extend):
            pending = {}
            for method, rs in tried.items():
                _, nxt = choose_lr({r["lr"]: r["final_val_acc"] for r in rs})
                if nxt is not None:
                    pending[method] = nxt
            if not pending:
                break
            for method, lr in pending.items():
                tune(dataset, model_name, budget, method, lr, tried)
        best = {}
        for method, rs in tried.items():
            best[method], _ = choose_lr({r["lr"]: r["final_val_acc"] for r in rs})
            for r in rs:
                r["selected"] = r["lr"] == best[method]
                r["tuning"] = True
                runs.append(r)
        for seed in rest:
            for method in settings.methods:
                r = train_run(dataset, model_name, method, best[method], seed, budget,
                              settings.eval_fractions)
                r["selected"], r["tuning"] = True, False
                runs.append(r)
                progress(f"tta {dataset}/{model_name} {method} lr={best[method]:g} seed={seed}: "
                     f"test {r['final_test_acc']:.3f}", verbose)
    return runs


def summarize_tta(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, model, method): the selected learning rate, the final test accuracy over
    seeds, and each learning rate's seed-0 validation accuracy (the tuning grid)."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        key = (r["dataset"], r["model"], r["method"])
        s = out.setdefault(key, {"dataset": r["dataset"], "model": r["model"],
                                 "method": r["method"], "budget_s": r["budget_s"], "grid": {},
                                 "runs": []})
        if r.get("tuning"):
            s["grid"][r["lr"]] = r["final_val_acc"]
        if r.get("selected"):
            s["lr"] = r["lr"]
            s["runs"].append(r)
    result = []
    for s in out.values():
        rs = s.pop("runs")
        s["final_test_acc"] = [r["final_test_acc"] for r in rs]
        s["steps"] = [r["steps"] for r in rs]
        s["rows"] = [r["rows"] for r in rs]
        s["epochs"] = [r["epochs"] for r in rs]
        s["wall_s"] = [r["wall_s"] for r in rs]
        s["diverged"] = sum(r["diverged"] for r in rs)
        s["seeds"] = [r["seed"] for r in rs]
        grid = sorted(s["grid"])
        s["lr_at_grid_edge"] = len(grid) > 1 and s["lr"] in (grid[0], grid[-1])
        result.append(s)
    return result

