"""``ulr bench``: ULR side by side with backprop, ES, SPSA/MeZO and forward gradient.

One run measures, on one machine and in one process, and writes one report
(``peers-report.md``, ``peers-report.json`` and ``peers-*.png`` under ``--out``):

* **gradient quality** — per-layer cosine between each estimate and the exact minibatch gradient
  (backprop) against the forward rows spent, on an MLP (digits) and LeNet-5 (MNIST subset), at
  initialisation and after a short backprop warm-up;
* **time-to-accuracy** — test accuracy against training time and against forward rows, with the
  same model, initial weights, data order and time budget for every method, each method's Adam
  learning rate tuned on a small grid (chosen on validation accuracy of seed 0);
* **cost** — time per step, forward rows per step and peak memory per step;
* **robustness** — every number over 3 seeds (mean ± sample standard deviation).

Forward rows count as in :class:`ulr.LikelihoodRatio`: examples × forward evaluations (the clean
discovery pass, every perturbed copy, every ES member, both SPSA points, every JVP).

Training time is the **CPU time** of this process spent in ``loss_and_grads`` + ``step`` with
one torch thread: it equals wall time on an idle core and, unlike wall time, does not depend on
what else runs on a shared machine. Evaluation is not counted.

Run ``ulr bench --out docs/results`` (or ``python -m ulr.evaluate.bench``), ``--quick`` for a
reduced version, ``--smoke`` for a seconds-long check. ``benchmarks/peers_quality.py`` and
``benchmarks/peers_training.py`` run one part each.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__, baselines, plans
from ..estimator import LikelihoodRatio
from ..noise import Gaussian
from ..peers import SPSA, Backprop, EvolutionStrategies, ForwardGradient
from ..samplers import antithetic, iid

__all__ = [
    "METHODS",
    "Settings",
    "build_estimator",
    "cost",
    "gradient_quality",
    "main",
    "time_to_accuracy",
    "write_report",
]

BATCH = 32
ES_SIGMA = 0.02
SPSA_EPS = 1e-3


def ce(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy, the loss of every benchmark."""
    return F.cross_entropy(outputs, targets, reduction="none")


# -- methods ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A benchmarked estimator.

    Attributes:
        key: short name used in tables and JSON.
        label: what it is, for the report.
        build: ``build(model, generator, rows_per_example) -> estimator``. With
            ``rows_per_example=None`` the training configuration; otherwise the configuration
            whose forward rows per example come as close to it as the method allows.
    """

    key: str
    label: str
    build: Callable[[nn.Module, torch.Generator, int | None], Any]


def _site_sigma(model: nn.Module) -> dict[str, Any]:
    cfg = model.ulr_config() if hasattr(model, "ulr_config") else None
    if cfg is None:
        return {"*": Gaussian(0.1)}
    return {name: Gaussian(s) for name, s in cfg["sigma"].items()}


def _num_sites(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))


def _train_copies(model: nn.Module) -> int:
    # Per-layer copies of the layer-wise plan in training; convolutional nets get fewer
    # because each of their passes is far more expensive on a CPU.
    return 8 if any(isinstance(m, nn.Conv2d) for m in model.modules()) else 16


def _ulr_best(model, generator, rows):
    # Sized by rows: 1 clean discovery pass + one pass of K copies per site.
    k = (_train_copies(model) if rows is None
         else max(4, 2 * ((rows - 1) // _num_sites(model) // 2)))
    return LikelihoodRatio(model, noise=_site_sigma(model), num_copies=k, sampler=antithetic(),
                           baseline=baselines.leave_one_out(), plan=plans.layerwise(),
                           generator=generator)


def _ulr_iid(model, generator, rows):
    k = 32 if rows is None else max(1, rows)
    return LikelihoodRatio(model, noise=_site_sigma(model), num_copies=k, sampler=iid(),
                           baseline=baselines.none(), plan=plans.all_sites(),
                           generator=generator)


def _es(model, generator, rows):
    pop = 32 if rows is None else max(2, 2 * (rows // 2))
    return EvolutionStrategies(model, sigma=ES_SIGMA, population=pop, generator=generator)


def _spsa(model, generator, rows):
    n = 1 if rows is None else max(1, rows // 2)
    return SPSA(model, eps=SPSA_EPS, num_directions=n, generator=generator)


def _fg(model, generator, rows):
    return ForwardGradient(model, num_tangents=1 if rows is None else max(1, rows),
                           generator=generator)


def _bp(model, generator, rows):
    return Backprop(model)


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("bp", "backprop (exact minibatch gradient)", _bp),
    Method("ulr", "ULR best: layer-wise plan, antithetic pairs, leave-one-out baseline", _ulr_best),
    Method("ulr-iid", "ULR plain: all sites in one pass, i.i.d. noise, no baseline", _ulr_iid),
    Method("es", f"ES: antithetic Gaussian weight noise σ={ES_SIGMA}, centered ranks", _es),
    Method("spsa", f"SPSA/MeZO: two-point Gaussian, ε={SPSA_EPS:g}", _spsa),
    Method("fg", "forward gradient: torch.func.jvp, Gaussian tangents", _fg),
)}


def build_estimator(key: str, model: nn.Module, generator: torch.Generator,
                    rows_per_example: int | None = None) -> Any:
    """The benchmark's estimator ``key`` (one of :data:`METHODS`) for ``model``."""
    if key not in METHODS:
        raise ValueError(f"unknown method {key!r}; choose from {list(METHODS)}")
    return METHODS[key].build(model, generator, rows_per_example)


