"""Running ``ulr bench``: the chosen parts in order into one result, and the command line
(``--from-json`` rewrites a report without measuring)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .cost import cost
from .harness import initial_model, load_dataset, progress
from .methods import ALIASES, METHODS, canonical, describe
from .quality import gradient_quality, quality_floor, summarize_quality
from .report import floors, json_default, machine, write_report
from .settings import Settings
from .tta import summarize_tta, time_to_accuracy

PARTS = ("quality", "tta", "cost")


def run(settings: Settings, parts: Sequence[str] = PARTS, *, command: str = "",
        verbose: bool = False, checkpoint: Path | None = None) -> dict[str, Any]:
    """Run the chosen parts with ``settings``; return the result that :func:`write_report`
    writes. With ``checkpoint``, the result so far is written there as JSON after each part."""

    def save(result):
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_text(json.dumps(result, default=json_default))

    skipped = {k: METHODS[k].unavailable() for k in settings.methods}
    skipped = {k: reason for k, reason in skipped.items() if reason}
    for key, reason in skipped.items():
        progress(f"skipping {key}: {reason}", verbose)
    settings.methods = tuple(k for k in settings.methods if k not in skipped)
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    try:
        result: dict[str, Any] = {
            "command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(), "settings": asdict(settings), "load_start": load_start,
            "skipped": skipped,
        }
        probe = {}
        for model_name, data_name in {*settings.quality_models,
                                      *((m, d) for d, m, _ in settings.tta)}:
            ds = load_dataset(data_name, settings.seeds[0])
            probe[model_name] = initial_model(model_name, ds, 0)
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
    from ...cli import Parser

    p = Parser(
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
    p.add_argument("--methods", nargs="+", type=canonical, choices=list(METHODS), default=None,
                   metavar="METHOD", help=(
                       f"which methods, of {', '.join(METHODS)} (default: all; pgpe and snes "
                       f"need evotorch and are skipped with the reason without it; "
                       f"{', '.join(f'{a} = {c}' for a, c in ALIASES.items())})"))
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


def _canonical_methods(result: dict[str, Any]) -> dict[str, Any]:
    """A report written before a method was renamed (``fg``), with today's names."""
    st = result.get("settings", {})
    st["methods"] = [canonical(k) for k in st.get("methods", [])]
    result["configs"] = {"/".join([*k.split("/")[:-1], canonical(k.split("/")[-1])]): v
                         for k, v in result.get("configs", {}).items()}
    for part in ("quality", "tta", "cost"):
        for row in result.get(part) or []:
            if "method" in row:
                row["method"] = canonical(row["method"])
    return result


def main(argv: list[str] | None = None) -> int:
    """``ulr bench`` entry point: run the benchmark and write the report; returns 0."""
    args = parser().parse_args(argv)
    if args.from_json:
        result = _canonical_methods(json.loads(Path(args.from_json).read_text()))
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
    # `python -m ulr.evaluate.bench` runs bench/__main__.py; the record names the command used.
    as_module = Path(sys.argv[0]).parent.name == "bench" or sys.argv[0].endswith("bench.py")
    prog = "python -m ulr.evaluate.bench" if as_module else "ulr bench"
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
