"""Throughput with and without parallel gradient assembly (LikelihoodRatio(workers=N)).

One ULR step (perturbed forward passes + gradient assembly, no optimizer) of LeNet-5 on
28x28 inputs is timed for ``workers`` 0 (sequential), 1 and 2, with the layer-wise plan (five
passes: each pass's assembly overlaps the next pass's forward), the all-sites plan (one pass:
only the per-site products run concurrently) and a hybrid 2-block model (its assembly is
autograd VJPs). As a reference, ``workers=0`` with two intra-op threads (the other way to use
two cores). Configurations are timed interleaved, round after round, and the median step time
is reported, so a load change on the shared machine hits all of them alike; the load average
is recorded. Writes docs/results/parallel-assembly-cpu.{json,md}.

    OMP_NUM_THREADS=1 python benchmarks/parallel_assembly.py      # ~5 min
    python benchmarks/parallel_assembly.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ulr
from ulr.models import LeNet5


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _configs(smoke: bool):
    # (label, plan, blocks, workers, intra-op threads)
    out = []
    for plan in ("layerwise", "all-sites"):
        for workers in (0, 1, 2):
            out.append((f"{plan}, workers={workers}", plan, None, workers, 1))
        out.append((f"{plan}, workers=0, 2 intra-op threads", plan, None, 0, 2))
    for workers in (0, 2):
        out.append((f"hybrid 2 blocks (layerwise), workers={workers}", "layerwise", 2,
                    workers, 1))
    return out[:2] if smoke else out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--copies", type=int, default=32)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.copies, args.size, args.rounds = 4, 4, 8, 2
    threads_before = torch.get_num_threads()
    x = torch.rand(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
    setups = []
    for label, plan, blocks, workers, threads in _configs(args.smoke):
        torch.manual_seed(0)
        model = LeNet5(input_size=args.size)
        sites = None if blocks is None else ulr.hybrid.blocks(model, blocks)
        est = ulr.LikelihoodRatio(
            model, sites=sites, noise=ulr.Gaussian(0.05), num_copies=args.copies,
            sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
            plan=ulr.plans.layerwise() if plan == "layerwise" else ulr.plans.all_sites(),
            generator=torch.Generator().manual_seed(0), workers=workers)
        setups.append({"label": label, "plan": plan, "blocks": blocks, "workers": workers,
                       "threads": threads, "model": model, "est": est, "times": []})
    load_before = os.getloadavg()
    try:
        for r in range(args.rounds + 1):
            for s in setups:
                torch.set_num_threads(s["threads"])
                s["model"].zero_grad(set_to_none=True)
                t = time.perf_counter()
                s["est"].loss_and_grads(ce, x, y)
                dt = time.perf_counter() - t
                if r > 0:  # round 0 warms up
                    s["times"].append(dt)
    finally:
        torch.set_num_threads(threads_before)
    load_after = os.getloadavg()
    rows = []
    for s in setups:
        med = statistics.median(s["times"])
        base = next(b for b in setups if b["plan"] == s["plan"] and b["blocks"] == s["blocks"]
                    and b["workers"] == 0 and b["threads"] == 1)
        rows.append({"config": s["label"], "plan": s["plan"], "blocks": s["blocks"],
                     "workers": s["workers"], "intra_op_threads": s["threads"],
                     "median_step_s": med, "samples_per_s": args.batch / med,
                     "speedup": statistics.median(base["times"]) / med,
                     "min_step_s": min(s["times"]), "max_step_s": max(s["times"])})
        print(f"{s['label']:45s} {med * 1e3:8.1f} ms  x{rows[-1]['speedup']:.2f}", flush=True)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_avg_before": load_before, "load_avg_after": load_after,
            "batch": args.batch, "copies": args.copies, "input": f"1x{args.size}x{args.size}",
            "rounds": args.rounds,
            "command": "python benchmarks/parallel_assembly.py " + " ".join(
                a for a in sys.argv[1:] if a not in (args.out, "--out"))}
    write(rows, meta, Path(args.out))
    return rows


def write(rows, meta, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "parallel-assembly-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                               indent=1))
    lines = ["# Parallel gradient assembly: throughput on the CPU", "",
             f"One ULR step (forward passes + gradient assembly) of LeNet-5 on "
             f"{meta['input']} inputs, batch {meta['batch']}, K = {meta['copies']} antithetic "
             f"copies, leave-one-out baseline; median of {meta['rounds']} interleaved rounds. "
             f"{meta['machine']}, {meta['cpus']} CPUs shared with other jobs (load average "
             f"{meta['load_avg_before'][0]:.1f} before, {meta['load_avg_after'][0]:.1f} after), "
             f"torch {meta['torch']}. *speedup*: against workers=0 with one intra-op thread "
             f"for the same plan. Generated by `{meta['command']}`.", "",
             "| configuration | intra-op threads | median step ms | min-max ms | samples/s | "
             "speedup |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['intra_op_threads']} | "
                     f"{r['median_step_s'] * 1e3:.1f} | {r['min_step_s'] * 1e3:.0f}-"
                     f"{r['max_step_s'] * 1e3:.0f} | {r['samples_per_s']:.0f} | "
                     f"{r['speedup']:.2f} |")
    (out / "parallel-assembly-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