def describe(key: str, model: nn.Module, rows_per_example: int | None = None) -> str:
    """The estimator's configuration in words (copies, population, directions...)."""
    est = build_estimator(key, model, torch.Generator().manual_seed(0), rows_per_example)
    if isinstance(est, LikelihoodRatio):
        plan = "layer-wise" if isinstance(est.plan, plans._Layerwise) else "all sites"
        return f"K={est.num_copies} copies per {'layer' if plan == 'layer-wise' else 'pass'}"
    if isinstance(est, EvolutionStrategies):
        return f"population {est.population}"
    if isinstance(est, SPSA):
        return f"{est.num_directions} direction(s)"
    if isinstance(est, ForwardGradient):
        return f"{est.num_tangents} tangent(s)"
    return "exact"


# -- settings -----------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything one bench run depends on (written to the JSON report).

    Attributes:
        seeds: model/data/noise seeds; every number is over all of them.
        methods: keys of :data:`METHODS` to run.
        quality_models: ``(model, dataset)`` pairs for gradient quality.
        quality_levels: forward rows per example to spend, per quality model.
        quality_batches: minibatches per seed and state.
        quality_warmup_steps: backprop Adam steps before the "trained" state (0: init only).
        tta: ``(dataset, model, budget_seconds)`` time-to-accuracy settings.
        lr_grid: Adam learning rates tried for every method.
        lr_extend: at most this many extra rates per method and setting, one ladder step
            beyond the grid's edge while the best rate is at the edge (see :func:`choose_lr`).
        eval_fractions: fractions of the budget at which the test accuracy is recorded.
        cost_steps: timed steps per estimator in the cost table.
        threads: torch intra-op threads.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    quality_models: tuple[tuple[str, str], ...] = (("mlp", "digits"), ("lenet5", "mnist-subset"))
    quality_levels: dict[str, tuple[int, ...]] = field(default_factory=lambda: {
        "mlp": (9, 33, 129, 513), "lenet5": (21, 81, 321)})
    quality_batches: int = 3
    quality_warmup_steps: int = 150
    tta: tuple[tuple[str, str, float], ...] = (
        ("digits", "mlp", 6.0), ("digits", "lenet5", 10.0),
        ("mnist-subset", "mlp", 12.0), ("mnist-subset", "lenet5", 20.0),
        ("fashion-mnist", "mlp", 20.0), ("fashion-mnist", "lenet5", 24.0))
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    lr_extend: int = 2
    eval_fractions: tuple[float, ...] = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
    cost_steps: int = 10
    threads: int = 1

    @classmethod
    def quick(cls) -> Settings:
        return cls(quality_levels={"mlp": (9, 33, 129), "lenet5": (21, 81)}, quality_batches=2,
                   quality_warmup_steps=100,
                   tta=(("digits", "mlp", 3.0), ("fashion-mnist", "mlp", 4.0),
                        ("digits", "lenet5", 4.0)),
                   lr_grid=(3e-3,), lr_extend=0, eval_fractions=(0.25, 0.5, 1.0),
                   cost_steps=5)

    @classmethod
    def smoke(cls) -> Settings:
        return cls(seeds=(0, 1), quality_models=(("mlp", "digits"),),
                   quality_levels={"mlp": (9,)}, quality_batches=1, quality_warmup_steps=2,
                   tta=(("digits", "mlp", 0.1),), lr_grid=(3e-3,), lr_extend=0,
                   eval_fractions=(0.5, 1.0),
                   cost_steps=1)


