"""The reports of ``ulr robust``: accuracy tables (plain text, markdown) and a plot of accuracy
against budget and severity, from the rows of :func:`~.evaluation.evaluate`."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..plots import figure
from .conditions import ATTACKS


def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float]) -> str:
    mean, std = _stats(values)
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def condition_names(results: Sequence[dict[str, Any]]) -> list[str]:
    """The conditions of ``results`` (``{"label", "rows"}`` dicts), in order of appearance."""
    return list(dict.fromkeys(r["condition"] for res in results for r in res["rows"]))


def _grid(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["condition", *(res["label"] for res in results)]
    body = []
    for cond in condition_names(results):
        line = [cond]
        for res in results:
            vals = [r["accuracy"] for r in res["rows"] if r["condition"] == cond]
            line.append(_cell(vals) if vals else "-")
        body.append(line)
    return head, body


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: one row per condition, one column per result (accuracy in %).

    ``results`` are dicts ``{"label": str, "rows": [rows of evaluate()]}``; a label with rows
    from several runs (seeds) shows mean ± sample standard deviation.
    """
    head, body = _grid(results)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def format_markdown(results: Sequence[dict[str, Any]]) -> str:
    """The table of :func:`format_table` in markdown."""
    head, body = _grid(results)
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """PNG of accuracy against eps (one panel per attack) and severity (one per corruption),
    one line per result (mean ± std over its runs); the clean accuracy is drawn at 0."""
    panels = list(dict.fromkeys(r["name"] for res in results for r in res["rows"]
                                if r["kind"] != "clean"))
    if not panels:
        panels = ["clean"]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = figure(ncols=ncols, nrows=nrows, width=4.0, height=3.3)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, panel in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        for j, res in enumerate(results):
            pts: dict[float, list[float]] = {}
            for r in res["rows"]:
                if r["name"] == panel or r["kind"] == "clean":
                    pts.setdefault(float(r["level"]), []).append(100 * r["accuracy"])
            xs = sorted(pts)
            means = [statistics.fmean(pts[v]) for v in xs]
            stds = [statistics.stdev(pts[v]) if len(pts[v]) > 1 else 0.0 for v in xs]
            ax.errorbar(xs, means, yerr=stds if any(stds) else None, marker="o", ms=3,
                        capsize=2, color=f"C{j % 10}", label=res["label"])
        attack = panel in ATTACKS
        ax.set(title=panel, xlabel="eps (fraction of value range)" if attack else "severity",
               ylabel="accuracy (%)" if k % ncols == 0 else None, ylim=(-2, 102))
        ax.grid(alpha=0.3)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    axes[0][0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

