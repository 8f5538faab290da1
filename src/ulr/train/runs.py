"""The runs of one ``ulr train`` / ``ulr compare`` / ``ulr plot`` command: name and create the
directories (one run, or a comparison directory of several), plan a ``--resume``, train them one
after another with console progress, and write the comparison table and plots.

The command line only parses; it hands this module checked config values (see
:mod:`ulr.train.config`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from .config import TABLES, ConfigError, RunConfig, check_options_used, configs_from_values
from .config_file import load_toml
from .custom import display_name
from .loop import TrainingInterrupted, fit
from .progress import ConsoleProgress, format_table
from .rundir import (
    CONFIG_JSON,
    GROUP_FILE,
    SUMMARY,
    CheckpointError,
    expand_run_dirs,
    is_run,
    read_group,
    resume_config,
    write_comparison,
    write_group,
)

__all__ = ["DEFAULT_METHODS", "compare", "plot", "train"]

#: Methods trained when neither the command line nor a config file names one.
DEFAULT_METHODS = ["ulr", "bp"]


@dataclass
class _Planned:
    label: str
    config: RunConfig
    dir: Path
    resume: bool = False


def layer(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Config values ``top`` over ``base``; tables merge key by key (``top``'s keys first:
    site_sigma takes the first matching pattern)."""
    merged = {**base, **top}
    for name in TABLES:
        if name in base and name in top:
            merged[name] = {**top[name], **{k: v for k, v in base[name].items()
                                            if k not in top[name]}}
            for key, value in top[name].items():
                if isinstance(value, dict) and isinstance(base[name].get(key), dict):
                    merged[name][key] = {**base[name][key], **value}
    return merged


def new_dir(parts: Sequence[str]) -> Path:
    """A new directory under runs/, created here and exclusively: two commands started in the
    same second get two directories (the second gets a -2 suffix), never one."""
    stem = "-".join([time.strftime("%Y%m%d-%H%M%S"), *parts])
    path, n = Path("runs") / stem, 2
    Path("runs").mkdir(exist_ok=True)
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path, n = Path("runs") / f"{stem}-{n}", n + 1


def _check_fresh(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory {path} is a file; choose another --out")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"output directory {path} already exists and is not empty; choose "
                          f"another --out, or continue it with --resume {path}")


def _unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        name, n = label, 2
        while name in out:
            name, n = f"{label}-{n}", n + 1
        out.append(name)
    return out


def _plan_group(group: Path, labels: list[str], configs: list[RunConfig],
                command: str) -> list[_Planned]:
    _check_fresh(group)
    group.mkdir(parents=True, exist_ok=True)
    planned = [_Planned(lbl, cfg, group / lbl) for lbl, cfg in zip(labels, configs)]
    write_group(group, command, [(p.label, p.config) for p in planned])
    return planned


