"""The run directory: the one module that knows its file names, and writes and reads them.

``config.toml`` / ``config.json``
    the fully resolved config (``ulr train --config DIR/config.toml`` reruns it).
``metrics.jsonl``
    one JSON object per line, told apart by ``kind``: ``"start"`` (versions, device, threads),
    ``"step"`` (step, epoch, loss, acc, lr, samples_per_s, forward_rows, forward_passes),
    ``"diag"`` (per-layer ``cosine`` and ``norm_ratio`` of the ULR gradient against backprop)
    and ``"epoch"`` (train/val/test loss and accuracy, wall and train time, cumulative forward
    rows, peak memory). ``acc`` and ``train_acc`` of a ULR or peer run are measured on the
    rows it evaluates (noisy rows, perturbed weights).
``metrics.csv``
    the epoch rows of metrics.jsonl as a table, for spreadsheets and pandas.
``checkpoint.pt`` / ``best.pt``
    the latest state and the best epoch's weights (see :mod:`ulr.train.checkpoints`).
``tensorboard/``
    with ``tensorboard = true``: the step and epoch scalars as TensorBoard events.
``summary.json``
    written when the run finishes: final and best metrics, time, forward rows, peak memory,
    versions and platform.

A comparison directory (several methods, ``ulr compare``) holds one run directory per run and
``group.json`` (the command and the runs' labels, directories and configs), then
``comparison.txt`` / ``comparison.json``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .config import RunConfig
from .config_file import to_toml

__all__ = ["CheckpointError", "RunWriter", "expand_run_dirs", "resume_config"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG_JSON = "config.json"
CONFIG_TOML = "config.toml"
#: the weights at the epoch of best validation score (accuracy, or loss for regression)
BEST = "best.pt"
#: the epoch rows of metrics.jsonl as a table, for spreadsheets and pandas
METRICS_CSV = "metrics.csv"
#: the runs of a comparison directory
GROUP_FILE = "group.json"
COMPARISON_TXT = "comparison.txt"
COMPARISON_JSON = "comparison.json"
#: TensorBoard event files (``tensorboard = true``)
TENSORBOARD = "tensorboard"
#: the metrics.jsonl keys that go to TensorBoard, by row kind (tag: kind/key)
_SCALARS = {"step": ("loss", "acc", "lr", "samples_per_s"),
            "epoch": ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                      "lr")}


class CheckpointError(RuntimeError):
    """A run directory cannot be resumed (missing, corrupt or mismatched checkpoint) or would
    be overwritten. Nothing in the directory has been changed when this is raised."""


def lock(run_dir: Path, stack: contextlib.ExitStack) -> None:
    """Own ``run_dir`` until ``stack`` closes: an exclusive, non-blocking ``flock`` on the
    directory itself (no file is left behind), so that a second run or ``--resume`` of the
    same directory stops before it writes anything (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(
            f"run directory {run_dir} is in use by another ulr process; nothing was changed. "
            f"Wait for it to finish, or choose another --out") from None
    stack.callback(os.close, fd)  # closing the descriptor releases the lock



def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False))


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            # A run killed mid-write leaves a truncated last line: skip what does not parse.
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows



def read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The config stored in a run directory, with ``overrides`` applied (for ``--resume``).

    Raises:
        CheckpointError: the directory has no readable ``config.json``.
    """
    path = Path(run_dir) / CONFIG_JSON
    try:
        stored = json.loads(path.read_text())
        config = RunConfig.from_dict(stored, source=str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot resume {run_dir}: {path} is missing or unreadable ({e}); "
                              f"is it a run directory written by ulr train?") from None
    return config.replace(**overrides) if overrides else config



def check_empty(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(
            f"run directory {run_dir} already exists and is not empty; choose another --out, "
            f"or continue that run with --resume {run_dir}"
        )



def is_run(path: Path) -> bool:
    """Whether ``path`` is a run directory (it has a config or a checkpoint)."""
    return (path / CONFIG_JSON).is_file() or (path / CHECKPOINT).is_file()


def write_group(group: Path, command: str, runs: Sequence[tuple[str, RunConfig]]) -> None:
    """``group.json`` of a comparison directory: the command and each run's label, directory
    (named after the label) and config."""
    meta = {"command": command, "ulr": __version__,
            "runs": [{"label": label, "dir": label, "config": config.to_dict()}
                     for label, config in runs]}
    (group / GROUP_FILE).write_text(json.dumps(meta, indent=2))


def read_group(group: Path) -> list[dict[str, Any]]:
    """The runs listed in ``group.json`` (label, dir, config).

    Raises:
        CheckpointError: no readable ``group.json``.
    """
    path = group / GROUP_FILE
    try:
        return json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{group} is not a comparison directory: {path} is missing or "
                              f"unreadable ({e})") from None


def write_comparison(group: Path, table: str, summaries: Sequence[dict[str, Any]]) -> None:
    """The comparison table of a group's runs, as text and as their summaries."""
    (group / COMPARISON_TXT).write_text(table + "\n")
    (group / COMPARISON_JSON).write_text(json.dumps(list(summaries), indent=2))


