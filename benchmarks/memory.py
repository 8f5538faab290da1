"""Peak memory of one gradient step: ULR store / chunked / replay vs inference and backprop.

Each case runs in a fresh process so that peaks do not leak between cases. On CPU the number
is the rise of the process's peak resident memory (ru_maxrss) over its resident memory just
before the step (after a warm-up forward on B rows has paid the allocators' one-off costs); on
CUDA it is the rise of ``torch.cuda.max_memory_allocated``. Ratios are to plain inference over
the same K·B rows. Children run with a fixed glibc mmap threshold so that freed buffers leave
the resident set (otherwise heap fragmentation inflates every peak).

    python benchmarks/memory.py                     # writes docs/results/memory-cpu.{json,md,png}
    python benchmarks/memory.py --device cuda
    python benchmarks/memory.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

CASES = ["inference K·B", "backprop B", "backprop K·B", "ULR store", "ULR chunked (K/8)",
         "ULR replay"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child(case: str, model_name: str, device: str, batch: int, copies: int, width: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import ulr

    torch.set_num_threads(2)
    torch.manual_seed(0)
    dev = torch.device(device)
    if model_name == "mlp":
        model = nn.Sequential(nn.Flatten(), *[m for _ in range(4) for m in (
            nn.LazyLinear(width), nn.ReLU())], nn.Linear(width, 10))
        x = torch.randn(batch, 1, 28, 28)
    else:
        model = ulr.models.build("vgg8", in_shape=(3, 32, 32), num_classes=10)
        x = torch.randn(batch, 3, 32, 32)
    model = model.to(dev)
    x, y = x.to(dev), torch.randint(0, 10, (batch,), device=dev)
    with torch.no_grad():
        model(x)  # materialise lazy layers, warm the allocator

    def ce(o, t):
        return F.cross_entropy(o, t, reduction="none")

    memory = {"ULR store": "store", "ULR chunked (K/8)": "chunked", "ULR replay": "replay"}
    est = None
    if case in memory:
        est = ulr.LikelihoodRatio(model, num_copies=copies, memory=memory[case],
                                  sampler=ulr.iid(), baseline=ulr.baselines.none(),
                                  plan=ulr.plans.all_sites(),
                                  chunk_size=max(1, copies // 8) if "chunked" in case else None,
                                  generator=torch.Generator(device=dev).manual_seed(0))
    xk, yk = x.repeat(copies, *([1] * (x.dim() - 1))), y.repeat(copies)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_mb()
    if case == "inference K·B":
        with torch.no_grad():
            model(xk)
    elif case == "backprop B":
        ce(model(x), y).mean().backward()
    elif case == "backprop K·B":
        ce(model(xk), yk).mean().backward()
    else:
        est.loss_and_grads(ce, x, y)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    grad_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"case": case, "model": model_name, "peak_mb": round(max(peak, 0.0), 1),
            "grad_buffers_mb": round(grad_mb, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--copies", type=int, default=32)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("CASE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.copies, args.width = 4, 8, 32
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.device, args.batch,
                                args.copies, args.width)))
        return []
    rows = []
    for model_name in ("mlp",) if args.smoke else ("mlp", "vgg8"):
        for case in CASES:
            cmd = [sys.executable, __file__, "--child", case, model_name, "--device",
                   args.device, "--batch", str(args.batch), "--copies", str(args.copies),
                   "--width", str(args.width)]
            # Fixed mmap threshold: large buffers go back to the OS when freed, so the resident
            # peak tracks live tensors instead of glibc heap fragmentation.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        base = next(r["peak_mb"] for r in rows if r["model"] == model_name
                    and r["case"] == "inference K·B")
        for r in rows:
            if r["model"] == model_name:
                r["ratio_to_inference"] = round(r["peak_mb"] / base, 2) if base else None
                # A training step ends with a gradient for every parameter, whatever computes
                # it: the floor of any step is inference plus those buffers.
                r["ratio_to_inference_plus_grads"] = round(
                    r["peak_mb"] / (base + r["grad_buffers_mb"]), 2)
                print(f"{model_name:6s} {r['case']:20s} {r['peak_mb']:9.1f} MB  "
                      f"x{r['ratio_to_inference']}  x{r['ratio_to_inference_plus_grads']} "
                      f"(+grads)", flush=True)
    if args.smoke:
        return rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory-{args.device.split(':')[0]}"
    meta = {"device": args.device, "batch": args.batch, "copies": args.copies,
            "mlp_width": args.width,
            "command": " ".join(["python benchmarks/memory.py", *(
                a for a in sys.argv[1:] if a not in (args.out, "--out"))])}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Peak memory of one step ({args.device})", "",
             f"B = {args.batch} examples, K = {args.copies} copies; MLP 784-{args.width}x4-10 and "
             f"VGG-8 on 3x32x32. Peak rise during the step, each case in a fresh process. "
             f"Reproduce: `{meta['command']}`.", "",
             "Gradient buffers = the size of the parameters: every training step, backprop's "
             "or ULR's, ends holding them, so *inference + gradient buffers* is the floor of "
             "any step. It matters for the MLP, whose weights are as large as its K·B-row "
             "activations; VGG-8's activations dominate.", "",
             "| model | case | peak MB | ratio to inference on K·B rows | ratio to inference + "
             "gradient buffers |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['case']} | {r['peak_mb']} | {r['ratio_to_inference']} | "
              f"{r['ratio_to_inference_plus_grads']} |" for r in rows]
    grads = {r["model"]: r["grad_buffers_mb"] for r in rows}
    lines += ["", "Gradient buffers: " + ", ".join(f"{m} {g} MB" for m, g in grads.items()) + ".",
              "", f"![peak memory ratios]({stem}.png)"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    from ulr.evaluate.plots import ratio_bars

    ratio_bars(rows, out / f"{stem}.png", value="ratio_to_inference",
               xlabel="peak memory / inference on K·B rows", target=1.3,
               title=f"Peak memory of one step ({args.device}; B={args.batch}, K={args.copies})")
    return rows


if __name__ == "__main__":
    main()
