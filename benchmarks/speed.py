"""Step time of the ULR estimator relative to a plain forward pass over the same K·B rows.

Every number of one run is measured in the same process, in rounds that run every case in
turn (interleaved; each warm), as the median over rounds of the ratio to that round's no-grad
forward of K·B rows (docs/method.md §6 predicts ≈ 2 for the closed-form path: the forward
plus one weight-gradient product per site). Writes JSON and a markdown table.

    python benchmarks/speed.py                 # CPU: docs/results/speed-cpu.{json,md,png}
    python benchmarks/speed.py --device cuda   # on a GPU
    python benchmarks/speed.py --smoke         # tiny, for CI
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ulr


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(cases, device, repeats):
    """Per case, the times of ``repeats`` rounds; each round runs every case in turn, so that
    a slow spell of the machine hits all cases of that round alike. Within a round a case runs
    twice and the second run is timed: warm, as in a training loop that repeats one step
    (the first pays for the memory the previous case gave back to the system)."""
    times = {c: [] for c in cases}
    for _ in range(repeats):
        for c, fn in cases.items():
            fn()
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[c].append(time.perf_counter() - t)
    return times


def models(smoke):
    width = 64 if smoke else 256
    yield "mlp-784-256-256-10", nn.Sequential(
        nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10)), (1, 28, 28)
    yield "lenet5-28", ulr.models.build("lenet5", in_shape=(1, 28, 28), num_classes=10), (1, 28, 28)
    if not smoke:
        yield "vgg8-32", ulr.models.build("vgg8", in_shape=(3, 32, 32), num_classes=10), (3, 32, 32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--copies", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.copies, args.repeats = 8, 4, 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for name, model, shape in models(args.smoke):
        model = model.to(device)
        b, k = args.batch, args.copies
        x = torch.randn(b, *shape, device=device)
        y = torch.randint(0, 10, (b,), device=device)
        xk, yk = x.repeat(k, 1, 1, 1), y.repeat(k)

        def forward():
            with torch.no_grad():
                model(xk)

        def bp_kb():
            model.zero_grad(set_to_none=True)
            ce(model(xk), yk).mean().backward()

        def bp_b():
            model.zero_grad(set_to_none=True)
            ce(model(x), y).mean().backward()

        gen = torch.Generator(device=device).manual_seed(0)
        plain = ulr.LikelihoodRatio(model, num_copies=k, sampler=ulr.iid(),
                                    baseline=ulr.baselines.none(), plan=ulr.plans.all_sites(),
                                    generator=gen)
        best = ulr.LikelihoodRatio(model, num_copies=k, sampler=ulr.antithetic(),
                                   baseline=ulr.baselines.leave_one_out(),
                                   plan=ulr.plans.layerwise(), generator=gen)
        n_sites = len(plain._module_sites)

        def ulr_step(est):
            def run():
                model.zero_grad(set_to_none=True)
                est.loss_and_grads(ce, x, y)
            return run

        cases = {"forward K·B (no grad)": forward, "ULR all-sites iid": ulr_step(plain),
                 "ULR layer-wise antithetic+LOO": ulr_step(best), "BP on K·B rows": bp_kb,
                 "BP on B rows": bp_b}
        times = timed(cases, device, args.repeats)
        base = times["forward K·B (no grad)"]
        for c, ts in times.items():
            # the ratio within each round, then the median over rounds
            ratio = statistics.median(t / f for t, f in zip(ts, base, strict=True))
            t = statistics.median(ts)
            rows.append({"model": name, "case": c, "sites": n_sites, "batch": b, "copies": k,
                         "ms": round(t * 1e3, 3), "ratio_to_forward": round(ratio, 2)})
            print(f"{name:22s} {c:32s} {t * 1e3:9.2f} ms  x{ratio:5.2f}")

    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else platform.processor() or platform.machine())
    meta = {"device": dev_name, "torch": torch.__version__, "ulr": ulr.__version__,
            "threads": torch.get_num_threads(), "batch": args.batch, "copies": args.copies,
            "repeats": args.repeats, "command": "python benchmarks/speed.py " + " ".join(
                argv if argv is not None else __import__("sys").argv[1:])}
    if args.smoke:
        return rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speed-{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# ULR step time vs a plain forward ({dev_name})", "",
             f"torch {meta['torch']}, {meta['threads']} threads, batch B={args.batch}, "
             f"K={args.copies} copies; {args.repeats} interleaved rounds. ms = median; ratio = "
             f"median over rounds of time / that round's no-grad forward of K·B rows. "
             f"Layer-wise runs one K·B pass per site. Reproduce: "
             f"`{meta['command']}`", "",
             "| model | case | ms | ratio |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['case']} | {r['ms']} | {r['ratio_to_forward']} |" for r in rows]
    lines += ["", f"![step time ratios]({stem}.png)"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    from ulr.evaluate.plots import ratio_bars

    ratio_bars(rows, out / f"{stem}.png", value="ratio_to_forward", target=2.2,
               xlabel="step time / no-grad forward of K·B rows",
               title=f"Step time ({dev_name}; B={args.batch}, K={args.copies})")
    return rows


if __name__ == "__main__":
    main()
