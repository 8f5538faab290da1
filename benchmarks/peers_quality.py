"""Gradient quality of ULR and its peers: per-layer cosine with the true gradient vs forward rows.

One part of `ulr bench` (see `ulr.evaluate.bench.gradient_quality`): on an MLP (digits) and LeNet-5
(MNIST subset), at initialisation and after a short backprop warm-up, every estimator spends
about the same forward rows per example; the cosine of its estimate with the exact minibatch
gradient is recorded per layer, over 3 seeds. Writes peers-report.{md,json} and
peers-quality-*.png under --out.

    python benchmarks/peers_quality.py                 # full (minutes on 1 core)
    python benchmarks/peers_quality.py --quick
    python benchmarks/peers_quality.py --smoke         # seconds, for CI
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ulr.evaluate import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/out/peers-quality")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    settings = (bench.Settings.smoke() if args.smoke else
                bench.Settings.quick() if args.quick else bench.Settings())
    if args.smoke:
        settings.methods = ("ulr", "es", "spsa")
    if args.seeds:
        settings.seeds = tuple(range(args.seeds))
    settings.threads = args.threads
    command = "python benchmarks/peers_quality.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    result = bench.run(settings, ["quality"], command=command.strip(), verbose=not args.smoke)
    bench.write_report(result, Path(args.out), plots=not args.smoke)
    for line in result["floors"]:
        print(line)
    return result["quality_summary"]


if __name__ == "__main__":
    main()
