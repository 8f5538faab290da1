"""Plots of run directories (written by :func:`ulr.train.fit`) as PNG files.

* ``accuracy_vs_epoch.png`` — test (solid) and validation (dotted) accuracy per epoch; for
  regression runs the MSE, on a log scale.
* ``accuracy_vs_time.png`` — test accuracy (or MSE) against wall-clock time of the run.
* ``loss_vs_epoch.png`` — mean training loss per epoch (noisy rows for ULR), log scale.
* ``cosine.png`` — only when a run logged gradient diagnostics (``--diag-every``): per-layer
  cosine similarity of the ULR gradient with the backprop gradient over the steps (top row)
  and the norm ratio ``|g_ulr| / |g_bp|`` (bottom row), one column per run.

Drawing uses matplotlib's Agg canvas directly, never ``pyplot``, so it does not change the
caller's backend or open windows.

Example:
    >>> from ulr.evaluate.plots import load_run, plot_runs
    >>> runs = [load_run("runs/a/ulr"), load_run("runs/a/bp")]      # doctest: +SKIP
    >>> plot_runs(runs, "runs/a")                                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The run records come from .runs, the one reader of run directories in this package; they stay
# importable from here, where the figures that use them are.
from .runs import Run, expand_run_dirs, load_run

__all__ = ["Run", "expand_run_dirs", "figure", "load_run", "plot_runs", "ratio_bars"]


def figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.2) -> Any:
    """A matplotlib ``Figure`` of ``ncols`` x ``nrows`` panels of ``width`` x ``height`` inches
    each, drawn on its own Agg canvas (no ``pyplot``: the caller's backend is left alone), with
    constrained layout. Save it with ``fig.savefig(path)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _metric(run: Run, split: str) -> tuple[str, float]:
    """Key and plotting factor of a run's headline metric on ``split``."""
    return (f"{split}_loss", 1.0) if run.regression else (f"{split}_acc", 100.0)


def _series(rows: list[dict[str, Any]], x: str, y: str, scale: float) -> tuple[list, list]:
    pts = [(r[x], r[y] * scale) for r in rows if r.get(y) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _subject(runs: Sequence[Run]) -> str:
    """"mlp on digits" (or "mlp, lenet5 on digits") for the plot titles."""
    from ..train.custom import display_name

    models = list(dict.fromkeys(display_name(r.config["model"]) for r in runs
                                if r.config.get("model")))
    data = list(dict.fromkeys(display_name(r.config["data"]) for r in runs
                              if r.config.get("data")))
    return f"{', '.join(models) or '?'} on {', '.join(data) or '?'}"


def _finish(fig: Any, ax: Any, path: Path, *, log: bool) -> Path:
    """Log scale (losses), grid and legend, then write ``fig`` to ``path``."""
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def _legend(ax: Any) -> None:
    """The legend beside the axes, never over a curve."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0)


def plot_runs(runs: Sequence[Run], out_dir: str | Path, suffix: str = "") -> list[Path]:
    """Draw the comparison plots of ``runs`` into ``out_dir`` (created if needed).

    Classification runs are compared by accuracy, regression runs by MSE; a mix of both is
    drawn as two sets of plots (the regression ones with ``-regression`` in their names).

    Returns:
        The PNG files written (``cosine.png`` only if some run has diagnostics).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reg = [r for r in runs if r.regression]
    if reg and len(reg) < len(runs):
        return (plot_runs([r for r in runs if not r.regression], out, suffix)
                + plot_runs(reg, out, suffix + "-regression"))
    regression = bool(runs) and all(r.regression for r in runs)
    subject = _subject(runs)
    ylabel = "MSE" if regression else "accuracy (%)"
    colors = [f"C{i % 10}" for i in range(len(runs))]
    written = []

    fig = figure()
    ax = fig.add_subplot()
    for run, c in zip(runs, colors):
        for split, style in (("test", "-"), ("val", ":")):
            key, scale = _metric(run, split)
            xs, ys = _series(run.epochs, "epoch", key, scale)
            if xs:
                ax.plot(xs, ys, style, color=c, marker="." if len(xs) < 40 else None,
                        label=f"{run.label} {split}")
    ax.set(xlabel="epoch", ylabel=ylabel, title=f"{subject}: {ylabel.split(' ')[0]} per epoch "
           f"(solid: test, dotted: validation)")
    written.append(_finish(fig, ax, out / f"accuracy_vs_epoch{suffix}.png", log=regression))

    fig = figure()
    ax = fig.add_subplot()
    for run, c in zip(runs, colors):
        key, scale = _metric(run, "test")
        xs, ys = _series(run.epochs, "wall_time_s", key, scale)
        if xs:
            ax.plot(xs, ys, "-", color=c, marker="." if len(xs) < 40 else None, label=run.label)
    ax.set(xlabel="wall time (s)", ylabel=f"test {ylabel}",
           title=f"{subject}: test {ylabel.split(' ')[0]} against wall-clock time")
    written.append(_finish(fig, ax, out / f"accuracy_vs_time{suffix}.png", log=regression))

    fig = figure()
    ax = fig.add_subplot()
    for run, c in zip(runs, colors):
        xs, ys = _series(run.epochs, "epoch", "train_loss", 1.0)
        if xs:
            ax.plot(xs, ys, "-", color=c, label=run.label)
    ax.set(xlabel="epoch", ylabel="training loss",
           title=f"{subject}: mean training loss per epoch (ULR: noisy rows)")
    written.append(_finish(fig, ax, out / f"loss_vs_epoch{suffix}.png", log=True))

    with_diag = [r for r in runs if r.diags]
    if with_diag:
        fig = figure(ncols=len(with_diag), nrows=2, height=3.4)
        axes = fig.subplots(2, len(with_diag), squeeze=False, sharex="col")
        for j, run in enumerate(with_diag):
            layers = list(dict.fromkeys(k for d in run.diags for k in d.get("cosine", {})))
            steps = [d["step"] for d in run.diags]
            for i, (key, title) in enumerate((("cosine", "cosine with backprop"),
                                              ("norm_ratio", "norm ratio |ulr| / |bp|"))):
                ax = axes[i][j]
                for k, layer in enumerate(layers):
                    pts = [(s, d[key].get(layer)) for s, d in zip(steps, run.diags)
                           if d.get(key, {}).get(layer) is not None]
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{k % 10}",
                                marker="." if len(pts) < 40 else None, label=layer)
                if key == "cosine":
                    ax.set_ylim(-1.05, 1.05)
                    ax.axhline(0, color="grey", lw=0.6)
                else:
                    ax.set_yscale("log")
                    ax.axhline(1, color="grey", lw=0.6)
                ax.set(title=f"{run.label}: {title}", xlabel="step" if i == 1 else None)
                ax.grid(alpha=0.3)
            axes[0][j].legend(fontsize="small")
        written.append(_save(fig, out / f"cosine{suffix}.png"))
    return written


def ratio_bars(rows: Sequence[dict[str, Any]], path: str | Path, *, value: str, xlabel: str,
               title: str, target: float | None = None, target_label: str = "target") -> Path:
    """Horizontal bars of ``row[value]`` per ``row["case"]``, one panel per ``row["model"]``
    (benchmark tables: ratios to a reference), with the reference at 1 and an optional
    ``target`` line. Returns the PNG's path."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = figure(ncols=len(models), width=4.8, height=0.45 * max(
        sum(r["model"] == m for r in rows) for m in models) + 1.4)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        ys = range(len(mine))
        vals = [r[value] for r in mine]
        ax.barh(ys, vals, color=["#4c72b0" if "ULR" in r["case"] else "#999999" for r in mine])
        for y, v in zip(ys, vals, strict=True):
            ax.text(v, y, f" {v:g}", va="center", fontsize=8)
        ax.set_yticks(list(ys), [r["case"] for r in mine], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        if target is not None:
            ax.axvline(target, color="#c44e52", ls="--", lw=1, label=f"{target_label} {target:g}")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlim(0, max(vals + [target or 0]) * 1.2)
        ax.set_xlabel(xlabel)
        ax.set_title(model, fontsize=10)
    fig.suptitle(title, fontsize=11)
    out = Path(path)
    return _save(fig, out)
