"""Time-to-accuracy and cost of ULR and its peers (backprop, ES, SPSA/MeZO, forward gradient).

Two parts of `ulr bench` (see `ulr.evaluate.bench.time_to_accuracy` and
`ulr.evaluate.bench.cost`): every method
trains the same model from the same initial weights with the same data order and CPU-time
budget, its Adam learning rate tuned on a small grid; test accuracy is recorded against time and
forward rows; step time, rows per step and peak memory per step are measured. Writes
peers-report.{md,json} and peers-tta-*.png under --out.

    python benchmarks/peers_training.py                # full (about an hour on 1 core)
    python benchmarks/peers_training.py --quick
    python benchmarks/peers_training.py --smoke        # seconds, for CI
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ulr.evaluate import bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/out/peers-training")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    settings = (bench.Settings.smoke() if args.smoke else
                bench.Settings.quick() if args.quick else bench.Settings())
    if args.smoke:
        settings.methods = ("bp", "ulr", "spsa")
        settings.tta = (("digits", "mlp", 0.1),)
    if args.seeds:
        settings.seeds = tuple(range(args.seeds))
    settings.threads = args.threads
    command = "python benchmarks/peers_training.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    result = bench.run(settings, ["tta", "cost"], command=command.strip(),
                       verbose=not args.smoke)
    bench.write_report(result, Path(args.out), plots=not args.smoke)
    for line in result["floors"]:
        print(line)
    return result["tta_summary"] + result["cost"]


if __name__ == "__main__":
    main()