def runs_in(path: Path, needs: str = METRICS) -> list[Path]:
    """The runs of a directory of runs that hold the file ``needs``: those ``group.json``
    lists, in its order, else (no group file, or an unreadable one) the subdirectories in name
    order."""
    group = read_json(path / GROUP_FILE)
    if isinstance(group, dict) and isinstance(group.get("runs"), list):
        subs = [path / r["dir"] for r in group["runs"] if isinstance(r, dict) and "dir" in r]
    else:
        subs = sorted(d for d in path.iterdir() if d.is_dir()) if path.is_dir() else []
    return [d for d in subs if (d / needs).is_file()]


def expand_run_dirs(paths: Sequence[str | Path], *, needs: str = METRICS) -> list[Path]:
    """Run directories among ``paths``, each holding the file ``needs`` (``metrics.jsonl`` to
    plot a run, ``checkpoint.pt`` or ``best.pt`` to load its model); a directory of runs (as
    ``ulr train`` with several methods and ``ulr compare`` write) stands for the runs in it, in
    ``group.json`` order when present.

    Raises:
        FileNotFoundError: a path that neither is nor contains such a run directory.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / needs).is_file():
            found.append(p)
            continue
        subs = runs_in(p, needs)
        if not subs:
            raise FileNotFoundError(f"{p} is neither a run directory (with {needs}) nor "
                                    f"a directory of runs")
        found.extend(subs)
    return found


def tensorboard_writer(path: Path | None) -> Any:
    """A ``SummaryWriter`` writing to ``path`` (``None``: only check that one can be made).

    Raises:
        ImportError: the tensorboard package is missing (with the command that installs it).
    """
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("tensorboard = true (--tensorboard) needs the tensorboard package: "
                          "pip install tensorboard (or 'ulr[integrations]')") from None
    return SummaryWriter(str(path)) if path is not None else None


class RunWriter:
    """The files of one run in progress; writes nothing when ``run_dir`` is ``None`` or this
    process is not the writer (rank > 0 of several processes)."""

    def __init__(self, run_dir: Path | None, writer: bool = True) -> None:
        self.run_dir = run_dir if writer else None
        self.log: Any = None
        self.board: Any = None

    def open(self, config: RunConfig, stack: contextlib.ExitStack,
             resumed_at: tuple[int, int] | None) -> None:
        """Lock the directory, write the config, and open ``metrics.jsonl`` for appending; a
        resumed run (``resumed_at = (epoch, step)``) first drops the rows after its
        checkpoint and the summary."""
        run_dir = self.run_dir
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        lock(run_dir, stack)
        if resumed_at is not None:
            epoch, step = resumed_at
            keep = [r for r in read_rows(run_dir / METRICS)
                    if r.get("step", 0) <= step and not r.get("partial")
                    and not (r.get("kind") == "epoch" and r.get("epoch", 0) > epoch)]
            write_atomic(run_dir / METRICS,
                         lambda f: f.writelines(json.dumps(r) + "\n" for r in keep))
            with contextlib.suppress(FileNotFoundError):
                (run_dir / SUMMARY).unlink()
        write_json(run_dir / CONFIG_JSON, config.to_dict())
        header = (f"ulr train config of run {run_dir.name!r} (ulr {__version__}); rerun with: "
                  f"ulr train --config {run_dir / CONFIG_TOML}")
        write_atomic(run_dir / CONFIG_TOML, lambda f: f.write(to_toml(config, header)))
        self.log = stack.enter_context(open(run_dir / METRICS, "a"))  # noqa: SIM115
        if config.tensorboard:
            self.board = tensorboard_writer(run_dir / TENSORBOARD)
            stack.callback(self.board.close)

    def row(self, row: dict[str, Any]) -> None:
        """Append one row to ``metrics.jsonl`` (and its scalars to TensorBoard)."""
        if self.log is not None:
            self.log.write(json.dumps(row) + "\n")
        if self.board is not None and row.get("kind") in _SCALARS:
            kind = row["kind"]
            at = row["step"] if kind == "step" else row["epoch"]
            for key in _SCALARS[kind]:
                if isinstance(row.get(key), (int, float)):
                    self.board.add_scalar(f"{kind}/{key}", row[key], at)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()
        if self.board is not None:
            self.board.flush()

    def csv(self, rows: list[dict[str, Any]]) -> None:
        """``metrics.csv``: one line per finished epoch (the epoch rows of metrics.jsonl),
        rewritten atomically, so a resumed run's table matches its history."""
        if self.run_dir is None:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "kind"))

        def write(f: Any) -> None:
            out = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            out.writeheader()
            out.writerows(rows)

        write_atomic(self.run_dir / METRICS_CSV, write)

    def save(self, name: str, write: Callable[[Any], None], mode: str = "w") -> None:
        """Replace file ``name`` atomically with what ``write(file)`` writes."""
        if self.run_dir is not None:
            write_atomic(self.run_dir / name, write, mode)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.run_dir is not None:
            write_json(self.run_dir / SUMMARY, summary)
