"""LeNet-5 training: ULR against forward gradient, SPSA and ES at equal CPU time and at equal
forward rows (issue 14, floor 2's accuracy half).

Every method trains Fashion-MNIST LeNet-5 (28x28) from the same initial weights and data order
(the `ulr bench` harness: batch 32, Adam at a constant rate), and its test accuracy is read twice:

* at **equal time**: after ``--time`` CPU seconds of training steps (one torch thread;
  evaluation excluded);
* at **equal forward rows**: after ``--rows`` forward rows (examples x forward evaluations, each
  estimator's own count: `last_forward_rows`).

A run goes on until it has passed both marks. The methods:

* `ulr`: LeNet-5's model defaults, what `ulr train --model lenet5` uses (noise after each conv
  block's ReLU + max-pool and at the fc layers, 64 antithetic copies per pass, sigma 0.05,
  leave-one-out; 321 rows per example and step), at `ulr train`'s rate 3e-3;
* `ulr-lean`: the same sites with 8 copies per pass (41 rows per example and step): the
  configuration for a rows budget, as the bench's quality part sizes ULR by rows;
  `ulr-lean-4`, `ulr-lean-16`: 4 and 16 copies per pass (21 and 81 rows);
* `es`, `spsa`, `forward-gradient`: the bench's training configurations (population 32, one
  direction, one tangent) at the rates the bench tuned for this setting
  (docs/results/peers-report.md, Fashion-MNIST LeNet-5: 3e-3, 1e-3, 1e-3).

    python benchmarks/cnn_peers.py             # docs/results/cnn-peers.{json,md} (~15 min, 2 jobs)
    python benchmarks/cnn_peers.py --smoke     # seconds: digits, one seed, tiny budgets
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ulr.evaluate.bench import build_estimator, machine
from ulr.evaluate.bench.harness import accuracy, generator_for, initial_model, load_dataset
from ulr.evaluate.bench.tta import minibatches, train_step

ROOT = Path(__file__).resolve().parents[1]
LR_GRID = (1e-3, 3e-3, 1e-2)  # the `ulr bench` grid
METHODS = {  # name: (learning rate, what it is)
    "ulr": (3e-3, "LeNet-5's model defaults (pooled sites, 64 antithetic copies per pass)"),
    "ulr-lean": (3e-3, "the same sites, 8 antithetic copies per pass"),
    "ulr-lean-4": (3e-3, "the same sites, 4 antithetic copies per pass"),
    "ulr-lean-16": (3e-3, "the same sites, 16 antithetic copies per pass"),
    "es": (3e-3, "ES, population 32 (the bench's)"),
    "spsa": (1e-3, "SPSA/MeZO, one direction (the bench's)"),
    "forward-gradient": (1e-3, "forward gradient, one tangent (the bench's)"),
}


def make_estimator(method: str, model: torch.nn.Module, data: str, seed: int):
    if not method.startswith("ulr"):
        return build_estimator(method, model, generator_for(seed, 2))
    from ulr.train.config import configs_from_values
    from ulr.train.recipes import build_estimator as recipe

    values = {"model": "lenet5", "data": data, "method": "ulr", "seed": seed}
    if method.startswith("ulr-lean"):
        values["num_copies"] = int(method.rpartition("-")[2]) if method[-1].isdigit() else 8
    (config,) = configs_from_values(values)
    return recipe(config, model, torch.device("cpu"))


def run(task: tuple) -> dict[str, Any]:
    """One method and seed, trained past both marks; validation and test accuracy at each.
    ``task``: data, method, seed, time budget, rows budget[, learning rate]."""
    data, method, seed, time_s, rows_budget, *rate = task
    lr = rate[0] if rate else METHODS[method][0]
    torch.set_num_threads(1)
    ds = load_dataset(data, seed)
    (x, y), (xv, yv), (xt, yt) = ds.train, ds.val, ds.test
    model = initial_model("lenet5", ds, seed)
    est = make_estimator(method, model, data, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    stream = minibatches(x, y, generator_for(seed, 1))
    cpu, rows, steps, marks = 0.0, 0, 0, {}
    diverged = False
    while len(marks) < 2 and not diverged:
        xb, yb = next(stream)
        t = time.process_time()
        diverged = not train_step(model, est, opt, xb, yb)
        cpu += time.process_time() - t
        rows += est.last_forward_rows
        steps += 1
        for mark, reached in (("time", cpu >= time_s), ("rows", rows >= rows_budget)):
            if reached and mark not in marks:
                marks[mark] = {"test_acc": accuracy(model, xt, yt),
                               "val_acc": accuracy(model, xv, yv), "cpu_s": cpu, "rows": rows,
                               "steps": steps}
    for mark in ("time", "rows"):  # a diverged run keeps its last weights' accuracy
        marks.setdefault(mark, {"test_acc": accuracy(model, xt, yt),
                                "val_acc": accuracy(model, xv, yv), "cpu_s": cpu,
                                "rows": rows, "steps": steps})
    print(f"cnn_peers: {data} {method} seed {seed}: "
          + ", ".join(f"{m} {v['test_acc']:.3f}" for m, v in marks.items()),
          file=sys.stderr, flush=True)
    return {"data": data, "method": method, "seed": seed, "lr": lr,
            "rows_per_step": rows / steps, "diverged": diverged, **marks}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        entry = {"method": method, "lr": rs[0]["lr"], "what": METHODS[method][1],
                 "rows_per_step": statistics.fmean(r["rows_per_step"] for r in rs),
                 "diverged": sum(r["diverged"] for r in rs)}
        for mark in ("time", "rows"):
            accs = [r[mark]["test_acc"] for r in rs]
            entry[mark] = {"test_acc": accs, "mean": statistics.fmean(accs),
                           "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                           "steps": statistics.fmean(r[mark]["steps"] for r in rs),
                           "rows": statistics.fmean(r[mark]["rows"] for r in rs),
                           "cpu_s": statistics.fmean(r[mark]["cpu_s"] for r in rs)}
        out.append(entry)
    return out


def write_report(result: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    s, m = result["settings"], result["machine"]
    lines = [
        "# LeNet-5 training: ULR, forward gradient, SPSA and ES at equal time and equal rows",
        "",
        f"Generated by `{result['command']}` "
        + (f"in {result['seconds'] / 60:.1f} min (wall) " if ";" not in result["command"]
           else "(one command after another) ") + "on "
        f"{m['cpu']}, {m['logical_cores']} logical cores (shared; {s['jobs']} runs at a time, "
        f"one torch thread each); torch {m['torch']}, ulr {m['ulr']}.",
        "",
        f"{s['data']} LeNet-5, seeds {s['seeds']}, batch 32, Adam at a constant rate, the same "
        "initial weights and data order for every method (the `ulr bench` harness). Test "
        f"accuracy (mean ± std over seeds) after **{s['time_s']:g} CPU seconds** of training "
        f"steps, and after **{s['rows']:.3g} forward rows** (examples × forward evaluations). "
        "See the script's docstring for the methods.",
        "",
        "| method | lr | rows/step | equal time: test acc | steps | rows | equal rows: test "
        "acc | steps | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in result["summary"]:
        t, r = e["time"], e["rows"]
        lines.append(
            f"| `{e['method']}`: {e['what']} | {e['lr']:g} | {e['rows_per_step']:.0f} | "
            f"{100 * t['mean']:.2f}% ± {100 * t['std']:.2f} | {t['steps']:.0f} | "
            f"{t['rows']:.3g} | {100 * r['mean']:.2f}% ± {100 * r['std']:.2f} | "
            f"{r['steps']:.0f} | {r['cpu_s']:.0f} |")
    best = {mark: max(result["summary"], key=lambda e: e[mark]["mean"])["method"]
            for mark in ("time", "rows")}
    lines += ["", f"Best at equal time: `{best['time']}`; at equal rows: `{best['rows']}`."]
    if result.get("lr_check"):
        seed = result["lr_check"][0]["seed"]
        lines += ["", f"Learning-rate check (seed {seed}, test accuracy at equal time / equal "
                  "rows; the table's rate first):", "",
                  "| method | lr | equal time | equal rows |", "|---|---:|---:|---:|"]
        main_runs = {(r["method"], r["seed"]): r for r in result["runs"]}
        for method in dict.fromkeys(r["method"] for r in result["lr_check"]):
            own = main_runs[(method, seed)]
            for r in [own, *[c for c in result["lr_check"] if c["method"] == method]]:
                lines.append(f"| `{method}` | {r['lr']:g} | {100 * r['time']['test_acc']:.2f}% | "
                             f"{100 * r['rows']['test_acc']:.2f}% |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def lr_check(methods: list[str], path: Path, jobs: int, command: str) -> list[dict[str, Any]]:
    """Seed 0 of ``methods`` at the grid's other rates, kept beside the runs of ``path``."""
    result = json.loads(path.read_text())
    s = result["settings"]
    tasks = [(s["data"], m, s["seeds"][0], s["time_s"], int(s["rows"]), lr) for m in methods
             for lr in LR_GRID if lr != METHODS[m][0]]
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            runs = pool.map(run, tasks, chunksize=1)
    else:
        runs = [run(t) for t in tasks]
    kept = [r for r in result.get("lr_check", []) if r["method"] not in methods]
    result["lr_check"] = kept + runs
    result["command"] = f"{result['command']}; {command}"
    write_report(result, path.parent, path.stem)
    return runs


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--smoke", "--quick", action="store_true",
                   help="seconds: digits (8x8), one seed, tiny budgets")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--add-seeds", type=int, nargs="+", metavar="SEED",
                   help="run only these seeds and add them to the runs of an existing "
                        "cnn-peers.json of the same budgets")
    p.add_argument("--add-methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                   help="(re)run only these methods, for the seeds of an existing cnn-peers.json")
    p.add_argument("--time", type=float, default=60.0, help="CPU seconds per run")
    p.add_argument("--rows", type=float, default=2e6, help="forward rows per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--lr-check", nargs="+", metavar="METHOD",
                   help="train seed 0 of these methods at the other rates of "
                        f"{list(LR_GRID)} and add them to an existing cnn-peers.json (is "
                        "each method's rate the best of the grid?)")
    args = p.parse_args(argv)
    data, seeds, time_s, rows, jobs = (("digits", (0,), 0.3, 2e4, 1) if args.smoke else
                                       ("fashion-mnist", tuple(range(args.seeds)), args.time,
                                        args.rows, args.jobs))
    stem = "cnn-peers-smoke" if args.smoke else "cnn-peers"
    if args.lr_check:
        return lr_check(args.lr_check, Path(args.out) / f"{stem}.json", jobs,
                        "python benchmarks/cnn_peers.py "
                        + " ".join(sys.argv[1:] if argv is None else argv))
    earlier: list[dict[str, Any]] = []
    t_earlier = 0.0
    command = "python benchmarks/cnn_peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    old: dict[str, Any] = {}
    if args.add_seeds or args.add_methods:
        old = json.loads((Path(args.out) / f"{stem}.json").read_text())
        s = old["settings"]
        if (s["data"], s["time_s"], s["rows"]) != (data, time_s, rows):
            raise SystemExit(f"cnn_peers: {args.out}/{stem}.json has other budgets: {s}")
        new_seeds, new_methods = set(args.add_seeds or ()), set(args.add_methods or ())
        earlier = [r for r in old["runs"]
                   if r["seed"] not in new_seeds and r["method"] not in new_methods]
        seeds = tuple(sorted(set(s["seeds"]) | new_seeds))
        command = f"{old['command']}; {command}"
        t_earlier = old["seconds"]
    done = {(r["method"], r["seed"]) for r in earlier}
    tasks = [(data, method, seed, time_s, int(rows)) for seed in seeds for method in METHODS
             if (method, seed) not in done]
    t0 = time.time()
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            runs = earlier + pool.map(run, tasks, chunksize=1)
    else:
        runs = earlier + [run(t) for t in tasks]
    result = {"command": command.strip(), "seconds": t_earlier + time.time() - t0,
              "machine": machine(),
              "settings": {"data": data, "seeds": list(seeds), "time_s": time_s, "rows": rows,
                           "jobs": jobs},
              "summary": summarize(runs), "runs": runs}
    if old.get("lr_check"):
        result["lr_check"] = old["lr_check"]
    write_report(result, Path(args.out), stem)
    return result["summary"]


if __name__ == "__main__":
    main()
