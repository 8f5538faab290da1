"""Reading the run directories that ``ulr train`` writes, for the evaluation tools.

The file names and the directory-of-runs expander are :mod:`ulr.train.rundir`'s (the writer's);
this module adds what evaluation reads: the records of a run (:func:`load_run`, for the plots)
and its weights (:func:`checkpoint_path`, :func:`expand_checkpoints`, for ``ulr robust``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.rundir import (
    BEST,
    CHECKPOINT,
    CONFIG_JSON,
    METRICS,
    SUMMARY,
    expand_run_dirs,
    read_json,
    runs_in,
)

__all__ = ["WEIGHTS", "Run", "checkpoint_path", "expand_checkpoints", "expand_run_dirs",
           "load_run", "read_json"]

#: which weights of a run directory: the last epoch's, or the best validation epoch's
WEIGHTS = {"last": CHECKPOINT, "best": BEST}


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
    run = Run(label or "", path, read_json(path / CONFIG_JSON) or {}, read_json(path / SUMMARY))
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
        subs = runs_in(p, CHECKPOINT) if not (p / CHECKPOINT).is_file() else []
        found.extend([s / CHECKPOINT for s in subs] or [checkpoint_path(p)])
    return found
