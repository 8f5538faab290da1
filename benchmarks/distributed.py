"""Multi-process ULR on CPU: time per step on 1 vs 2 gloo processes, bytes exchanged per step.

Each workload is one optimizer step (zero_grad, ``loss_and_grads``, Adam step) of a ULR estimate
on a fixed batch, timed as the median over steps after warm-up:

- ``1 process``: :class:`ulr.LikelihoodRatio` in one process;
- ``2 processes, grads``: :class:`ulr.distributed.DistributedLikelihoodRatio`, copies split over
  2 processes, partial gradients all-reduced;
- ``2 processes, losses``: the same with ``exchange="losses"``: only the per-row losses travel and
  each process rebuilds the gradient of all copies by regenerating the noise.

Scaling efficiency = t(1 process) / (2 · t(2 processes)). Bytes are the payload each process
hands to collectives per step (the all-gathered losses, plus the all-reduced gradients for
``grads``); for 2 processes a ring all-reduce sends about that many bytes per process. Every
process uses one thread; each configuration runs in fresh spawned processes, and the rounds
alternate 1- and 2-process launches so that a change of machine load hits both. The first
step's gradient of each 2-process mode is compared with the 1-process one (max abs difference).

Writes ``distributed-cpu.json`` / ``.md``.

    python benchmarks/distributed.py            # a few minutes on 2 idle cores
    python benchmarks/distributed.py --smoke
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ulr

WORKLOADS = {
    # name: (layer widths, copies K, batch B, plan)
    "mlp 64-128-10, K=32, B=32, layer-wise (ulr train default)": ([64, 128, 10], 32, 32,
                                                                  "layerwise"),
    "mlp 64-512-512-10, K=64, B=32, layer-wise": ([64, 512, 512, 10], 64, 32, "layerwise"),
    "mlp 64-512-512-10, K=64, B=32, all-sites": ([64, 512, 512, 10], 64, 32, "all-sites"),
}
SMOKE = {"tiny, layer-wise": ([8, 16, 4], 4, 4, "layerwise"),
         "tiny, all-sites": ([8, 16, 4], 4, 4, "all-sites")}


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _model(widths: list[int]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def worker(rank: int, world_size: int, workloads: dict, modes: list[str], steps: int,
           warmup: int) -> dict:
    """Time every workload in every mode; returns {(workload, mode): result}."""
    torch.set_num_threads(1)
    from ulr.distributed import DistributedLikelihoodRatio

    out = {}
    for name, (widths, k, b, plan) in workloads.items():
        for mode in modes:
            model = _model(widths)
            kw = dict(noise=ulr.Gaussian(0.1), num_copies=k, sampler=ulr.antithetic(),
                      baseline=ulr.baselines.leave_one_out(),
                      plan=ulr.plans.layerwise() if plan == "layerwise" else ulr.plans.all_sites(),
                      generator=torch.Generator().manual_seed(1))
            est = (ulr.LikelihoodRatio(model, **kw) if mode == "single" else
                   DistributedLikelihoodRatio(model, exchange=mode, **kw))
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(2)
            x = torch.randn(b, widths[0], generator=g)
            y = torch.randint(0, widths[-1], (b,), generator=g)
            times, cpu, first = [], [], None
            for i in range(warmup + steps):
                t, c = time.perf_counter(), time.process_time()
                opt.zero_grad()
                est.loss_and_grads(ce, x, y)
                if first is None:
                    first = [p.grad.clone() for p in model.parameters()]
                opt.step()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
                    cpu.append(time.process_time() - c)
            out[name, mode] = {"step_s": statistics.median(times), "times": times,
                               "cpu_s": statistics.median(cpu),
                               "bytes": getattr(est, "last_bytes_sent", 0),
                               "params": sum(p.numel() for p in model.parameters()),
                               "grads": first}
    return out


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    workloads = WORKLOADS
    if args.smoke:
        workloads, args.steps, args.warmup, args.rounds = SMOKE, 2, 1, 1

    # The processes import the worker by module name: make this file importable as such.
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    module = importlib.import_module(Path(__file__).stem)
    if Path(module.__file__).resolve() != Path(__file__).resolve():
        raise RuntimeError(f"another module named {Path(__file__).stem!r} shadows {__file__}")
    from ulr.train.launch import launch

    runs: dict[tuple[str, str], list[dict]] = {}
    loads = []
    for _ in range(args.rounds):
        for nproc, modes in ((1, ["single"]), (2, ["grads", "losses"])):
            before = _load()
            res = launch(module.worker, nproc, workloads, modes, args.steps, args.warmup,
                         timeout_s=300, deadline_s=1800)
            loads += [before, _load()]
            for key, r in res[0].items():
                # CPU time of the step summed over the processes (insensitive to how much of
                # a core the machine's load leaves each process)
                r["cpu_total_s"] = sum(other[key]["cpu_s"] for other in res)
                runs.setdefault(key, []).append(r)

    rows = []
    for name, (widths, k, b, plan) in workloads.items():
        single = runs[name, "single"]
        t1 = statistics.median(r["step_s"] for r in single)
        c1 = statistics.median(r["cpu_total_s"] for r in single)
        for mode in ("single", "grads", "losses"):
            rs = runs[name, mode]
            t = statistics.median(r["step_s"] for r in rs)
            c = statistics.median(r["cpu_total_s"] for r in rs)
            diff = max(float((u - v).abs().max())
                       for u, v in zip(rs[0]["grads"], single[0]["grads"]))
            rows.append({
                "workload": name, "plan": plan, "num_copies": k, "batch": b,
                "params": rs[0]["params"],
                "processes": 1 if mode == "single" else 2,
                "exchange": None if mode == "single" else mode,
                "step_ms": 1e3 * t,
                "step_ms_per_round": [1e3 * r["step_s"] for r in rs],
                "speedup": t1 / t,
                "efficiency": t1 / (t * (1 if mode == "single" else 2)),
                "cpu_ms_all_processes": 1e3 * c,
                "cpu_work_ratio": c / c1,
                "bytes_per_step": rs[0]["bytes"],
                "max_grad_diff_vs_1_process": diff,
            })

    env = {"machine": platform.machine(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads_per_process": 1,
           "backend": "gloo", "load_average_1min_during_run": loads,
           "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed-cpu.json").write_text(json.dumps({"environment": env, "rows": rows},
                                                         indent=2))
    (out / "distributed-cpu.md").write_text(_markdown(rows, env))
    return rows


def _markdown(rows: list[dict], env: dict) -> str:
    loads = [v for v in env["load_average_1min_during_run"] if v is not None]
    lines = [
        "# Multi-process ULR on CPU: 1 vs 2 processes",
        "",
        f"`python benchmarks/distributed.py` on {env['cpu_count']} CPU cores "
        f"({env['machine']}, torch {env['torch']}, gloo, 1 thread per process), "
        f"{env['date']}. Median step time over {env['steps']} steps after {env['warmup']} "
        f"warm-up steps, median over {env['rounds']} alternating rounds of fresh processes.",
        "",
        f"Machine load (1-minute load average, sampled around each launch): "
        f"{min(loads):.1f} to {max(loads):.1f}" if loads else "Machine load: unknown",
        "",
        "| workload | processes | exchange | step ms | speedup | efficiency | CPU ms / step, "
        "all processes | CPU work vs 1 process | bytes sent / step / process | max abs grad "
        "diff vs 1 process |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['processes']} | {r['exchange'] or '-'} | "
            f"{r['step_ms']:.1f} | {r['speedup']:.2f}x | {100 * r['efficiency']:.0f}% | "
            f"{r['cpu_ms_all_processes']:.1f} | {r['cpu_work_ratio']:.2f}x | "
            f"{r['bytes_per_step']:,} | {r['max_grad_diff_vs_1_process']:.1e} |")
    lines += [
        "",
        "Speedup = t(1 process) / t (wall-clock step time); efficiency = speedup / processes. "
        "CPU ms: process CPU time of a step (median), summed over the processes, including "
        "gloo's threads; the ratio to one process is the work that splitting adds (noise drawn "
        "on every process, rebuilds, communication). Bytes: payload handed to "
        "collectives per step by each process (losses all-gathered, plus gradients "
        "all-reduced with `grads`); a 2-process ring all-reduce sends about that much per "
        "process. The gradient difference is float summation order (the same noise).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
