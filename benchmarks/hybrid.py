"""Hybrid BP/LR: pure ULR vs 4, 2 and 1 blocks vs pure backprop on the same CNN.

Every run goes through `ulr.train.fit` (the code of `ulr train`) with the same model, data,
seed (same initial weights and data order), epochs, copies and noise; only `--blocks` changes:
unset = every parameterised layer its own block (pure ULR), N = N equal blocks with a site at
each block's end and backprop inside, 0 = pure backprop. During training, every `--diag-every`
steps the per-layer cosine of the estimated gradient with backprop's gradient of the same batch
is logged (`--diag-every`); the table reports its mean over the run. Writes
docs/results/hybrid-<model>-<data>.{json,md,png}.

    OMP_NUM_THREADS=1 python benchmarks/hybrid.py     # LeNet-5 on digits, 3 seeds, ~10 min
    OMP_NUM_THREADS=1 python benchmarks/hybrid.py --data mnist-subset --epochs 5 --seeds 0
    python benchmarks/hybrid.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from statistics import mean

from ulr.train import Callback, RunConfig, fit
from ulr.train.config_file import to_command

VARIANTS = [("pure ULR", None), ("hybrid 4 blocks", 4), ("hybrid 2 blocks", 2),
            ("hybrid 1 block", 1), ("pure BP", 0)]


class _Diag(Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_diag(self, row):
        self.rows.append(row)


command = to_command


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lenet5")
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-copies", type=int, default=32)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--diag-every", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--out", default="docs/results")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    rows = []
    seeds = args.seeds[:1] if args.smoke else args.seeds
    for (label, blocks), seed in ((v, s) for v in VARIANTS for s in seeds):
        cfg = RunConfig(model=args.model, data=args.data, method="ulr", blocks=blocks,
                        epochs=1 if args.smoke else args.epochs, batch_size=args.batch_size,
                        num_copies=args.num_copies, sigma=args.sigma, seed=seed,
                        threads=1, device="cpu", diag_every=0 if blocks == 0 else (
                            1 if args.smoke else args.diag_every),
                        max_steps=2 if args.smoke else None)
        diag = _Diag()
        started = time.time()
        summary = fit(cfg, out_dir=None, callbacks=[diag])
        layers = sorted({k for r in diag.rows for k in r["cosine"]},
                        key=lambda k: list(diag.rows[0]["cosine"]).index(k)) if diag.rows else []
        cos = {k: mean(r["cosine"][k] for r in diag.rows if r["cosine"][k] is not None)
               for k in layers}
        row = {
            "variant": label, "blocks": blocks, "model": args.model, "data": args.data,
            "seed": seed,
            "epochs": summary["epochs_completed"], "test_acc": summary["final"]["test_acc"],
            "test_acc_at_best": summary["best"]["test_acc"] if summary["best"] else None,
            "cosine_per_layer": cos,
            "cosine_all": (mean(r["cosine_all"] for r in diag.rows if r["cosine_all"] is not None)
                           if diag.rows else None),
            "wall_s": round(time.time() - started, 1), "train_s": round(summary["train_time_s"], 1),
            "forward_rows": summary["forward_rows"], "lr": summary["config"]["lr"],
            "command": command(cfg),
        }
        rows.append(row)
        print(f"{label:16s} seed {seed} test {row['test_acc']:.4f}  cos {row['cosine_all']}  "
              f"{row['wall_s']:.0f} s", flush=True)
        if not args.smoke:
            write(rows, args)
    if args.smoke:
        write(rows, args)
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return mean(values) if values else None


def summarize(rows):
    """One row per variant: means over seeds (and the spread of the test accuracy)."""
    out = []
    for label, blocks in VARIANTS:
        runs = [r for r in rows if r["variant"] == label]
        if not runs:
            continue
        layers = list(runs[0]["cosine_per_layer"])
        accs = [r["test_acc"] for r in runs]
        out.append({
            "variant": label, "blocks": blocks, "seeds": [r["seed"] for r in runs],
            "test_acc": mean(accs), "test_acc_min": min(accs), "test_acc_max": max(accs),
            "test_acc_at_best": _mean(r["test_acc_at_best"] for r in runs),
            "cosine_all": _mean(r["cosine_all"] for r in runs),
            "cosine_per_layer": {k: _mean(r["cosine_per_layer"].get(k) for r in runs)
                                 for k in layers},
            "train_s": round(mean(r["train_s"] for r in runs), 1),
            "forward_rows": mean(r["forward_rows"] for r in runs),
            "command": runs[0]["command"],
        })
    return out


def write(rows, args):
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"hybrid-{args.model}-{args.data}"
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__, "threads": 1,
            "note": "shared 2-core machine (other jobs running); times are indicative",
            "command": "python benchmarks/hybrid.py " + " ".join(
                a for a in sys.argv[1:] if a not in (args.out, "--out"))}
    summary = summarize(rows)
    (out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "runs": rows}, indent=1))
    layers = list(next((r["cosine_per_layer"] for r in summary if r["cosine_per_layer"]), {}))
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# Hybrid BP/LR: {args.model} on {args.data}", "",
             f"Same initial weights, data order, {args.epochs} epochs, batch {args.batch_size}, "
             f"K = {args.num_copies} copies and σ = {args.sigma} for every ULR variant "
             f"(layer-wise plan, antithetic copies, leave-one-out baseline: the `ulr train` "
             f"defaults); only `--blocks` changes. Means over seeds {seeds} (test accuracy: "
             f"mean [min-max]). *cos* is the mean over the run (every {args.diag_every} "
             f"steps) of the cosine between the estimated gradient and backprop's on the same "
             f"batch, per layer and for all parameters. One CPU thread, {meta['machine']}, "
             f"torch {meta['torch']}; {meta['note']}. Generated by `{meta['command']}`.", "",
             "| variant | --blocks | test acc | test acc @ best val | cos all | "
             + " | ".join(f"cos {k}" for k in layers) + " | train s | forward rows |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(layers) + "---:|---:|"]

    def f(v):
        return "" if v is None else f"{v:.3f}"

    for r in summary:
        at_best = r["test_acc_at_best"]
        cells = " | ".join(f(r["cosine_per_layer"].get(k)) for k in layers)
        lines.append(
            f"| {r['variant']} | {'' if r['blocks'] is None else r['blocks']} | "
            f"{r['test_acc']:.2%} [{r['test_acc_min']:.1%}-{r['test_acc_max']:.1%}] | "
            f"{'' if at_best is None else f'{at_best:.2%}'} | "
            f"{f(r['cosine_all']) or '1 (exact)'} | {cells} | {r['train_s']} | "
            f"{r['forward_rows']:.3g} |")
    lines += ["", "Commands (seed 0; `--seed N` for the others):", ""]
    lines += [f"- `{r['command']}`" for r in summary]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    _plot(summary, layers, out / f"{stem}.png")


def _plot(rows, layers, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        if r["cosine_per_layer"]:
            ax.plot(layers, [r["cosine_per_layer"].get(k) for k in layers], marker="o",
                    label=f"{r['variant']} ({r['test_acc']:.1%})")
    ax.set_ylabel("mean cosine with backprop")
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Per-layer gradient cosine (test accuracy in brackets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
