"""The ``ulr robust`` command line: parse the arguments, evaluate every run, write
``robust.json``, ``robust.md`` and ``robust.png``, and print the table."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...train.rundir import CHECKPOINT
from ..runs import WEIGHTS, expand_checkpoints
from .conditions import ATTACKS, CORRUPTIONS, DEFAULT_EPS, choose
from .evaluation import evaluate
from .loading import load
from .report import format_markdown, format_table, plot

_DESCRIPTION = """\
Evaluate trained models (run directories of ulr train, their checkpoint.pt, or directories of
runs) under adversarial attacks and natural corruptions, and write a table (printed, robust.md,
robust.json) and a plot (robust.png) of accuracy against eps and severity, one column/line per run.

Attacks: fgsm-linf, fgsm-l2, pgd-linf, pgd-l2 (white box, on the model in eval mode). eps is a
fraction of the data's value range ([0, 1] for the image datasets): L-inf eps moves every input
feature by at most eps*(hi-lo); L2 eps allows a perturbation of length eps*(hi-lo)*sqrt(d), an RMS
of eps*(hi-lo) per feature. Corruptions: gaussian-noise, impulse-noise, blur, contrast at
severities 1-5 (docs/robustness.md lists their parameters), deterministic given --seed.

Models without an input gradient (sign units, spiking nets, numpy black boxes) cannot be attacked
by gradient: use --attacks none, or --transfer-from RUN to craft the attacks on a differentiable
surrogate (e.g. the same architecture trained by backprop) and evaluate the target on them.
"""

_EPILOG = """\
examples:
  ulr robust runs/demo                       # every run of a ulr train comparison directory
  ulr robust runs/a/ulr runs/a/bp --attacks pgd-linf --eps 0.05 0.1 --steps 20 --limit 1000
  ulr robust runs/snn --attacks pgd-linf --transfer-from runs/mlp-bp
  ulr robust runs/a/ulr --attacks none --corruptions blur contrast --out robust-a
"""


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``ulr robust``."""
    from ...cli import Parser

    p = Parser(
        prog="ulr robust", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=30, width=100))
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories, checkpoint.pt files, or directories of runs")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), metavar="NAME",
                   help=f"attacks: {', '.join(ATTACKS)}, or none (default: all)")
    p.add_argument("--eps", nargs="+", type=float, default=list(DEFAULT_EPS), metavar="EPS",
                   help="budgets as fractions of the value range (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default: 10)")
    p.add_argument("--step-size", type=float, default=None, metavar="FACTOR",
                   help="PGD step as a multiple of the radius (default: 2.5/steps)")
    p.add_argument("--restarts", type=int, default=1, help="PGD restarts (default: 1)")
    p.add_argument("--no-random-start", dest="random_start", action="store_false",
                   help="start PGD at the clean input instead of a random point of the ball")
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), metavar="NAME",
                   help=f"corruptions: {', '.join(CORRUPTIONS)}, or none (default: all)")
    p.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5],
                   metavar="S", help="corruption severities 1-5 (default: all)")
    p.add_argument("--weights", choices=list(WEIGHTS), default="last",
                   help="of each run directory: the last epoch's weights (checkpoint.pt) or "
                        "those of the best validation accuracy (best.pt)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="evaluation split (default: test, the same examples for every seed)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N examples of the split (default: all)")
    p.add_argument("--range", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="valid input range (default: [0, 1] for the image datasets, else the "
                        "observed training range)")
    p.add_argument("--transfer-from", metavar="RUN", default=None,
                   help="craft the attacks on this run's model (a transfer attack) instead of "
                        "on each evaluated model; it must take the same inputs")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the PGD random starts and the corruptions (default: 0)")
    p.add_argument("--batch-size", type=int, default=500, help="examples per batch")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; 0 keeps torch's default)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where robust.{json,md,png} go (default: the first run directory; "
                        "earlier robust.* files there are replaced)")
    p.add_argument("--no-plots", "--no-plot", dest="plot", action="store_false",
                   help="skip robust.png")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    return p