# -- helpers ------------------------------------------------------------------------------------
_DATA: dict[tuple[str, int], Any] = {}


def _dataset(name: str, seed: int):
    from .. import data

    key = (name, seed)
    if key not in _DATA:
        if len(_DATA) > 6:  # Fashion-MNIST is 200 MB per seed: keep a few
            _DATA.clear()
        _DATA[key] = data.load(name, seed=seed)
    return _DATA[key]


def _model(name: str, ds, seed: int) -> nn.Module:
    from .. import models

    # The same initial weights for every method of one seed; the caller's global RNG is kept.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        return models.build(name, in_shape=ds.input_shape, num_classes=ds.num_classes)


def _gen(*key: int) -> torch.Generator:
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**62)
    return torch.Generator().manual_seed(seed)


def _layers(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    return [(name, list(m.parameters(recurse=False))) for name, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))]


def _layer_grads(model: nn.Module) -> dict[str, Tensor]:
    return {name: torch.cat([p.grad.flatten() for p in ps]) for name, ps in _layers(model)}


def _cosine(a: Tensor, b: Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pm(values: Sequence[float], fmt: str = ".3f", scale: float = 1.0) -> str:
    m, s = _mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m * scale:{fmt}} ± {s * scale:{fmt}}"


def _evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 1000) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            correct += int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum())
    return correct / max(1, len(x))


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


# -- gradient quality ---------------------------------------------------------------------------
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
            ds = _dataset(data_name, seed)
            x_all, y_all = ds.train
            model = _model(model_name, ds, seed)
            states = ["init"] + (["trained"] if settings.quality_warmup_steps > 0 else [])
            for state in states:
                if state == "trained":
                    _bp_warmup(model, x_all, y_all, settings.quality_warmup_steps, seed)
                acc = _evaluate(model, *ds.test)
                pick = _gen(seed, 77)
                for b in range(settings.quality_batches):
                    idx = torch.randperm(len(x_all), generator=pick)[:BATCH]
                    xb, yb = x_all[idx], y_all[idx]
                    model.zero_grad(set_to_none=True)
                    Backprop(model).loss_and_grads(ce, xb, yb)
                    true = _layer_grads(model)
                    for mi, key in enumerate(settings.methods):
                        if key == "bp":
                            continue
                        for li, level in enumerate(levels):
                            est = build_estimator(key, model, _gen(seed, b, li, mi, 5), level)
                            model.zero_grad(set_to_none=True)
                            t = time.process_time()
                            est.loss_and_grads(ce, xb, yb)
                            dt = time.process_time() - t
                            got = _layer_grads(model)
                            cos = {n: _cosine(got[n], true[n]) for n in true}
                            rows_out.append({
                                "model": model_name, "dataset": data_name, "state": state,
                                "test_acc_at_state": acc, "method": key, "level": level,
                                "config": describe(key, model, level), "seed": seed,
                                "batch": b, "rows_per_example": est.last_forward_rows / BATCH,
                                "cpu_s": dt, "cosine": cos,
                                "mean_cosine": statistics.fmean(cos.values()),
                            })
                    model.zero_grad(set_to_none=True)
                _log(f"quality {model_name} seed {seed} {state} done", verbose)
    return rows_out