def _check_not_spent(run_dir: Path, config: RunConfig) -> None:
    """Resuming a run that stopped at max_steps with the same limit would do nothing."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return
    steps = summary.get("steps")
    stopped = str(summary.get("status", "")).startswith("stopped at max_steps")
    if stopped and config.max_steps is not None and isinstance(steps, int) \
            and config.max_steps <= steps:
        raise ConfigError(
            f"{run_dir} stopped at max_steps={steps}; resuming with max_steps="
            f"{config.max_steps} would do nothing. Pass a larger --max-steps, or --max-steps 0 "
            f"for no limit")


def _plan_resume(path: Path, overrides: dict[str, Any]) -> tuple[list[_Planned], Path | None]:
    if "method" in overrides:
        raise ConfigError("--method cannot change on --resume; start a new run for another "
                          "method")
    if is_run(path):
        config = resume_config(path, overrides)
        _check_not_spent(path, config)
        return [_Planned(config.method, config, path, resume=True)], None
    if not (path / GROUP_FILE).is_file():
        raise ConfigError(f"cannot resume {path}: it is neither a run directory (config.json, "
                          f"checkpoint.pt) nor a comparison directory ({GROUP_FILE})")
    try:
        runs = read_group(path)
    except CheckpointError as e:
        raise ConfigError(f"cannot resume {path}: {e}") from None
    planned = []
    for run in runs:
        sub = path / run["dir"]
        if (sub / CONFIG_JSON).is_file():
            planned.append(_Planned(run["label"], resume_config(sub, overrides), sub, True))
        else:  # interrupted before this run began
            config = RunConfig.from_dict(run["config"], source=str(path / GROUP_FILE))
            planned.append(_Planned(run["label"], config.replace(**overrides), sub))
    return planned, path


def _execute(planned: list[_Planned], group: Path | None, *, quiet: bool,
             plots: bool, created: bool = False) -> int:
    leader = distributed.rank() == 0
    summaries = []
    try:
        for p in planned:
            progress = ConsoleProgress(p.label, quiet=quiet, log_every=p.config.log_every)
            summaries.append(fit(p.config, p.dir, resume=p.resume, callbacks=[progress],
                                 label=p.label))
    except Exception:
        if group is not None and not summaries and leader:
            _remove_if_unused(group)
        elif created and leader and not any(planned[0].dir.iterdir()):
            planned[0].dir.rmdir()  # the directory this command made, still empty
        raise
    except TrainingInterrupted as e:
        if not leader:
            return 130
        where = group if group is not None else e.run_dir
        current = planned[len(summaries)].label
        print(f"\ninterrupted: {where} keeps the last checkpoint (run {current!r} after epoch "
              f"{e.epoch}, step {e.step}); continue with: ulr train --resume {where}",
              file=sys.stderr)
        return 130
    if not leader:
        return 0
    table = format_table(summaries)
    print()
    print(table)
    if group is not None:
        write_comparison(group, table, summaries)
        print(f"\nruns: {group}/{{{','.join(p.label for p in planned)}}}")
    else:
        print(f"\nrun directory: {planned[0].dir}")
    if plots:  # a single run draws its own curves (and cosine.png with --diag-every)
        from ..evaluate.plots import load_run, plot_runs

        written = plot_runs([load_run(p.dir, p.label) for p in planned],
                            group if group is not None else planned[0].dir)
        print(f"plots: {', '.join(str(w) for w in written)}")
    return 0


def _remove_if_unused(group: Path) -> None:
    """Remove a comparison directory whose first run failed before writing anything, so that
    the same --out can be used again after fixing the options."""
    entries = list(group.iterdir())
    if all(e.name == GROUP_FILE or (e.is_dir() and not any(e.iterdir())) for e in entries):
        for e in entries:
            e.unlink() if e.is_file() else e.rmdir()
        group.rmdir()


def _no_out_on_resume(out: str | None, resume: str) -> None:
    if out:
        raise ConfigError(f"--out cannot be combined with --resume: the run goes on in its own "
                          f"directory {resume}; drop --out (or copy the directory first)")


def train(flags: dict[str, Any], *, config_file: str | None, out: str | None,
          resume: str | None, quiet: bool, plots: bool) -> int:
    """``ulr train``: the runs of ``flags`` over the values of ``config_file`` (one per method),
    in ``out`` (default: a new directory under runs/), or ``--resume`` of a run or comparison
    directory. Returns the exit code."""
    file_values = load_toml(config_file) if config_file else {}
    # Under several processes, rank 0 alone names, checks and creates the directories.
    quiet = quiet or distributed.rank() > 0
    if resume:
        _no_out_on_resume(out, resume)
        planned, group = distributed.on_rank0(_plan_resume, Path(resume),
                                              layer(file_values, flags))
        return _execute(planned, group, quiet=quiet, plots=plots)
    values = layer({"method": DEFAULT_METHODS, **file_values}, flags)
    configs = configs_from_values(values, config_file or "command line")
    if not quiet:
        _note_model_defaults(configs, values)
    first = configs[0]
    methods = [c.method for c in configs]
    check_options_used(flags, methods, "command line")
    check_options_used(file_values, methods, str(config_file))

    def plan() -> tuple[list[_Planned], Path | None]:
        path = Path(out) if out else new_dir(
            [display_name(first.model), display_name(first.data), *methods,
             f"seed{first.seed}"])
        if len(configs) == 1:
            _check_fresh(path)
            return [_Planned(first.method, first, path)], None
        return _plan_group(path, methods, configs, "train"), path

    planned, group = distributed.on_rank0(plan)
    return _execute(planned, group, quiet=quiet, plots=plots, created=not out)


def _note_model_defaults(configs: Sequence[RunConfig], values: dict[str, Any]) -> None:
    """Say which of the model's own defaults the runs took (the user set the others)."""
    from .config_file import flag_args
    from .recipes import model_defaults

    taken: dict[str, Any] = {}
    for c in configs:
        if c.model_defaults:
            taken.update(model_defaults(c.model, c.method, values))
    if taken:
        print(f"{configs[0].model}'s own defaults where you set none (--no-model-defaults: the "
              f"generic ones): {' '.join(flag_args(taken))}", file=sys.stderr)


def compare(flags: dict[str, Any], *, config_files: Sequence[str], out: str | None,
            resume: str | None, quiet: bool, plots: bool) -> int:
    """``ulr compare``: one run per config file (or per method of one), side by side in one
    comparison directory; or ``--resume`` of one. Returns the exit code."""
    if resume:
        _no_out_on_resume(out, resume)
        planned, group = _plan_resume(Path(resume), flags)
        return _execute(planned, group or Path(resume), quiet=quiet, plots=plots)
    labels: list[str] = []
    configs: list[RunConfig] = []
    if config_files:
        for path in config_files:
            values = layer({"method": DEFAULT_METHODS[:1], **load_toml(path)}, flags)
            runs = configs_from_values(values, path)
            if not quiet:
                _note_model_defaults(runs, values)
            stem = Path(path).stem
            labels += [f"{stem}-{c.method}" if len(runs) > 1 else stem for c in runs]
            configs += runs
    else:
        values = layer({"method": DEFAULT_METHODS}, flags)
        configs = configs_from_values(values)
        if not quiet:
            _note_model_defaults(configs, values)
        labels = [c.method for c in configs]
    labels = _unique(labels)
    same = {(c.model, c.data, c.seed) for c in configs}
    if len(same) > 1:
        print(f"note: the runs differ in (model, data, seed): {sorted(same)}", file=sys.stderr)
    first = configs[0]
    parts = (["compare", display_name(first.model), display_name(first.data),
              f"seed{first.seed}"] if len(same) == 1
             else ["compare"])
    path = Path(out) if out else new_dir(parts)
    planned = _plan_group(path, labels, configs, "compare")
    return _execute(planned, path, quiet=quiet, plots=plots)


def plot(paths: Sequence[str], out: str | None) -> int:
    """``ulr plot``: redraw the plots of run (or comparison) directories and print their
    table. Returns the exit code."""
    from ..evaluate.plots import load_run, plot_runs

    runs = [load_run(d) for d in expand_run_dirs(paths)]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):
        for r in runs:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    written = plot_runs(runs, Path(out) if out else Path(paths[0]))
    done = [dict(r.summary, label=r.label) for r in runs if r.summary is not None]
    if done:
        print(format_table(done))
    unfinished = [r.label for r in runs if r.summary is None]
    if unfinished:
        print(f"(no summary yet, plotted only: {', '.join(unfinished)})")
    print(f"plots: {', '.join(str(w) for w in written)}")
    return 0
