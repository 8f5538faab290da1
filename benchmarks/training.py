"""Training results: ULR next to backprop on the same model, data, seed and epochs.

Each pair of runs goes through `ulr.train.fit` (the code behind `ulr train`), so every row can
be reproduced with the `ulr train` command printed next to it. Writes
docs/results/training-<device>.{json,md}.

    python benchmarks/training.py                      # all suites on the CPU (slow: ~1 h)
    python benchmarks/training.py --device cuda        # the same on a GPU
    python benchmarks/training.py --suite digits       # one suite
    python benchmarks/training.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ulr.train import Callback, RunConfig, fit
from ulr.train.config_file import to_command

# Each suite: (dataset, model, model args, ULR overrides, epochs, batch size, floor).
# Floors are issue #3's: digits MLP ULR >= 96%; MNIST subset within 3 points of BP;
# Fashion-MNIST MLP ULR >= 85% and LeNet ULR >= 87%.
SUITES = {
    "digits": ("digits", "mlp", {}, {}, 30, 32, ("abs", 0.96)),
    "mnist-subset": ("mnist-subset", "mlp", {"hidden": [256]}, {}, 30, 32, ("gap", 0.03)),
    "fashion-mlp": ("fashion-mnist", "mlp", {"hidden": [256]}, {"sampler": "iid"}, 15, 64,
                    ("abs", 0.85)),
    "fashion-lenet": ("fashion-mnist", "lenet5", {}, {"sampler": "iid", "sigma": 0.05}, 15, 64,
                      ("abs", 0.87)),
    # the same with the lr annealed to 0 over the epochs (cosine), for ULR only
    "fashion-lenet-cosine": ("fashion-mnist", "lenet5", {},
                             {"sampler": "iid", "sigma": 0.05, "schedule": "cosine"}, 15, 64,
                             ("abs", 0.87)),
    # the model's recommended per-layer sigma and copy counts (64-128 copies per layer)
    "fashion-lenet-rec": ("fashion-mnist", "lenet5", {}, {"sampler": "iid", "recommended": True},
                          15, 64, ("abs", 0.87)),
}


class _EpochLine(Callback):
    """One line per epoch (these runs take up to hours on a CPU)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def on_epoch_end(self, row):
        accs = ", ".join(f"{k} {row[k]:.4f}" for k in ("val_acc", "test_acc")
                         if row.get(k) is not None)
        print(f"  {self.tag} epoch {row['epoch']}: {accs}", flush=True)


command = to_command


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", nargs="*", choices=list(SUITES), default=list(SUITES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="run seeds --seed .. --seed+N-1; rows report the mean (floors are "
                        "judged on it) and the per-seed accuracies")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for suite in ["digits"] if args.smoke else args.suite:
        data, model, margs, ulr_over, epochs, batch, floor = SUITES[suite]
        results = {}
        for method in ("ulr", "bp"):
            runs = []
            for seed in range(args.seed, args.seed + (1 if args.smoke else args.seeds)):
                cfg = RunConfig(data=data, model=model, model_args=margs, method=method,
                                epochs=1 if args.smoke else epochs, batch_size=batch,
                                seed=seed, device=args.device, threads=args.threads,
                                max_steps=3 if args.smoke else None,
                                **(ulr_over if method == "ulr" else {}))
                started = time.time()
                summary = fit(cfg, out_dir=None,
                              callbacks=[] if args.smoke else [_EpochLine(f"{suite} {method}")])
                runs.append((cfg, summary, time.time() - started))
                print(f"{suite:14s} {method:4s} seed {seed} test "
                      f"{summary['final']['test_acc']:.4f}  {runs[-1][2]:7.1f} s", flush=True)
            cfg, summary, _ = runs[0]
            accs = [r[1]["final"]["test_acc"] for r in runs]
            at_best = [r[1]["best"]["test_acc"] for r in runs if r[1]["best"]]
            res = {
                "suite": suite, "method": method, "data": data, "model": model,
                "epochs": summary["epochs_completed"],
                "seeds": [r[0].seed for r in runs],
                "test_acc": statistics.mean(accs),
                "test_acc_seeds": accs,
                "best_val_acc": summary["best"]["val_acc"] if summary["best"] else None,
                "test_acc_at_best": statistics.mean(at_best) if at_best else None,
                "wall_s": round(statistics.mean(r[2] for r in runs), 1),
                "forward_rows": summary["forward_rows"],
                "peak_mb": round(max(r[1].get("peak_cuda_mb") or r[1].get("peak_rss_mb") or 0
                                     for r in runs)),
                "command": command(cfg),
            }
            results[method] = res
            rows.append(res)
        kind, bar = floor
        ulr_acc, bp_acc = results["ulr"]["test_acc"], results["bp"]["test_acc"]
        ok = ulr_acc >= bar if kind == "abs" else bp_acc - ulr_acc <= bar
        results["ulr"]["floor"] = (f"ULR >= {bar:.0%}" if kind == "abs"
                                   else f"within {bar * 100:.0f} points of BP")
        results["ulr"]["floor_met"] = bool(ok)
        if not args.smoke:
            write(rows, args)  # after every suite: a long run that is cut keeps what it did
    return rows


def write(rows, args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"training-{args.device}"
    device = args.device
    try:
        import torch

        if args.device.startswith("cuda"):
            device = torch.cuda.get_device_name()
        meta = {"device": device, "torch": torch.__version__, "threads": args.threads,
                "seed": args.seed, "seeds": args.seeds,
                "command": "python benchmarks/training.py " + " ".join(
                    a for a in sys.argv[1:] if a != args.out and a != "--out")}
    except ImportError:  # pragma: no cover
        meta = {}
    path = out / f"{stem}.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    suites = {r["suite"] for r in rows}
    rows = [r for r in old if r["suite"] not in suites] + rows
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# ULR vs backprop: training results ({device})", "",
             "Same model, data, seeds, epochs and batch for both methods; test accuracy after "
             "the last epoch (mean over the seeds where a row lists several: floors are judged "
             "on it), and at the epoch of best validation accuracy. "
             f"torch {meta.get('torch')}, {args.threads} CPU threads. Generated by "
             f"`{meta.get('command')}`; each row's own command is below the table.", "",
             "| suite | method | epochs | test acc | test acc @ best val | wall s | forward rows "
             "| peak MB | floor |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        floor = ""
        if "floor" in r:
            floor = f"{r['floor']}: {'met' if r['floor_met'] else 'NOT met'}"
        at_best = r["test_acc_at_best"]
        acc = f"{r['test_acc']:.2%}"
        if len(r.get("test_acc_seeds", [])) > 1:  # mean (min–max over the seeds)
            accs = r["test_acc_seeds"]
            acc += f" ({min(accs):.2%}–{max(accs):.2%}, {len(accs)} seeds)"
        lines.append(f"| {r['suite']} | {r['method']} | {r['epochs']} | {acc} | "
                     f"{'' if at_best is None else f'{at_best:.2%}'} | {r['wall_s']} | "
                     f"{r['forward_rows']:.3g} | {r['peak_mb']} | {floor} |")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
