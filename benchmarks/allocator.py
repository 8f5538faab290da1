"""System time and page faults of CNN training with and without ulr.tune_allocator().

Runs `ulr train --method ulr ... --max-steps N` in child processes, alternating
ULR_TUNE_ALLOCATOR=0 (glibc's defaults: every buffer above the mmap threshold is mapped and
unmapped per allocation) and =1 (the default of the `ulr` commands), and reads each child's
user and system CPU time and minor page faults (getrusage), its training time and its final
weights (which must be the same bit for bit).

    python benchmarks/allocator.py            # writes docs/results/allocator-cpu.{json,md}
    python benchmarks/allocator.py --smoke    # digits LeNet-5, 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# (label, ulr train arguments)
CASES = [
    ("LeNet-5, Fashion-MNIST, batch 64 (defaults: K = 32, layer-wise)",
     ["--data", "fashion-mnist", "--model", "lenet5", "--batch-size", "64"]),
    ("LeNet-5, Fashion-MNIST, --recommended (64-128 copies per layer)",
     ["--data", "fashion-mnist", "--model", "lenet5", "--batch-size", "64", "--recommended"]),
    ("MLP 64-128-10, digits (the demo)", ["--data", "digits", "--model", "mlp"]),
]
SMOKE = [("LeNet-5, digits (smoke)", ["--data", "digits", "--model", "lenet5"])]


def run_once(args: list[str], steps: int, tuned: bool, out: Path) -> dict:
    env = {**os.environ, "ULR_TUNE_ALLOCATOR": "1" if tuned else "0"}
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(name, None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ulr", "train", "--method", "ulr", "--max-steps",
                    str(steps), "--device", "cpu", "--out", str(out), *args],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((out / "summary.json").read_text())
    weights = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    return {"tuned": tuned, "user_s": after.ru_utime - before.ru_utime,
            "system_s": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt, "wall_s": wall,
            "train_s": summary["train_time_s"], "peak_rss_mb": summary["peak_rss_mb"],
            "weights": weights}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats = 3, 1
    cases = SMOKE if args.smoke else CASES
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory(prefix="ulr-alloc-") as tmp:
        for label, train_args in cases:
            runs = []
            for r in range(args.repeats):
                for tuned in (False, True):
                    out = Path(tmp) / f"{len(rows)}-{r}-{int(tuned)}"
                    runs.append(run_once(train_args, args.steps, tuned, out))
            same = all(all(torch.equal(a, b) for a, b in zip(
                runs[0]["weights"].values(), x["weights"].values(), strict=True)) for x in runs)
            row = {"case": label, "command": "ulr train --method ulr " + " ".join(train_args)
                   + f" --max-steps {args.steps}", "same_weights": same}
            for tuned in (False, True):
                mine = [x for x in runs if x["tuned"] == tuned]
                key = "tuned" if tuned else "default"
                row[key] = {k: round(sum(x[k] for x in mine) / len(mine), 3) for k in
                            ("user_s", "system_s", "minor_faults", "wall_s", "train_s",
                             "peak_rss_mb")}
                row[key]["system_share"] = round(
                    row[key]["system_s"] / (row[key]["user_s"] + row[key]["system_s"]), 3)
            rows.append(row)
            print(f"{label}: system share {row['default']['system_share']:.0%} -> "
                  f"{row['tuned']['system_share']:.0%}, train s {row['default']['train_s']:.1f} "
                  f"-> {row['tuned']['train_s']:.1f}, same weights {same}", flush=True)
    if not args.smoke:
        write(rows, args, time.time() - started)
    return rows


def write(rows: list[dict], args: argparse.Namespace, seconds: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "libc": " ".join(platform.libc_ver()), "torch": torch.__version__,
            "steps": args.steps, "repeats": args.repeats, "seconds": round(seconds, 1),
            "command": "python benchmarks/allocator.py" + (
                f" --steps {args.steps}" if args.steps != 20 else "")}
    (out / "allocator-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Allocator: system time of training with and without `ulr.tune_allocator()`", "",
        f"`ulr train --method ulr` for {args.steps} steps in a child process, glibc's malloc "
        f"defaults (`ULR_TUNE_ALLOCATOR=0`) against the `ulr` commands' default "
        f"(`ulr.tune_allocator()`: no mmap per allocation, freed memory kept), alternating, "
        f"mean of {args.repeats} runs each. CPU times and minor page faults from getrusage of "
        f"the child (the whole process: start-up, data loading and the final evaluation "
        f"included); *train s* is the training loop alone. Machine: {meta['machine']}, "
        f"{meta['cpus']} cores, {meta['libc']}, torch {meta['torch']}; {meta['seconds']} s. "
        f"Reproduce: `{meta['command']}`.", "",
        "| case | allocator | user s | system s | system share | minor faults | train s | "
        "peak RSS MB | same weights |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        for key in ("default", "tuned"):
            r = row[key]
            lines.append(f"| {row['case']} | {'glibc defaults' if key == 'default' else 'tuned'}"
                         f" | {r['user_s']:.1f} | {r['system_s']:.1f} | "
                         f"{r['system_share']:.0%} | {r['minor_faults']:,.0f} | "
                         f"{r['train_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                         f"{'yes' if row['same_weights'] else 'NO'} |")
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in rows)]
    (out / "allocator-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
