"""Cost of a population evaluation: µs of CPU time per forward row of ``ulr.peers``' ES, one
forward per member (the hook path, ES before its population was vectorised) against one
vectorised forward (the default), and EvoTorch's PGPE and SNES distributions with their batched
population (when evotorch is installed), side by side in one process.

Each estimator takes training steps (``loss_and_grads`` + Adam) on minibatches of 32; the time
is the process CPU time of one torch thread, the median over interleaved rounds (every method
once per round, so load on a shared machine hits all of them alike). A step spends population
× 32 forward rows. The two ES paths must write the same gradient: checked bit for bit.

    python benchmarks/es_cost.py            # writes docs/results/es-cost.{json,md}
    python benchmarks/es_cost.py --smoke    # seconds, nothing written
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ulr import data
from ulr.evaluate.bench import BATCH, ce, initial_model
from ulr.evaluate.bench.evotorch_peers import EvoTorchSearch, missing
from ulr.peers import EvolutionStrategies

ROOT = Path(__file__).resolve().parents[1]
SIGMA = 0.02


def builders(population: int) -> dict:
    out = {
        "ES, one forward per member": lambda m, g: EvolutionStrategies(
            m, sigma=SIGMA, population=population, members_per_forward=1, generator=g),
        "ES, vectorised": lambda m, g: EvolutionStrategies(
            m, sigma=SIGMA, population=population, members_per_forward=population, generator=g),
    }
    if missing() is None:
        out["EvoTorch PGPE"] = lambda m, g: EvoTorchSearch(m, "pgpe", sigma=SIGMA,
                                                           popsize=population, generator=g)
        out["EvoTorch SNES"] = lambda m, g: EvoTorchSearch(m, "snes", sigma=SIGMA,
                                                           popsize=population, generator=g)
    return out


def same_estimate(model_name: str, ds, population: int) -> bool:
    """Both ES paths from the same generator write the same gradient, bit for bit."""
    x, y = ds.train[0][:BATCH], ds.train[1][:BATCH]
    got = []
    for per in (1, population):
        model = initial_model(model_name, ds, 0)
        est = EvolutionStrategies(model, sigma=SIGMA, population=population,
                                  members_per_forward=per,
                                  generator=torch.Generator().manual_seed(1))
        est.loss_and_grads(ce, x, y)
        got.append([p.grad for p in model.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*got, strict=True))


def measure(model_name: str, ds, population: int, steps: int, rounds: int) -> list[dict]:
    x, y = ds.train
    runs = {}
    for label, build in builders(population).items():
        model = initial_model(model_name, ds, 0)
        est = build(model, torch.Generator().manual_seed(0))
        runs[label] = (model, est, torch.optim.Adam(model.parameters(), lr=1e-3), [])
    for r in range(rounds + 1):  # round 0 warms up
        for label, (model, est, opt, times) in runs.items():
            start = time.process_time()
            for s in range(steps):
                i = (s * BATCH) % (len(x) - BATCH)
                opt.zero_grad(set_to_none=True)
                est.loss_and_grads(ce, x[i:i + BATCH], y[i:i + BATCH])
                opt.step()
            if r:
                times.append((time.process_time() - start) / steps)
    out = []
    for label, (model, est, _, times) in runs.items():
        step = statistics.median(times)
        out.append({"model": model_name, "method": label, "population": population,
                    "params": sum(p.numel() for p in model.parameters()),
                    "rows_per_step": est.last_forward_rows, "ms_per_step": 1e3 * step,
                    "us_per_row": 1e6 * step / est.last_forward_rows,
                    "fallback": getattr(est, "vectorize_error", None)})
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# ES cost: µs per forward row, one forward per member against a vectorised population",
        "",
        f"`python benchmarks/es_cost.py` on {m['cpu_count']} cores ({m['platform']}, torch "
        f"{m['torch']}, one torch thread, load average at start {m['load']}). A training step "
        f"(`loss_and_grads` + Adam) on minibatches of {BATCH} (digits: 8x8 images; Fashion-MNIST: "
        f"28x28), population "
        f"{result['population']} (antithetic pairs), σ = {SIGMA}; process CPU time, median of "
        f"{result['rounds']} interleaved rounds of {result['steps']} steps. "
        f"{result['evotorch']} ES's default: vectorised for a model without convolutions, "
        f"one forward per member for one with them (the faster of the two at 28x28).",
        "",
        "| data | model | method | params | rows / step | ms / step | µs / forward row |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['data']} | {r['model']} | {r['method']} | {r['params']:,} | "
                     f"{r['rows_per_step']} | "
                     f"{r['ms_per_step']:.2f} | {r['us_per_row']:.2f} |")
    lines += ["", "Same gradient from both ES paths (bit for bit): " + ", ".join(
        f"{k}: {'yes' if v else 'NO'}" for k, v in result["same_estimate"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, print and (without ``--smoke``) write the results; returns the rows, each with
    ``same_estimate`` (both ES paths wrote the same gradient on its model)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a few steps, nothing written")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps, rounds, population = (2, 1, 8) if args.smoke else (20, 5, 32)
    rows, same = [], {}
    for data_name in ("digits", "fashion-mnist"):
        try:
            ds = data.load(data_name, seed=0)
        except (FileNotFoundError, RuntimeError) as e:  # Fashion-MNIST is a Debian package
            print(f"{data_name}: not measured ({e})")
            continue
        for model_name in ("mlp", "lenet5"):
            key = f"{model_name} on {data_name}"
            same[key] = same_estimate(model_name, ds, population)
            rows += [{**r, "data": data_name, "same_estimate": same[key]}
                     for r in measure(model_name, ds, population, steps, rounds)]
    import os

    result = {"population": population, "steps": steps, "rounds": rounds, "rows": rows,
              "same_estimate": same,
              "evotorch": ("EvoTorch " + __import__("evotorch").__version__ + "." if missing()
                           is None else f"EvoTorch not measured: {missing()}."),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version(),
                          "load": [round(v, 2) for v in os.getloadavg()]}}
    text = markdown(result)
    print(text)
    if not args.smoke:
        out = Path(args.out)
        (out / "es-cost.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "es-cost.md").write_text(text)
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["same_estimate"] for r in main()) else 1)