def _names(values: list[str]) -> list[str]:
    return [] if [v.lower() for v in values] == ["none"] else values


def _labels(paths: list[Path]) -> list[str]:
    names = [p.parent.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.parent.name}/{p.parent.name}" for p in paths]
    return names


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the runs of parsed ``args`` and write the reports; returns the JSON record."""
    attacks = choose(_names(args.attacks), ATTACKS, "attack", "--attacks")
    corruptions = choose(_names(args.corruptions), CORRUPTIONS, "corruption",
                          "--corruptions")
    if not attacks and not corruptions:
        raise ValueError("nothing to evaluate: --attacks none and --corruptions none")
    paths = expand_checkpoints(args.runs)
    surrogate = None
    if args.transfer_from:
        surrogate = load(args.transfer_from, split=args.split, limit=args.limit)
    results = []
    t0 = time.perf_counter()
    for path, label in zip(paths, _labels(paths)):
        loaded = load(path.parent if path.name == CHECKPOINT else path, split=args.split,
                      limit=args.limit, label=label, weights=args.weights)
        if surrogate is not None and (surrogate.x.shape != loaded.x.shape
                                      or not torch.equal(surrogate.x, loaded.x)):
            raise ValueError(f"--transfer-from {args.transfer_from} was trained on other "
                             f"inputs ({surrogate.config['data']}) than {label} "
                             f"({loaded.config['data']}); a surrogate must see the same data")
        vr = tuple(args.range) if args.range else loaded.value_range
        if not args.quiet:
            print(f"[{label}] {loaded.config['model']} on {loaded.config['data']} "
                  f"({loaded.config['method']}), {len(loaded.x)} {args.split} examples, "
                  f"range [{vr[0]:g}, {vr[1]:g}]", file=sys.stderr, flush=True)
        rows = evaluate(loaded.model, loaded.x, loaded.y, attacks=attacks, eps=args.eps,
                        corruptions=corruptions, severities=args.severities, steps=args.steps,
                        step_size=args.step_size, random_start=args.random_start,
                        restarts=args.restarts, value_range=vr, seed=args.seed,
                        batch_size=args.batch_size,
                        surrogate=surrogate.model if surrogate is not None else None)
        results.append({"label": label, "run_dir": str(loaded.path),
                        "method": loaded.config["method"], "model": loaded.config["model"],
                        "data": loaded.config["data"], "seed": loaded.config["seed"],
                        "value_range": list(vr), "rows": rows})
    from ... import __version__
    from ...train import environment

    record = {
        "command": "ulr robust " + " ".join(args.argv),
        "settings": {"attacks": attacks, "eps": args.eps, "steps": args.steps,
                     "step_size": args.step_size if args.step_size is not None
                     else 2.5 / args.steps, "restarts": args.restarts,
                     "random_start": args.random_start, "corruptions": corruptions,
                     "severities": args.severities, "split": args.split, "limit": args.limit,
                     "seed": args.seed, "transfer_from": args.transfer_from,
                     "eps_units": "fraction of the value range (L2: times sqrt(d))"},
        "ulr": __version__,
        "environment": environment("cpu"),
        "eval_time_s": time.perf_counter() - t0,
        "results": results,
    }
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robust.json").write_text(json.dumps(record, indent=2))
    note = (f"Accuracy (%) on {args.split} examples{f' (first {args.limit})' if args.limit else ''}"
            f". eps: fraction of the value range (L2: RMS per feature). Command: "
            f"`{record['command']}`")
    (out / "robust.md").write_text(f"# Robustness\n\n{note}\n\n{format_markdown(results)}\n")
    written = [out / "robust.json", out / "robust.md"]
    if args.plot:
        written.append(plot(results, out / "robust.png"))
    print(format_table(results))
    if not args.quiet:
        print(f"\nwrote {', '.join(str(w) for w in written)}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``ulr robust`` entry point; returns the exit code (2 with a one-line message on bad
    input; ``ULR_TRACEBACK=1`` shows the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    previous = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        run(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        if os.environ.get("ULR_TRACEBACK"):
            raise
        print(f"ulr robust: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
