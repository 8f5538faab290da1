"""Domain adaptation (DANN) by ULR and by backprop: target accuracy with and without adaptation.

Runs `examples/domain_adaptation.py`'s `train` (MNIST subset shrunk to 8x8 -> scikit-learn
digits; feature extractor, label classifier, domain classifier) for each method, with the
domain-adversarial term (λ ramped to `--lam`) and without it (λ = 0: source only; everything
else identical: same seeds, data order, noise, domain classifier trained alongside), over
several seeds. ULR variants: `ulr` (one site at the feature boundary, backprop inside F, the
reversal applied to that LR signal) and `ulr-layers` (a site after each of F's layers, no
backprop at all). Writes docs/results/domain-adaptation-cpu.{json,md}.

    OMP_NUM_THREADS=1 python benchmarks/domain_adaptation.py     # ~15 min on a loaded machine
    python benchmarks/domain_adaptation.py --smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from statistics import mean, pstdev

import torch

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("domain_adaptation",
                                                  ROOT / "examples" / "domain_adaptation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METHODS = {"bp": ("bp", "boundary"), "ulr": ("ulr", "boundary"),
           "ulr-layers": ("ulr", "layers")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--num-copies", type=int, default=32)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    da = _example()
    runs = []
    seeds = args.seeds[:1] if args.smoke else args.seeds
    for name in args.methods:
        method, sites = METHODS[name]
        for seed in seeds:
            data = da.domains(seed)
            for adapt in (False, True):
                t = time.time()
                r = da.train(method, adapt, epochs=args.epochs, lam_max=args.lam, seed=seed,
                             num_copies=4 if args.smoke else args.num_copies,
                             feature_sites=sites, data=data,
                             max_steps=2 if args.smoke else None)
                r.update(variant=name, seed=seed, wall_s=round(time.time() - t, 1))
                runs.append(r)
                print(f"{name:10s} seed {seed} {'DANN' if adapt else 'source-only':11s} "
                      f"target {r['target_acc']:.4f} source {r['source_train_acc']:.4f} "
                      f"{r['wall_s']} s", flush=True)
        if not args.smoke:
            write(runs, args)
    if args.smoke:
        write(runs, args)
    return runs


def write(runs, args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        for adapt in (False, True):
            rs = [r for r in runs if r["variant"] == name and r["adapt"] == adapt]
            if not rs:
                continue
            acc = [r["target_acc"] for r in rs]
            summary.append({"variant": name, "adapt": adapt, "seeds": [r["seed"] for r in rs],
                            "target_acc_mean": mean(acc), "target_acc_std": pstdev(acc),
                            "target_acc_per_seed": acc,
                            "source_train_acc_mean": mean(r["source_train_acc"] for r in rs),
                            "wall_s_mean": round(mean(r["wall_s"] for r in rs), 1)})
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__, "threads": 1, "epochs": args.epochs, "lam": args.lam,
            "num_copies": args.num_copies,
            "note": "shared 2-core machine (other jobs running); times are indicative",
            "command": "python benchmarks/domain_adaptation.py " + " ".join(
                a for a in sys.argv[1:] if a not in (args.out, "--out"))}
    (out / "domain-adaptation-cpu.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    lines = ["# Domain adaptation (DANN): MNIST subset (8x8) -> scikit-learn digits", "",
             f"Target = digits test split (labels never used in training). {args.epochs} "
             f"epochs over the source, batch 32 source + 32 target rows, Adam; λ ramps to "
             f"{args.lam} (DANN schedule). *source only* is the same run with λ = 0. ULR: "
             f"K = {args.num_copies} iid copies per layer-wise pass, σ = 0.1, "
             f"leave-one-out baseline. One CPU thread, {meta['machine']}, torch "
             f"{meta['torch']}; {meta['note']}. Generated by `{meta['command']}`.", "",
             "| method | adaptation | target acc (mean ± std) | per seed | source train acc | "
             "s per run |", "|---|---|---:|---|---:|---:|"]
    for s in summary:
        per = ", ".join(f"{a:.1%}" for a in s["target_acc_per_seed"])
        lines.append(f"| {s['variant']} | {'DANN' if s['adapt'] else 'source only'} | "
                     f"{s['target_acc_mean']:.1%} ± {s['target_acc_std']:.1%} | {per} | "
                     f"{s['source_train_acc_mean']:.1%} | {s['wall_s_mean']} |")
    (out / "domain-adaptation-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
