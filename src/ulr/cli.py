"""The ``ulr`` command: ``ulr train``, ``ulr compare``, ``ulr plot`` (and ``ulr bench``,
``ulr robust``, which have their own parsers in :mod:`ulr.evaluate.bench` and
:mod:`ulr.evaluate.robust`).

``ulr train`` with no arguments trains the reference MLP on the embedded digits data with the
likelihood-ratio estimator and with backpropagation, from the same seed, and prints a
comparison table. Every option of :class:`ulr.train.RunConfig` is a flag and a config-file
key; see ``docs/cli.md`` and ``ulr train --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from .allocator import tune_allocator_for_cli
from .train.config import METHODS, TABLES, ConfigError, check_values, field_help, keys
from .train.config_file import parse_value
from .train.runs import DEFAULT_METHODS

__all__ = ["Parser", "build_parser", "main"]


class Parser(argparse.ArgumentParser):
    """No abbreviated flags (``--epoch`` is a typo, not ``--epochs``: a new flag could make an
    abbreviation ambiguous), and a did-you-mean for unknown flags, choices and sub-commands.
    The parser of every ``ulr`` command (``ulr bench`` and ``ulr robust`` too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.command_parsers: dict[str, argparse.ArgumentParser] = {}
        self.command: str | None = None

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        self.command = next((a for a in argv if a in self.command_parsers), None)
        return super().parse_known_args(argv, namespace)

    def error(self, message: str) -> NoReturn:
        import difflib
        import re

        parser = self.command_parsers.get(self.command or "", self)
        flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        hints = []
        for bad in re.findall(r"(--[\w-]+)", message.partition("arguments:")[2]):
            close = difflib.get_close_matches(bad, flags, n=1, cutoff=0.6)
            if close:
                hints.append(close[0] if len(hints) == 0 else f"{close[0]} for {bad}")
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            valid = re.findall(r"'([^']*)'", choice.group(2))
            hints += difflib.get_close_matches(choice.group(1), valid, n=1)
        if hints:
            message += f" (did you mean {', '.join(hints)}?)"
        parser.print_usage(sys.stderr)
        parser.exit(2, f"{parser.prog}: error: {message}\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def _norm(text: str) -> str:
    return text.strip().lower().replace("_", "-")


def _default_text(name: str, meta: dict[str, Any]) -> str:
    if name == "method":
        return " ".join(DEFAULT_METHODS)
    if meta["default_text"]:
        return meta["default_text"]
    default = meta["default"]
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    if default == {}:
        return "none"
    return str(default)


#: The flag of each table field (one KEY=VALUE per flag) and an example of its value.
_TABLE_FLAGS = {"model_args": ("--model-arg", "'hidden=[256,128]'"),
                "method_args": ("--method-arg", "es.population=64"),
                "site_sigma": ("--site-sigma", "out=2.0")}
assert set(_TABLE_FLAGS) == set(TABLES)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, all defaulting to 'not given' so that config files and
    flags can be layered (defaults < file < flags)."""
    groups: dict[str, Any] = {}
    for name in keys():
        meta = field_help(name)
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(meta["group"])
        flag = "--" + name.replace("_", "-")
        help_text = f"{meta['help']} (default: {_default_text(name, meta)})"
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if name == "method":
            kw.update(nargs="+", type=_norm, choices=METHODS,
                      metavar="{" + ",".join(METHODS) + "}")
        elif name in TABLES:
            flag = _TABLE_FLAGS[name][0]  # one KEY=VALUE per flag
            kw.update(action="append", metavar=meta["metavar"])
        elif name == "sites":
            kw.update(nargs="+", metavar="NAME")
        elif name in ("model", "data"):  # a registry name or the user's MODULE:CALLABLE
            kw.update(metavar=meta["metavar"])
        elif meta["type"] is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        elif meta["choices"] is not None:
            kw.update(type=_norm, choices=meta["choices"],
                      metavar="{" + ",".join(meta["choices"]) + "}")
        else:
            kw.update(type=meta["type"], metavar=meta["metavar"] or name.split("_")[-1].upper())
        group.add_argument(flag, **kw)


def _add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="DIR", help=(
        f"{what} (default: runs/<timestamp>-<model>-<data>-<method>-seed<N>, created anew). "
        f"Must be new or empty; a directory that another ulr process is writing is refused."))
    group.add_argument("--resume", metavar="DIR", help=(
        "Continue the run (or the runs of a comparison) in DIR from its last checkpoint, "
        "bit-identically. Only --epochs, --max-steps, --threads, --diag-every and "
        "--eval-batch-size may differ from the stored config."))
    group.add_argument("-q", "--quiet", action="store_true",
                       help="Print only the final table: no progress bar, no epoch lines.")
    group.add_argument("--no-plots", dest="plots", action="store_false",
                       help="Do not draw PNG plots after a comparison (saves ~1 s).")


_TRAIN_DESCRIPTION = """\
Train a reference model with the likelihood-ratio estimator (ulr) and/or backpropagation (bp).

With no arguments: the 64-128-10 MLP on the embedded digits data (1295 train / 143 val / 359 test
images), Adam, batch 32, 30 epochs, ULR with Gaussian noise sigma=0.1, 32 iid copies, the
leave-one-out baseline and the layer-wise plan (lr 3e-3), then the same with backprop (lr 1e-3)
from the same seed; under 10 s on two CPU cores, ending in a comparison table.

Settings come from the defaults, then the model's own (the best configuration measured for it;
--no-model-defaults: none), then --config FILE, then the flags (a flag wins). Model defaults:
{model_defaults}
(ULR options for ulr, and the noise for bp-noise; --blocks or --recommended replace the model's
estimator options).

Each run writes a directory: config.toml/json (the resolved config), metrics.jsonl (per step and
per epoch), checkpoint.pt (every epoch and every 10 minutes, atomically) and summary.json. Several
methods write one sub-directory each plus comparison.txt/json and plots. Ctrl-C or SIGTERM keeps
the last checkpoint: --resume DIR goes on.
"""

def _train_description() -> str:
    from .train.config_file import flag_args
    from .train.recipes import MODEL_DEFAULTS

    listed = "\n".join(f"  {m}: {' '.join(flag_args(v))}" for m, v in MODEL_DEFAULTS.items())
    return _TRAIN_DESCRIPTION.format(model_defaults=listed)


_TRAIN_EPILOG = """\
examples:
  ulr train                                     # the demo: ulr vs bp on digits
  ulr train --method ulr --num-copies 64 --sigma 0.05 --epochs 10
  ulr train --model lenet5 --recommended --method ulr --diag-every 50
  ulr train --config run.toml --seed 3          # file values, seed overridden
  ulr train --data adding --method bp ulr       # regression (MSE)
  ulr train --resume runs/20250101-120000-mlp-digits-ulr --epochs 60
"""

_COMPARE_DESCRIPTION = """\
Run several methods or configs on the same model, data and seed; print a table (final and best
accuracy, time, forward passes and rows, peak memory) and write PNG plots (accuracy per epoch,
accuracy against wall time, training loss, and per-layer gradient cosine with backprop when
--diag-every is on) into the output directory.

Without CONFIG files the runs are the --method list (default: ulr bp). With CONFIG files, each
file is one run (or one per method it lists); the flags given here override every file.
"""

_COMPARE_EPILOG = """\
examples:
  ulr compare --method ulr bp --model mlp --data digits --diag-every 20
  ulr compare small.toml large.toml --epochs 10 --out runs/copies
"""

_PLOT_DESCRIPTION = """\
Redraw the comparison plots (and print the table) from run directories written by ulr train or
ulr compare. A comparison directory stands for all the runs in it.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ulr`` command (sub-commands train, compare, plot)."""
    parser = Parser(
        prog="ulr", formatter_class=_Formatter,
        description="Train networks without backpropagation by the likelihood-ratio method.",
        epilog="Run 'ulr train' for the demo, 'ulr COMMAND --help' for the options.")
    parser.add_argument("--version", action="version", version=f"ulr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train one model (default: ulr vs bp on digits)",
                           description=_train_description(), epilog=_TRAIN_EPILOG,
                           formatter_class=_Formatter)
    train.add_argument("--config", metavar="FILE", help=(
        "TOML file of run options (keys as the flags, with underscores; see docs/cli.md). "
        "Flags override it. A run directory's config.toml reruns that run."))
    _add_output_options(train, "Run directory; with several methods, the directory that holds "
                               "one sub-directory per method")
    _add_run_options(train)
    group = train.add_argument_group("processes")
    group.add_argument("--nproc", type=int, default=1, metavar="N", help=(
        "Train on N local processes (torch.distributed: gloo on CPU, NCCL with one GPU per "
        "process): the noise copies of each pass are split over the processes, which compute "
        "the same estimate as one process with the same seed; only process 0 writes the run "
        "directory. Give each process its --threads. For several machines use torchrun "
        "--nproc-per-node N -m ulr train ... instead (docs/distributed.md). (default: 1)"))

    compare = sub.add_parser("compare", help="compare methods or config files side by side",
                             description=_COMPARE_DESCRIPTION, epilog=_COMPARE_EPILOG,
                             formatter_class=_Formatter)
    compare.add_argument("configs", nargs="*", metavar="CONFIG",
                         help="TOML config files, one run each (or one per listed method)")
    _add_output_options(compare, "Comparison directory, one sub-directory per run")
    _add_run_options(compare)

    plot = sub.add_parser("plot", help="redraw plots from run directories",
                          description=_PLOT_DESCRIPTION, formatter_class=_Formatter)
    plot.add_argument("runs", nargs="+", metavar="RUN",
                      help="run directories, or comparison directories holding runs")
    plot.add_argument("--out", metavar="DIR",
                      help="where the PNGs go (default: the first RUN directory)")

    # Everything after `bench` goes to ulr.evaluate.bench.main, which has its own parser and --help.
    bench = sub.add_parser("bench", add_help=False, prefix_chars="\0",
                           help="benchmark ULR against backprop, ES, SPSA/MeZO and forward "
                                "gradient (ulr bench --help)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    # Likewise `robust` goes to ulr.evaluate.robust.main.
    robust = sub.add_parser("robust", add_help=False, prefix_chars="\0",
                            help="accuracy of trained runs under FGSM/PGD attacks and natural "
                                 "corruptions (ulr robust --help)")
    robust.add_argument("args", nargs=argparse.REMAINDER)
    parser.command_parsers = {"train": train, "compare": compare, "plot": plot}
    return parser


def _bench(args: argparse.Namespace) -> int:
    from .evaluate.bench import main as bench_main

    return bench_main(args.args)


def _robust(args: argparse.Namespace) -> int:
    from .evaluate.robust import main as robust_main

    return robust_main(args.args)


# ---------------------------------------------------------------------------------------------


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run options given on the command line, checked like config-file values."""
    given = {k: v for k, v in vars(args).items() if k in keys() and k not in TABLES}
    values = check_values(given, "command line")
    for name, (flag, example) in _TABLE_FLAGS.items():
        items = getattr(args, name, None)
        if not items:
            continue
        table: dict[str, Any] = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"command line: {flag} needs "
                                  f"{field_help(name)['metavar']}, got {item!r}, "
                                  f"e.g. {flag} {example}")
            method, dot, arg = key.rpartition(".")
            if dot and name == "method_args":
                table.setdefault(method, {})[arg] = parse_value(text.strip())
            else:
                table[key] = parse_value(text.strip())
        values[name] = check_values({name: table}, "command line")[name]
    return values


