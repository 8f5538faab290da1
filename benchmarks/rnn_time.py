"""Gradient-computation time vs sequence length: ULR (no backprop through time) vs BPTT.

The same LSTM (cells built from one ``nn.Linear`` each, :class:`ulr.models.RecurrentClassifier`
with ``impl="cell"``) gets its gradient three ways on the same batch:

- ``bptt``: forward with autograd, then ``loss.backward()`` through all time steps;
- ``ulr``: ``est.loss_and_grads`` with ``K`` antithetic copies in one pass (all sites at once);
  every site is a closed-form Linear, so it runs under no-grad, and the gradient is
  ``Σ_t g_t [x_t, h_{t-1}]^T`` with no sequential backward;
- ``ulr_forward``: only the no-grad forward over the ``K·B`` rows that ``ulr`` runs (to show where
  ULR's time goes: the rest is noise sampling and the per-step weight products);
- ``fused_bptt``: ``nn.LSTM`` (one fused call) forward + backward, for scale.

Writes ``rnn-time-cpu.json`` / ``.md``.

    python benchmarks/rnn_time.py             # ~1 min, one CPU thread
    python benchmarks/rnn_time.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import ulr
from ulr.models import RecurrentClassifier


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    # One thread: on a shared machine two intra-op threads spin against other jobs and the
    # timings of these small kernels become meaningless.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.repeats, args.batch, args.copies = [4, 8], 1, 4, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RecurrentClassifier("lstm", args.features, 10, hidden_size=args.hidden)
    fused = RecurrentClassifier("lstm", args.features, 10, hidden_size=args.hidden,
                                impl="fused")
    est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.05), num_copies=args.copies,
                              sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                              plan=ulr.plans.all_sites(),
                              generator=torch.Generator().manual_seed(0))
    rows = []
    for t in args.lengths:
        x = torch.randn(args.batch, t, args.features)
        y = torch.randint(0, 10, (args.batch,))
        tiled = x.repeat(args.copies, 1, 1)

        def bptt(m=model, x=x, y=y):
            m.zero_grad(set_to_none=True)
            ce(m(x), y).mean().backward()

        def ulr_step(x=x, y=y):
            model.zero_grad(set_to_none=True)
            est.loss_and_grads(ce, x, y)

        def ulr_forward(tiled=tiled):
            with torch.no_grad():
                model(tiled)

        row = {"seq_len": t, "batch": args.batch, "copies": args.copies, "hidden": args.hidden,
               "bptt_s": _timed(bptt, args.repeats),
               "ulr_s": _timed(ulr_step, args.repeats),
               "ulr_forward_s": _timed(ulr_forward, args.repeats),
               "fused_bptt_s": _timed(lambda x=x, y=y: bptt(fused, x, y), args.repeats)}
        row["ulr_over_bptt"] = row["ulr_s"] / row["bptt_s"]
        row["ulr_forward_share"] = row["ulr_forward_s"] / row["ulr_s"]
        rows.append(row)
        print(f"T={t:4d}  bptt {1e3 * row['bptt_s']:8.1f} ms   ulr {1e3 * row['ulr_s']:8.1f} ms "
              f"(forward {100 * row['ulr_forward_share']:.0f}%)   fused bptt "
              f"{1e3 * row['fused_bptt_s']:8.1f} ms", flush=True)
    env = {"machine": f"{platform.processor() or platform.machine()}, CPU",
           "threads": args.threads, "torch": torch.__version__,
           "command": "python benchmarks/rnn_time.py" + (" --smoke" if args.smoke else "")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "rnn-time-smoke" if args.smoke else "rnn-time-cpu"
    (out / f"{name}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = [f"Machine: {env['machine']}, {env['threads']} threads, torch {env['torch']}. "
             f"LSTM cells, hidden {args.hidden}, batch {args.batch}, ULR with "
             f"{args.copies} antithetic copies in one pass. Median of {args.repeats}. "
             f"Command: `{env['command']}`.", "",
             "| T | BPTT ms | ULR ms | ULR / BPTT | ULR no-grad forward share | fused nn.LSTM "
             "BPTT ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq_len']} | {1e3 * r['bptt_s']:.1f} | {1e3 * r['ulr_s']:.1f} | "
                     f"{r['ulr_over_bptt']:.2f} | {100 * r['ulr_forward_share']:.0f}% | "
                     f"{1e3 * r['fused_bptt_s']:.1f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