def _bp_warmup(model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = _gen(seed, 91)
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
            "layers": {n: _mean_std(v) for n, v in per_seed.items()},
            "mean_cosine": _mean_std(mean_seed), "seeds": len(by_seed),
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


# -- time to accuracy ---------------------------------------------------------------------------
def train_run(dataset: str, model_name: str, method: str, lr: float, seed: int,
              budget_s: float, eval_fractions: Sequence[float]) -> dict[str, Any]:
    """Train one model with one estimator and Adam(lr) for ``budget_s`` CPU seconds.

    Returns:
        ``curve`` (list of ``{cpu_s, wall_s, rows, steps, test_acc}``, the first at 0),
        ``final_test_acc``, ``final_val_acc``, ``steps``, ``rows``, ``epochs`` and ``diverged``
        (a non-finite loss stopped the run; the accuracy is that of the last finite weights).
    """
    ds = _dataset(dataset, seed)
    x, y = ds.train
    xv, yv = ds.val
    xt, yt = ds.test
    model = _model(model_name, ds, seed)
    est = build_estimator(method, model, _gen(seed, 2))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data_gen = _gen(seed, 1)
    from ..data import batches

    marks = sorted({min(1.0, max(0.0, f)) for f in eval_fractions})
    curve = [{"cpu_s": 0.0, "wall_s": 0.0, "rows": 0, "steps": 0,
              "test_acc": _evaluate(model, xt, yt)}]
    cpu = wall = 0.0
    rows = steps = examples = 0
    diverged = False
    next_mark = 0
    while next_mark < len(marks) and not diverged:
        for xb, yb in batches(x, y, BATCH, shuffle=True, generator=data_gen):
            t_cpu, t_wall = time.process_time(), time.perf_counter()
            opt.zero_grad(set_to_none=True)
            try:
                loss = est.loss_and_grads(ce, xb, yb)
            except ValueError as e:  # non-finite losses: the run diverged
                if "non-finite" not in str(e):
                    raise
                diverged = True
            else:
                if not all(torch.isfinite(p.grad).all() for p in model.parameters()
                           if p.grad is not None) or not math.isfinite(float(loss)):
                    diverged = True
                else:
                    opt.step()
            cpu += time.process_time() - t_cpu
            wall += time.perf_counter() - t_wall
            rows += est.last_forward_rows
            steps += 1
            examples += len(xb)
            while next_mark < len(marks) and (cpu >= marks[next_mark] * budget_s or diverged):
                curve.append({"cpu_s": cpu, "wall_s": wall, "rows": rows, "steps": steps,
                              "test_acc": _evaluate(model, xt, yt)})
                next_mark += 1
            if next_mark >= len(marks) or diverged:
                break
    return {"dataset": dataset, "model": model_name, "method": method, "lr": lr, "seed": seed,
            "budget_s": budget_s, "curve": curve, "final_test_acc": curve[-1]["test_acc"],
            "final_val_acc": _evaluate(model, xv, yv) if len(xv) else float("nan"),
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
        _log(f"tta {dataset}/{model_name} {method} lr={lr:g} seed={first}: "
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
                _log(f"tta {dataset}/{model_name} {method} lr={best[method]:g} seed={seed}: "
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


# -- cost ---------------------------------------------------------------------------------------
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


def _peak_step_memory(step: Callable[[], None]) -> float:
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
        ds = _dataset(shapes.get(model_name, "digits"), settings.seeds[0])
        x, y = ds.train
        xb, yb = x[:BATCH], y[:BATCH]
        for method in settings.methods:
            model = _model(model_name, ds, settings.seeds[0])
            est = build_estimator(method, model, _gen(0, 3))
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
            peak = _peak_step_memory(step)
            params = sum(p.numel() for p in model.parameters())
            out.append({"model": model_name, "input": list(ds.input_shape), "method": method,
                        "config": describe(method, model), "params": params,
                        "rows_per_step": est.last_forward_rows,
                        "cpu_ms": 1e3 * statistics.median(cpu),
                        "wall_ms": 1e3 * statistics.median(wall), "peak_mb": peak / 2**20,
                        "weights_mb": params * 4 / 2**20})
            _log(f"cost {model_name} {method}: {out[-1]['cpu_ms']:.1f} ms, "
                 f"{out[-1]['peak_mb']:.2f} MB", verbose)
    return out


# -- report -------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    """``HEAD``'s short hash (``+dirty`` with uncommitted changes) of the source tree, if any."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                              capture_output=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."],
                               cwd=here, text=True, capture_output=True, timeout=10).stdout
        return head.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "commit": _git_commit(),
            "python": platform.python_version(), "torch": torch.__version__, "ulr": __version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _fmt_ratio(r: float) -> str:
    return "∞" if r == math.inf else ("n/a" if math.isnan(r) else f"{r:.1f}×")


def write_report(result: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    """Write ``peers-report.json``, ``peers-report.md`` and the ``peers-*.png`` plots."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "peers-report.json"]
    files[0].write_text(json.dumps(result, indent=1, default=_json_default))
    figs = _plots(result, out) if plots else {}
    files += list(figs.values())
    md = out / "peers-report.md"
    md.write_text(_markdown(result, figs))
    files.append(md)
    return files


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _markdown(result: dict[str, Any], figs: dict[str, Path]) -> str:
    m, st = result["machine"], result["settings"]
    lines = [
        "# ULR and its peers: gradient quality, time-to-accuracy, cost",
        "",
        f"Generated by `{result['command']}` on {result['date']} in "
        f"{result['wall_s'] / 60:.1f} min (wall).",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores (shared), {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}, ulr {m['ulr']} (commit "
        f"{m.get('commit') or 'unknown'}); torch threads: "
        f"{st['threads']}; load average at start {result['load_start']}, at end "
        f"{result['load_end']}.",
        "",
        f"Seeds {list(st['seeds'])}; ± is the sample standard deviation over seeds. Forward "
        f"rows = examples × forward evaluations. Training time is the process CPU time spent in "
        f"`loss_and_grads` + `optimizer.step()` (one torch thread, evaluation excluded): equal "
        f"to wall time on an idle core, and not inflated by other jobs on a shared machine.",
        "",
        "Methods:",
        "",
    ]
    for key in st["methods"]:
        lines.append(f"- `{key}`: {METHODS[key].label}")
    lines.append("")
    if result.get("quality"):
        lines += _md_quality(result, figs)
    if result.get("tta"):
        lines += _md_tta(result, figs)
    if result.get("cost"):
        lines += _md_cost(result)
    if result.get("floors"):
        lines += ["## Floors", ""] + result["floors"] + [""]
    return "\n".join(lines) + "\n"


def _md_quality(result, figs) -> list[str]:
    summary = result["quality_summary"]
    st = result["settings"]
    lines = ["## Gradient quality", "",
             "Cosine between each estimate and the exact gradient of the same minibatch (32 "
             "examples), per layer (weight and bias together), mean over "
             f"{st['quality_batches']} minibatches per seed, then mean ± std over seeds. "
             "`rows/ex` is the forward rows per example the estimate actually spent (the level "
             "it was sized for in brackets). `init`: default initialisation; `trained`: after "
             f"{st['quality_warmup_steps']} backprop Adam steps (test accuracy in the heading).",
             ""]
    for model_name, data_name in st["quality_models"]:
        for state in ("init", "trained"):
            rows = [s for s in summary if s["model"] == model_name and s["state"] == state]
            if not rows:
                continue
            acc = [r["test_acc_at_state"] for r in result["quality"]
                   if r["model"] == model_name and r["state"] == state]
            layers = list(rows[0]["layers"])
            lines += [f"### {model_name} on {data_name}, {state} "
                      f"(test accuracy {statistics.fmean(acc):.3f})", "",
                      "| method | config | rows/ex | mean over layers | "
                      + " | ".join(f"`{n}`" for n in layers) + " |",
                      "|---|---|---|---|" + "---|" * len(layers)]
            for r in sorted(rows, key=lambda r: (list(METHODS).index(r["method"]), r["level"])):
                cells = [f"{r['layers'][n][0]:.3f} ± {r['layers'][n][1]:.3f}" for n in layers]
                lines.append(f"| {r['method']} | {r['config']} | {r['rows_per_example']:.0f} "
                             f"[{r['level']}] | {r['mean_cosine'][0]:.3f} ± "
                             f"{r['mean_cosine'][1]:.3f} | " + " | ".join(cells) + " |")
            lines.append("")
        if f"quality-{model_name}" in figs:
            lines += [f"![gradient quality, {model_name}]({figs[f'quality-{model_name}'].name})",
                      ""]
    return lines


def _md_tta(result, figs) -> list[str]:
    st = result["settings"]
    lines = ["## Time to accuracy", "",
             f"Adam, batch {BATCH}, the same initial weights, data order and CPU-time budget "
             f"for every method. Learning rate grid {list(st['lr_grid'])} for every method, "
             f"extended by one half-decade step ({', '.join(f'{v:g}' for v in LR_LADDER)}) "
             f"beyond an edge while the best rate is at that edge, at most "
             f"{st.get('lr_extend', 0)} times; chosen by final validation accuracy on seed "
             f"{st['seeds'][0]}; the other seeds rerun the chosen rate. Final test accuracy at "
             "the end of the budget (mean ± std "
             "over seeds). `epochs` = training examples drawn / training-set size; Fashion-MNIST "
             "minibatches are drawn from its full 54,000-image training split (not subsampled), "
             "so within the budget no method sees more than the `epochs` column says. `wall s`: "
             "the wall time the same work took on the shared machine. `val@lr`: seed-"
             f"{st['seeds'][0]} validation accuracy of each rate tried (– not tried); a "
             "chosen rate marked † is still at an edge of the rates tried.",
             ""]
    summary = result["tta_summary"]
    for dataset, model_name, budget in st["tta"]:
        rows = [s for s in summary if s["dataset"] == dataset and s["model"] == model_name]
        if not rows:
            continue
        grid = sorted({lr for r in rows for lr in r["grid"]})
        lines += [f"### {dataset}, {model_name}, {budget:g} s per run", "",
                  "| method | config | lr | test acc | steps | rows | epochs | wall s | "
                  + " | ".join(f"val@{lr:g}" for lr in grid) + " |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(grid)]
        for r in sorted(rows, key=lambda r: list(METHODS).index(r["method"])):
            lr = f"{r['lr']:g}" + ("†" if r["lr_at_grid_edge"] else "")
            div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
            cfg = result["configs"].get(f"{model_name}/{r['method']}", "")
            lines.append(
                f"| {r['method']} | {cfg} | {lr} | {_pm(r['final_test_acc'])}{div} | "
                f"{statistics.fmean(r['steps']):.0f} | {statistics.fmean(r['rows']):.3g} | "
                f"{statistics.fmean(r['epochs']):.2f} | {statistics.fmean(r['wall_s']):.1f} | "
                + " | ".join(f"{r['grid'][g]:.3f}" if g in r["grid"] else "–" for g in grid)
                + " |")
        lines.append("")
        key = f"tta-{dataset}-{model_name}"
        if key in figs:
            lines += [f"![time to accuracy, {dataset}, {model_name}]({figs[key].name})", ""]
    return lines


def _md_cost(result) -> list[str]:
    lines = ["## Cost per step", "",
             f"Training configuration, batch {BATCH}, one step = `loss_and_grads` + Adam step, "
             "median over the timed steps. Peak memory: the largest net CPU allocation during "
             "one step, from the torch profiler's allocation events (model weights, data and "
             "memory held before the step not counted; the weights' size is given for scale).",
             "", "| model | method | config | rows/step | CPU ms/step | wall ms/step | "
             "µs CPU per row | peak MB | weights MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["cost"]:
        lines.append(f"| {r['model']} | {r['method']} | {r['config']} | {r['rows_per_step']} | "
                     f"{r['cpu_ms']:.2f} | {r['wall_ms']:.2f} | "
                     f"{1e3 * r['cpu_ms'] / r['rows_per_step']:.1f} | {r['peak_mb']:.2f} | "
                     f"{r['weights_mb']:.2f} |")
    return lines + [""]


def floors(result: dict[str, Any]) -> list[str]:
    """The issue's floors, checked on the measured numbers (sentences for the report)."""
    lines = []
    q = result.get("quality_floor") or []
    if q:
        for peer in ("es", "spsa"):
            for state in ("init", "trained"):
                rs = [r for r in q if r["peer"] == peer and r["state"] == state]
                if not rs:
                    continue
                worst = min(rs, key=lambda r: r["ratio"] if not math.isnan(r["ratio"]) else -1)
                holds = all(r["ratio"] >= 2 for r in rs)
                lines.append(
                    f"- Gradient cosine, MLP, {state}, ULR best vs {peer.upper()} at equal "
                    f"forward rows, every layer and level: "
                    f"**{'holds' if holds else 'does not hold'}** (smallest ratio "
                    f"{_fmt_ratio(worst['ratio'])}: layer `{worst['layer']}`, level "
                    f"{worst['level']}, {worst['ulr']:.3f} vs {worst['peer_cos']:.3f}).")
    summary = result.get("tta_summary") or []
    for dataset in ("digits", "fashion-mnist"):
        by = {s["method"]: s for s in summary if s["dataset"] == dataset and s["model"] == "mlp"}
        if "ulr" not in by:
            continue
        u = by["ulr"]["final_test_acc"]
        for peer in ("es", "spsa"):
            if peer not in by:
                continue
            p = by[peer]["final_test_acc"]
            holds = statistics.fmean(u) > statistics.fmean(p)
            per_seed = sum(a > b for a, b in zip(u, p, strict=False))
            lines.append(
                f"- {dataset} MLP, final test accuracy at equal training time, ULR best vs "
                f"{peer.upper()}: **{'holds' if holds else 'does not hold'}** "
                f"({_pm(u)} vs {_pm(p)}; ULR ahead on {per_seed}/{min(len(u), len(p))} seeds).")
    return lines


def _plots(result: dict[str, Any], out: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return {}
    colors = {"bp": "black", "ulr": "tab:red", "ulr-iid": "tab:orange", "es": "tab:blue",
              "spsa": "tab:green", "fg": "tab:purple"}
    figs = {}
    summary = result.get("quality_summary") or []
    for model_name, _ in result["settings"]["quality_models"]:
        rows = [s for s in summary if s["model"] == model_name]
        if not rows:
            continue
        states = sorted({r["state"] for r in rows}, key=["init", "trained"].index)
        layers = list(rows[0]["layers"])
        fig, axes = plt.subplots(len(states), len(layers) + 1, squeeze=False,
                                 figsize=(3.2 * (len(layers) + 1), 2.8 * len(states)))
        for i, state in enumerate(states):
            for j, layer in enumerate(["mean over layers", *layers]):
                ax = axes[i][j]
                for method in result["settings"]["methods"]:
                    rs = sorted((r for r in rows if r["state"] == state and r["method"] == method),
                                key=lambda r: r["level"])
                    if not rs:
                        continue
                    xs = [r["rows_per_example"] for r in rs]
                    vals = [r["mean_cosine"] if j == 0 else r["layers"][layer] for r in rs]
                    ax.errorbar(xs, [v[0] for v in vals], yerr=[v[1] for v in vals],
                                label=method, color=colors.get(method), marker="o", ms=3,
                                capsize=2)
                ax.set_xscale("log")
                levels = sorted({r["level"] for r in rows})
                ax.set_xticks(levels, [f"{v:.0f}" for v in levels])
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.tick_params(labelsize=7)
                ax.set_title(f"{state}: {layer}", fontsize=8)
                ax.grid(alpha=0.3)
                if i == len(states) - 1:
                    ax.set_xlabel("forward rows per example")
                if j == 0:
                    ax.set_ylabel("cosine with true gradient")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"peers-quality-{model_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figs[f"quality-{model_name}"] = path

    runs = [r for r in result.get("tta") or [] if r.get("selected")]
    for dataset, model_name, _ in result["settings"]["tta"]:
        rs = [r for r in runs if r["dataset"] == dataset and r["model"] == model_name]
        if not rs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for method in result["settings"]["methods"]:
            mr = [r for r in rs if r["method"] == method]
            if not mr:
                continue
            n = min(len(r["curve"]) for r in mr)
            for ax, xkey in zip(axes, ("cpu_s", "rows"), strict=True):
                points = range(n) if xkey == "cpu_s" else range(1, n)  # no 0 on a log axis
                xs = [statistics.fmean(r["curve"][i][xkey] for r in mr) for i in points]
                ms = [_mean_std([r["curve"][i]["test_acc"] for r in mr]) for i in points]
                ax.plot(xs, [m for m, _ in ms], color=colors.get(method), marker="o", ms=3,
                        label=f"{method} (lr {mr[0]['lr']:g})")
                ax.fill_between(xs, [m - s for m, s in ms], [m + s for m, s in ms],
                                color=colors.get(method), alpha=0.15)
        axes[0].set_xlabel("training CPU seconds")
        axes[1].set_xlabel("forward rows")
        axes[1].set_xscale("log")
        axes[1].xaxis.set_minor_formatter(NullFormatter())
        for ax in axes:
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{dataset}, {model_name}", fontsize=10)
        fig.tight_layout()
        path = out / f"peers-tta-{dataset}-{model_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figs[f"tta-{dataset}-{model_name}"] = path
    return figs


# -- entry point --------------------------------------------------------------------------------
PARTS = ("quality", "tta", "cost")


def run(settings: Settings, parts: Sequence[str] = PARTS, *, command: str = "",
        verbose: bool = False, checkpoint: Path | None = None) -> dict[str, Any]:
    """Run the chosen parts with ``settings``; return the result that :func:`write_report`
    writes. With ``checkpoint``, the result so far is written there as JSON after each part."""

    def save(result):
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(json.dumps(result, default=_json_default))

    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    try:
        result: dict[str, Any] = {
            "command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(), "settings": asdict(settings), "load_start": load_start,
        }
        probe = {}
        for model_name, data_name in {*settings.quality_models,
                                      *((m, d) for d, m, _ in settings.tta)}:
            probe[model_name] = _model(model_name, _dataset(data_name, settings.seeds[0]), 0)
        result["configs"] = {f"{m}/{k}": describe(k, model) for m, model in probe.items()
                             for k in settings.methods}
        if "quality" in parts:
            result["quality"] = gradient_quality(settings, verbose)
            result["quality_summary"] = summarize_quality(result["quality"])
            result["quality_floor"] = quality_floor(result["quality_summary"])
            save(result)
        if "tta" in parts:
            result["tta"] = time_to_accuracy(settings, verbose)
            result["tta_summary"] = summarize_tta(result["tta"])
            save(result)
        if "cost" in parts:
            result["cost"] = cost(settings, verbose)
        result["floors"] = floors(result)
        result["load_end"] = ([round(v, 2) for v in os.getloadavg()]
                              if hasattr(os, "getloadavg") else None)
        result["wall_s"] = time.perf_counter() - start
        return result
    finally:
        torch.set_num_threads(previous)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ulr bench",
        description="Benchmark ULR against backprop, ES, SPSA/MeZO and forward gradient: "
                    "gradient quality, time-to-accuracy and cost, in one report "
                    "(markdown + JSON + PNG).")
    p.add_argument("--out", default="bench-results",
                   help="directory for peers-report.{md,json} and peers-*.png "
                        "(default: %(default)s)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="reduced budgets, grid and levels (a few minutes on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="seconds-long check (for tests)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="which parts to run (default: all)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help="which methods (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--from-json", metavar="FILE",
                   help="measure nothing: rewrite the markdown and plots from a "
                        "peers-report.json written by an earlier run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.smoke() if args.smoke else Settings.quick() if args.quick else Settings()
    if args.methods:
        s.methods = tuple(args.methods)
    if args.seeds:
        if args.seeds < 1:
            raise SystemExit("--seeds must be >= 1")
        s.seeds = tuple(range(args.seeds))
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    s.threads = args.threads
    return s


def main(argv: list[str] | None = None) -> int:
    """``ulr bench`` entry point: run the benchmark and write the report; returns 0."""
    args = parser().parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        # JSON turns float keys into strings and tuples into lists: summarise the raw rows again.
        if result.get("quality"):
            result["quality_summary"] = summarize_quality(result["quality"])
            result["quality_floor"] = quality_floor(result["quality_summary"])
        if result.get("tta"):
            result["tta_summary"] = summarize_tta(result["tta"])
        result["floors"] = floors(result)
        files = write_report(result, Path(args.out), plots=not args.no_plots)
        if not args.quiet:
            print("wrote " + ", ".join(str(f) for f in files))
        return 0
    settings = settings_from(args)
    prog = "python -m ulr.evaluate.bench" if sys.argv[0].endswith("bench.py") else "ulr bench"
    command = prog + " " + " ".join(sys.argv[1:] if argv is None else argv)
    partial = Path(args.out) / "peers-report.partial.json"
    result = run(settings, args.parts, command=command.strip(), verbose=not args.quiet,
                 checkpoint=partial)
    files = write_report(result, Path(args.out), plots=not args.no_plots)
    partial.unlink(missing_ok=True)
    if not args.quiet:
        for line in result["floors"]:
            print(line)
        print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