def _train(args: argparse.Namespace) -> int:
    from .train import runs

    return runs.train(_flag_values(args), config_file=args.config, out=args.out,
                      resume=args.resume, quiet=args.quiet, plots=args.plots)


def _rank_main(rank: int, world_size: int, argv: list[str]) -> None:
    """One process of ``ulr train --nproc N`` (its process group is already set up)."""
    code = main(argv)
    if code:
        sys.exit(code)


def _compare(args: argparse.Namespace) -> int:
    from .train import runs

    return runs.compare(_flag_values(args), config_files=args.configs, out=args.out,
                        resume=args.resume, quiet=args.quiet, plots=args.plots)


def _plot(args: argparse.Namespace) -> int:
    from .train import runs

    return runs.plot(args.runs, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ulr`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Errors in options, config files, checkpoints and data are reported in one line on stderr
    with exit code 2 (set ``ULR_TRACEBACK=1`` for the traceback); Ctrl-C exits with 130.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    tune_allocator_for_cli()  # no page faults from per-step buffers (docs/performance.md)
    _terminate_as_interrupt()
    if args.command == "train":
        return _train_processes(args, argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"ulr {args.command}: error: only 'ulr train' runs on several processes; run "
              f"'ulr {args.command}' without torchrun", file=sys.stderr)
        return 2
    command = {"train": _train, "compare": _compare, "plot": _plot,
               "bench": _bench, "robust": _robust}[args.command]
    from .train.rundir import CheckpointError

    try:
        return command(args)
    except (ConfigError, CheckpointError, OSError, ImportError, ValueError,
            TypeError) as e:
        if os.environ.get("ULR_TRACEBACK"):
            raise
        print(f"ulr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nulr {args.command}: interrupted", file=sys.stderr)
        return 130


def _terminate_as_interrupt() -> None:
    """SIGTERM (a scheduler's or ``kill``'s stop) and SIGINT end a run like Ctrl-C: the run
    directory keeps its last checkpoint and ``--resume`` continues it. SIGINT too, because a
    shell starts background jobs with SIGINT ignored, and ``kill -INT`` should still stop them."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)


def _train_processes(args: argparse.Namespace, argv: list[str]) -> int:
    """``ulr train`` in one process, as N local processes (``--nproc``), or as one rank of a
    ``torchrun`` launch (``WORLD_SIZE`` set)."""
    import torch.distributed as dist

    from .distributed import init_from_env, rank

    launched = "WORLD_SIZE" in os.environ
    if args.nproc < 1:
        print(f"ulr train: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if launched and args.nproc > 1 and args.nproc != int(os.environ["WORLD_SIZE"]):
        print(f"ulr train: error: --nproc {args.nproc} conflicts with the launcher's "
              f"WORLD_SIZE={os.environ['WORLD_SIZE']}; drop --nproc under torchrun",
              file=sys.stderr)
        return 2
    if args.nproc > 1 and not launched:
        from .train.launch import run_command

        try:
            return run_command(_rank_main, args.nproc, argv)
        except KeyboardInterrupt:
            return 130
    started = init_from_env()
    from .train.rundir import CheckpointError

    try:
        return _train(args)
    except (ConfigError, CheckpointError, OSError, ImportError, ValueError,
            TypeError) as e:
        if os.environ.get("ULR_TRACEBACK"):
            raise
        if rank() == 0:
            print(f"ulr train: error: {e}", file=sys.stderr)
        elif not isinstance(e, (ConfigError, CheckpointError)):
            print(f"ulr train: error (rank {rank()}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank() == 0:
            print("\nulr train: interrupted", file=sys.stderr)
        return 130
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()
