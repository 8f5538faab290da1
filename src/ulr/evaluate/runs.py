"""Reading the run directories that ``ulr train`` writes, for the evaluation tools.

The one place where :mod:`ulr.evaluate` spells the run directory's file names: the records of a
run (:func:`load_run`, for the plots), its weights (:func:`checkpoint_path`, for
``ulr robust``), and the expansion of a directory of runs (``ulr train`` with several methods,
``ulr compare``) into its runs, shared by both.
"""

# issue 15: switch to ulr.train.rundir (the writer's own names, reading and expander)

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["WEIGHTS", "Run", "checkpoint_path", "expand_checkpoints", "expand_run_dirs",
           "load_run", "read_json"]

METRICS = "metrics.jsonl"
CONFIG = "config.json"
SUMMARY = "summary.json"
GROUP = "group.json"
CHECKPOINT = "checkpoint.pt"
#: which weights of a run directory: the last epoch's, or the best validation epoch's
WEIGHTS = {"last": CHECKPOINT, "best": "best.pt"}


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Run:
    """The records of one run directory.

    Attributes:
        label: name in legends (the run's label, else the directory name).
        path: the run directory.
        config: the resolved config (``config.json``), or ``{}``.
        summary: ``summary.json`` if the run finished, else ``None``.
        epochs: the ``kind == "epoch"`` rows of ``metrics.jsonl``, in order.
        diags: the ``kind == "diag"`` rows.
    """

    label: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    diags: list[dict[str, Any]] = field(default_factory=list)

    @property
    def regression(self) -> bool:
        if self.summary is not None:
            return self.summary.get("task") == "regression"
        return bool(self.epochs) and self.epochs[-1].get("test_acc") is None


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read a run directory.

    Raises:
        FileNotFoundError: ``path`` has no ``metrics.jsonl``.
    """
    path = Path(path)
    metrics = path / METRICS
    if not metrics.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has no metrics.jsonl "
                                f"(run directories are written by ulr train)")
    run = Run(label or "", path, read_json(path / CONFIG) or {}, read_json(path / SUMMARY))
    start_label = None
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        kind = row.get("kind")
        if kind == "epoch":
            run.epochs.append(row)
        elif kind == "diag":
            run.diags.append(row)
        elif kind == "start" and start_label is None:
            start_label = row.get("label")
    if not run.label:
        run.label = (run.summary or {}).get("label") or start_label or path.name
    return run


def _runs_in(path: Path, marker: str) -> list[Path]:
    """The runs of a directory of runs that hold ``marker``: those ``group.json`` lists, in its
    order, else the subdirectories in name order."""
    group = read_json(path / GROUP)
    if isinstance(group, dict) and isinstance(group.get("runs"), list):
        subs = [path / r["dir"] for r in group["runs"] if isinstance(r, dict) and "dir" in r]
    else:
        subs = sorted(d for d in path.iterdir() if d.is_dir()) if path.is_dir() else []
    return [d for d in subs if (d / marker).is_file()]


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories among ``paths``; a directory of runs (as ``ulr compare`` writes) stands
    for the runs in it, in ``group.json`` order when present.

    Raises:
        FileNotFoundError: a path that neither is nor contains a run directory.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / METRICS).is_file():
            found.append(p)
            continue
        subs = _runs_in(p, METRICS)
        if not subs:
            raise FileNotFoundError(f"{p} is neither a run directory (with metrics.jsonl) nor "
                                    f"a directory of runs")
        found.extend(subs)
    return found


def checkpoint_path(path: Path, weights: str = "last") -> Path:
    """The checkpoint file of a run directory (``weights``: a key of :data:`WEIGHTS`), or
    ``path`` itself when it is a file.

    Raises:
        FileNotFoundError: no such path, or no such checkpoint in it (with the fix).
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory written by "
                                f"ulr train (or its checkpoint.pt)")
    if path.is_dir():
        ckpt = path / WEIGHTS[weights]
        if weights == "best" and not ckpt.is_file() and (path / CHECKPOINT).is_file():
            raise FileNotFoundError(
                f"{path} has no best.pt: runs written before ulr kept the best-validation "
                f"weights, or stopped before their first epoch ended; use --weights last")
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{path} is not a run directory of ulr train: it has no checkpoint.pt (runs "
                f"write one after every epoch; a directory of runs from ulr compare is "
                f"expanded only when its runs have one)")
        return ckpt
    return path


def expand_checkpoints(paths: Sequence[str | Path]) -> list[Path]:
    """Checkpoint files for ``paths``: run directories, ``checkpoint.pt`` files, or directories
    of runs (``ulr train`` with several methods, ``ulr compare``), which stand for their runs.

    Raises:
        FileNotFoundError: a path that does not exist or holds no checkpoint.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        subs = _runs_in(p, CHECKPOINT) if not (p / CHECKPOINT).is_file() else []
        found.extend([s / CHECKPOINT for s in subs] or [checkpoint_path(p)])
    return found
