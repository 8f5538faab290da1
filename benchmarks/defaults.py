"""Direction of one estimate with the estimator's defaults, on many model families (issue 13).

For every case of ``tests/zoo.py`` and for small instances of the library's reference models
(``ulr.models.build`` on the embedded digits / sequential digits), one estimate by
``ulr.LikelihoodRatio(model, num_copies=K)`` with its defaults (iid copies,
leave-one-out baseline, layer-wise plan, Gaussian σ = 0.1: ``zoo.defaults()``) is compared, per
parameter, with autograd's gradient of the mean loss: min and mean cosine and the mean norm
ratio ||estimate|| / ||autograd||. The old defaults (one pass over all sites, no baseline) are
measured at the same K for comparison. The digits MLP of ``ulr train`` is also measured at
K = 256, where its first layer must reach a cosine of 0.75.

    python benchmarks/defaults.py               # writes docs/results/defaults-cpu.{json,md}
    python benchmarks/defaults.py --smoke       # tiny K, a few models
    python benchmarks/defaults.py --only mlp cnn lenet5 --copies 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ulr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import zoo  # noqa: E402  (tests/zoo.py: the model families and the measuring helpers)

FLOOR = 0.9  # per-parameter cosine at K = 4096, every model
DIGITS_FLOOR = 0.75  # first-layer cosine of the digits MLP at K = 256

CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {"new": zoo.defaults, "old": zoo.old_defaults}


def _registry_case(name: str, data: str, batch: int = 32, eval_mode: bool = False,
                   **kwargs: Any) -> Callable[[int], zoo.Case]:
    """``ulr.models.build(name)`` for ``data``'s examples, on its first ``batch`` training
    examples."""

    def make(seed: int) -> zoo.Case:
        ds = ulr.data.load(data, seed=0)
        torch.manual_seed(seed)
        model = ulr.models.build(name, in_shape=ds.input_shape, num_classes=ds.num_classes,
                                 **kwargs)
        if eval_mode:
            model.eval()
        x, y = ds.train
        return zoo.Case(model, x[:batch], y[:batch], zoo.ce)

    return make


# Reference models at small sizes. Left out: binary-mlp and snn (sign units / spikes: autograd's
# gradient is zero or a surrogate, not the gradient LR estimates), blackbox-mlp (numpy inside:
# no autograd gradient), gcn (a whole graph per batch, needs replicate=).
REGISTRY: dict[str, Callable[[int], zoo.Case]] = {
    "ulr:mlp (digits)": lambda seed: zoo.digits_mlp(seed, batch=32),
    "ulr:lenet5 (digits 8x8)": _registry_case("lenet5", "digits"),
    "ulr:resnet5 (digits 8x8)": _registry_case("resnet5", "digits"),
    "ulr:vgg8 (digits 8x8)": _registry_case("vgg8", "digits"),
    "ulr:resnet5-bn eval (digits 8x8)": _registry_case("resnet5-bn", "digits", eval_mode=True),
    "ulr:rnn (sequential digits)": _registry_case("rnn", "sequential-digits"),
    "ulr:gru (sequential digits)": _registry_case("gru", "sequential-digits"),
    "ulr:lstm (sequential digits)": _registry_case("lstm", "sequential-digits"),
    "ulr:lstm fused (sequential digits)": _registry_case("lstm", "sequential-digits",
                                                         impl="fused"),
    "ulr:transformer (sequential digits)": _registry_case("transformer", "sequential-digits"),
}
MODELS: dict[str, Callable[[int], zoo.Case]] = {**{f"zoo:{k}": v for k, v in zoo.ZOO.items()},
                                                **REGISTRY}
DIGITS = "ulr:mlp (digits)"
SMOKE = ["zoo:mlp", "zoo:bilinear", "zoo:gru-h_n", DIGITS]


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads, CPU"


def measure(name: str, config: str, copies: int, seed: int,
            sigma: float | None = None) -> dict[str, Any]:
    """One estimate of model ``name`` with configuration ``config`` at ``copies`` copies
    (``sigma``: a Gaussian of that scale instead of the configuration's noise)."""
    case = MODELS[name](seed)
    started = time.perf_counter()
    kwargs = CONFIGS[config]()
    if sigma is not None:
        kwargs["noise"] = ulr.Gaussian(sigma)
    try:
        m = zoo.cosines(case, copies, seed=seed, **kwargs)
    except Exception as err:  # a library gap: recorded, the run goes on
        return {"error": f"{type(err).__name__}: {err}",
                "seconds": round(time.perf_counter() - started, 3)}
    seconds = time.perf_counter() - started
    cos = list(m.cosine.values())
    ratio = list(m.norm_ratio.values())
    worst = min(m.cosine, key=m.cosine.get) if cos else None
    return {
        "cosine_min": round(min(cos), 4) if cos else None,
        "cosine_mean": round(sum(cos) / len(cos), 4) if cos else None,
        "worst_parameter": worst,
        "norm_ratio_mean": round(sum(ratio) / len(ratio), 4) if ratio else None,
        "norm_ratio_range": [round(min(ratio), 4), round(max(ratio), 4)] if ratio else None,
        "missing": m.missing,
        "forward_rows_per_example": m.forward_rows // len(case.targets),
        "cosine": {k: round(v, 4) for k, v in m.cosine.items()},
        "layer_cosine": {k: round(v, 4) for k, v in m.layer_cosine.items()},
        "norm_ratio": {k: round(v, 4) for k, v in m.norm_ratio.items()},
        "seconds": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--copies", type=int, default=4096, help="K for every model")
    p.add_argument("--digits-copies", type=int, default=256,
                   help="K of the extra digits-MLP row (its first-layer floor)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="models whose name contains one of these strings")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma", type=float, default=None,
                   help="Gaussian noise of this scale in every configuration instead of the "
                        "default 0.1 (results go to defaults-cpu-sigma<S>.*)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--smoke", action="store_true", help="K = 16, four models")
    args = p.parse_args(argv)
    if args.smoke:
        args.copies = args.digits_copies = 16
    torch.set_num_threads(args.threads)
    names = list(MODELS)
    if args.only:
        names = [n for n in names if any(s in n for s in args.only)]
    elif args.smoke:
        names = SMOKE
    if not names:
        raise SystemExit(f"--only matches no model; the models are {list(MODELS)}")
    # (model, K, which floor the row checks)
    jobs = [(n, args.copies, "every parameter") for n in names]
    if DIGITS in names:
        if args.digits_copies == args.copies:
            jobs = [j for j in jobs if j[0] != DIGITS]
        jobs.append((DIGITS, args.digits_copies, "first layer"))
    rows, started = [], time.time()
    for name, copies, floor in jobs:
        row: dict[str, Any] = {"model": name, "copies": copies, "floor": floor}
        for config in args.configs:
            row[config] = measure(name, config, copies, args.seed, args.sigma)
        rows.append(row)
        print(_line(row, args.configs), flush=True)
    write(rows, args, time.time() - started)
    return rows


def _line(row: dict[str, Any], configs: list[str]) -> str:
    parts = [f"{row['model']:38s} K={row['copies']:5d}"]
    for c in configs:
        r = row[c]
        parts.append(f"{c}: ERROR {r['error'][:80]}" if "error" in r else
                     f"{c}: min {r['cosine_min']:.3f} mean {r['cosine_mean']:.3f} "
                     f"ratio {r['norm_ratio_mean']:.2f} ({r['seconds']:.2f}s)")
    return " | ".join(parts)


def _cell(r: dict[str, Any], what: str) -> str:
    if "error" in r:
        return "error" if what != "cos" else f"error: {r['error'].split(':')[0]}"
    if what == "cos":
        return f"{r['cosine_min']:.3f} / {r['cosine_mean']:.3f}"
    return f"{r['norm_ratio_mean']:.2f}"


def write(rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if Path(sys.argv[0]).name == "defaults.py" else []
    if "--out" in argv:  # where the files go does not change them
        i = argv.index("--out")
        argv = argv[:i] + argv[i + 2:]
    meta = {"machine": _machine(), "torch": torch.__version__, "ulr": ulr.__version__,
            "threads": args.threads, "seed": args.seed, "copies": args.copies,
            "digits_copies": args.digits_copies, "seconds": round(seconds, 1),
            "new": "LikelihoodRatio(model, num_copies=K)  [the defaults: iid, "
                   "leave_one_out(), layerwise(), Gaussian(0.1)]",
            "old": "LikelihoodRatio(model, num_copies=K, sampler=iid(), baseline=none(), "
                   "plan=all_sites(), noise=Gaussian(0.1))",
            "sigma": args.sigma,
            "command": " ".join(["python benchmarks/defaults.py", *argv]).strip()}
    stem = "defaults-smoke" if args.smoke else "defaults-cpu"
    if args.sigma is not None:
        stem += f"-sigma{args.sigma:g}"
        meta["new"] = meta["new"].replace("Gaussian(0.1)", f"Gaussian({args.sigma:g})")
        meta["old"] = meta["old"].replace("Gaussian(0.1)", f"Gaussian({args.sigma:g})")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    configs = [c for c in ("new", "old") if c in args.configs]
    head = ["model", "K"]
    for c in configs:
        head += [f"{c}: cosine min / mean", f"{c}: norm ratio", f"{c}: rows/example"]
    head += ["worst parameter (new)", f"min >= {FLOOR}"]
    lines = [
        "# The estimator's defaults: direction of one estimate", "",
        f"One estimate per row, compared per parameter with autograd's gradient of the mean loss "
        f"(cosine min / mean over parameters; norm ratio ||estimate|| / ||autograd||, mean over "
        f"parameters). **new**: `{meta['new']}`; **old**: `{meta['old']}`. Rows/example: "
        f"forward rows per example, all passes (layer-wise runs one pass per site, so it uses "
        f"more rows at the same K). Models: `tests/zoo.py` (batch 16) and `ulr.models.build` on "
        f"the first 32 training examples of the embedded digits. Floors (issue 13): cosine >= "
        f"{FLOOR} for every parameter at K = 4096; digits MLP first layer >= {DIGITS_FLOOR} at "
        f"K = 256. An error is a library gap (the message is in the JSON). LR estimates the "
        f"gradient of the σ-smoothed loss: a low cosine with a norm ratio well below 1 points at "
        f"that smoothing bias (σ large for the model), one with a ratio above 1 at variance "
        f"(too few copies).", "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; seed {args.seed}; "
        f"{meta['seconds']} s. Reproduce: `{meta['command']}`.", "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---:"] + ["---:"] * (3 * len(configs)) + ["---", "---"]) + "|",
    ]
    for row in rows:
        cells = [row["model"], str(row["copies"])]
        for c in configs:
            r = row[c]
            rows_ex = "" if "error" in r else str(r["forward_rows_per_example"])
            cells += [_cell(r, "cos"), _cell(r, "ratio"), rows_ex]
        new = row.get("new", {})
        if "new" not in row or "error" in new:
            verdict, worst = ("—" if "new" not in row else "gap"), ""
        elif row["floor"] == "first layer":
            first = new["layer_cosine"]["hidden.0"]
            verdict = (f"first layer {first:.3f} "
                       f"{'>=' if first >= DIGITS_FLOOR else '<'} {DIGITS_FLOOR}")
            worst = new["worst_parameter"]
        else:
            verdict = "yes" if new["cosine_min"] >= FLOOR and not new["missing"] else "**no**"
            worst = new["worst_parameter"]
        cells += [f"`{worst}`" if worst else "", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    errors = {row["model"]: row["new"]["error"] for row in rows if "error" in row.get("new", {})}
    if errors:
        lines += ["", "Library gaps (new defaults):", ""]
        lines += [f"- {m}: `{e}`" for m, e in errors.items()]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
