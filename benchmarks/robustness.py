"""Robustness study: are ULR-trained nets more robust than backprop-trained ones?

For each suite (architecture × dataset) and seed, four runs of `ulr.train.fit` (the code behind
`ulr train`), all from the same initial weights and data order:

* ``ulr``: the likelihood-ratio estimator;
* ``bp``: backprop with the same budget (steps, batch, optimizer);
* ``bp-noise``: backprop through the same training noise at the same sites (separates the
  effect of the noise from that of the estimator);
* ``bp-matched``: backprop stopped early, at the step count (from a grid) whose validation
  accuracy is closest to the ULR run's: the comparison at matched clean accuracy.

Every model is then evaluated by `ulr.evaluate.robust.evaluate` (the code behind
`ulr robust`): FGSM and PGD (L∞ and L2) at several budgets, and the four corruptions at
severities 1-5. Writes
docs/results/robustness.{json,md} and docs/results/robustness-<suite>.png.

    python benchmarks/robustness.py                   # every suite, 3 seeds (CPU: ~1 h)
    python benchmarks/robustness.py --suite digits-mlp --seeds 0
    python benchmarks/robustness.py --from-json docs/results/robustness.json   # redo the report
    python benchmarks/robustness.py --from-json a/robustness.json b/robustness.json  # merge
    python benchmarks/robustness.py --smoke
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ulr.evaluate import robust
from ulr.train import RunConfig, environment, fit
from ulr.train.config_file import to_command

# Each suite: run options shared by every method, the ULR-only options (bp-noise takes the same
# noise: sigma and sites), and the evaluation: test examples (None = the whole split).
SUITES = {
    "digits-mlp": dict(data="digits", model="mlp", common=dict(epochs=30, batch_size=32),
                       ulr={}, limit=None),
    "digits-lenet5": dict(data="digits", model="lenet5", common=dict(epochs=30, batch_size=32),
                          ulr=dict(sigma=0.05), limit=None),
    # The same MLP with 5x the training noise: does a stronger noise make ULR (or bp-noise)
    # more robust?
    "digits-mlp-sigma0.5": dict(data="digits", model="mlp",
                                common=dict(epochs=30, batch_size=32), ulr=dict(sigma=0.5),
                                limit=None),
    "fashion-mlp": dict(data="fashion-mnist", model="mlp",
                        common=dict(epochs=2, max_steps=1500, batch_size=64),
                        ulr=dict(sampler="iid"), limit=1000),
    "fashion-lenet5": dict(data="fashion-mnist", model="lenet5",
                           common=dict(epochs=1, max_steps=400, batch_size=32),
                           ulr=dict(sigma=0.05, num_copies=16, sampler="iid"), limit=1000),
    # the same, trained 5x longer
    "fashion-lenet5-2000": dict(data="fashion-mnist", model="lenet5",
                                common=dict(epochs=2, max_steps=2000, batch_size=32),
                                ulr=dict(sigma=0.05, num_copies=16, sampler="iid"),
                                limit=1000),
}
NOISE_KEYS = ("sigma", "noise", "sites", "recommended")
#: Shares of the full budget tried for bp-matched.
MATCH_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.65, 1.0)
METHODS = ("ulr", "bp", "bp-noise", "bp-matched")
EVAL = dict(attacks=robust.ATTACKS, eps=(0.02, 0.05, 0.1, 0.2), steps=10,
            corruptions=robust.CORRUPTIONS, severities=(1, 2, 3, 4, 5))
#: Headline conditions of the summary table.
HEADLINE = ("clean", "fgsm-linf eps=0.1", "pgd-linf eps=0.05", "pgd-linf eps=0.1",
            "pgd-l2 eps=0.1", "gaussian-noise s=5", "impulse-noise s=5", "blur s=3",
            "contrast s=4")


def config(suite: dict, method: str, seed: int, threads: int, **over) -> RunConfig:
    values = dict(data=suite["data"], model=suite["model"], seed=seed, threads=threads,
                  device="cpu", **suite["common"])
    if method == "ulr":
        values.update(suite["ulr"])
    elif method == "bp-noise":
        values.update({k: v for k, v in suite["ulr"].items() if k in NOISE_KEYS})
    values.update(over)
    return RunConfig(method="bp" if method == "bp-matched" else method, **values)


def command(cfg: RunConfig, out: str) -> str:
    return f"{to_command(cfg)} --out {shlex.quote(out)}"


def train(cfg: RunConfig, runs: Path, rel: str, shown: str, log: list) -> dict:
    t0 = time.perf_counter()
    summary = fit(cfg, runs / rel)
    log.append({"run": rel, "command": command(cfg, f"{shown}/{rel}"),
                "wall_s": time.perf_counter() - t0})
    return summary


def study(suites: list[str], seeds: list[int], runs: Path, threads: int, smoke: bool,
          verbose: bool, shown: str = "runs/robustness", progress=None) -> dict:
    """Train and evaluate; ``progress(result)`` is called after every (suite, seed)."""
    rows, commands = [], []
    for name in suites:
        suite = SUITES[name]
        ev = dict(EVAL)
        limit = suite["limit"]
        if smoke:
            suite = {**suite, "common": dict(epochs=1, max_steps=6, batch_size=64)}
            ev.update(eps=(0.1,), steps=2, severities=(1,), corruptions=("blur",),
                      attacks=("fgsm-linf", "pgd-linf"))
            limit = 60
        for seed in seeds:
            rel = f"{name}/seed{seed}"
            base = runs / rel
            done = {}
            for method in ("ulr", "bp", "bp-noise"):
                cfg = config(suite, method, seed, threads)
                done[method] = (train(cfg, runs, f"{rel}/{method}", shown, commands), cfg)
                if verbose:
                    s = done[method][0]
                    print(f"[{name} seed {seed}] {method}: val {s['final']['val_acc']:.4f} "
                          f"test {s['final']['test_acc']:.4f} ({s['wall_time_s']:.0f} s)",
                          flush=True)
            # bp-matched: the BP run (same seed, so the same trajectory) stopped at the step
            # count whose validation accuracy is closest to ULR's.
            target = done["ulr"][0]["final"]["val_acc"]
            full = done["bp"][0]["steps"]
            grid = sorted({max(1, round(f * full)) for f in MATCH_GRID}) if not smoke else [2]
            best = None
            for steps in grid:
                cfg = config(suite, "bp-matched", seed, threads,
                             epochs=max(suite["common"]["epochs"], 1), max_steps=steps)
                summary = fit(cfg)
                gap = abs(summary["final"]["val_acc"] - target)
                if best is None or gap < best[0]:
                    best = (gap, steps)
            cfg = config(suite, "bp-matched", seed, threads,
                         epochs=suite["common"]["epochs"], max_steps=best[1])
            done["bp-matched"] = (train(cfg, runs, f"{rel}/bp-matched", shown, commands), cfg)
            for method in METHODS:
                summary, cfg = done[method]
                loaded = robust.load(base / method, limit=limit)
                t0 = time.perf_counter()
                result = robust.evaluate(loaded.model, loaded.x, loaded.y,
                                         value_range=loaded.value_range, seed=seed, **ev)
                rows.append({"suite": name, "method": method, "seed": seed,
                             "steps": summary["steps"], "val_acc": summary["final"]["val_acc"],
                             "test_acc_full": summary["final"]["test_acc"],
                             "train_wall_s": summary["wall_time_s"],
                             "eval_s": time.perf_counter() - t0, "n": len(loaded.x),
                             "config": cfg.to_dict(), "rows": result})
                if verbose:
                    by = {r["condition"]: r["accuracy"] for r in result}
                    print(f"[{name} seed {seed}] {method} ({summary['steps']} steps): clean "
                          f"{by['clean']:.3f}, " + ", ".join(
                              f"{c} {by[c]:.3f}" for c in HEADLINE[1:4] if c in by), flush=True)
            commands.append({"run": rel, "command": (
                f"ulr robust {shown}/{rel} --seed {seed}"
                + (f" --limit {limit}" if limit else "")
                + (" --eps " + " ".join(map(str, ev["eps"])) if smoke else ""))})
            if progress is not None:
                progress({"rows": rows, "commands": commands})
    return {"rows": rows, "commands": commands}


# ---------------------------------------------------------------------------------------------
# Report


def _acc(row: dict, condition: str) -> float | None:
    return next((r["accuracy"] for r in row["rows"] if r["condition"] == condition), None)


def _ms(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def results_of(rows: list[dict], suite: str) -> list[dict]:
    out = []
    for method in METHODS:
        mine = [r for r in rows if r["suite"] == suite and r["method"] == method]
        if mine:
            out.append({"label": method, "rows": [x for r in mine for x in r["rows"]]})
    return out


PAIRS = (("ulr", "bp-matched"), ("ulr", "bp"), ("ulr", "bp-noise"), ("bp-noise", "bp"))


def _compare(diffs_by: dict[str, list[float]]) -> str:
    wins = losses = ties = 0
    for d in diffs_by.values():
        mean = statistics.fmean(d)
        se = (statistics.stdev(d) / len(d) ** 0.5) if len(d) > 1 else math.inf
        if mean > 2 * se and mean > 0.005:
            wins += 1
        elif -mean > 2 * se and -mean > 0.005:
            losses += 1
        else:
            ties += 1
    hi = max(diffs_by, key=lambda c: statistics.fmean(diffs_by[c]))
    lo = min(diffs_by, key=lambda c: statistics.fmean(diffs_by[c]))
    return (f"higher in {wins}, lower in {losses}, within noise in {ties} of "
            f"{len(diffs_by)} (from {_ms(diffs_by[lo])} at {lo} to {_ms(diffs_by[hi])} at "
            f"{hi})")


def verdict(rows: list[dict], suite: str) -> list[str]:
    """Paired (same seed) accuracy differences between methods, attacks and corruptions apart.

    A difference counts as higher/lower when its mean over seeds is beyond 2 standard errors
    and 0.5 points.
    """
    lines = []
    seeds = sorted({r["seed"] for r in rows if r["suite"] == suite})

    def get(method: str, seed: int) -> dict | None:
        return next((r for r in rows if r["suite"] == suite and r["method"] == method
                     and r["seed"] == seed), None)

    conditions = robust.condition_names(results_of(rows, suite))
    groups = {"attack": [c for c in conditions if c.split()[0] in robust.ATTACKS],
              "corruption": [c for c in conditions if c.split()[0] in robust.CORRUPTIONS]}
    for a, b in PAIRS:
        pairs = [(get(a, s), get(b, s)) for s in seeds]
        pairs = [(u, o) for u, o in pairs if u is not None and o is not None]
        if not pairs:
            continue
        clean = [_acc(u, "clean") - _acc(o, "clean") for u, o in pairs]
        parts = [f"{a} − {b}: clean {_ms(clean)} points"]
        for group, conds in groups.items():
            if conds:
                diffs = {c: [_acc(u, c) - _acc(o, c) for u, o in pairs] for c in conds}
                parts.append(f"{group} conditions: {_compare(diffs)}")
        lines.append("; ".join(parts) + ".")
    return lines


def write_report(result: dict, out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    files = [out / "robustness.json"]
    files[0].write_text(json.dumps(result, indent=2))
    env = result["environment"]
    md = ["# Robustness study: ULR vs backprop under attacks and corruptions", "",
          f"Generated by `{result['command']}` on {result['date']} in "
          f"{result['wall_min']:.1f} min (wall). Machine: {env['platform']}, {env['cpu_count']}"
          f" logical cores (shared with other jobs), torch {env['torch']}, ulr {env['ulr']}, "
          f"{result['threads']} torch thread(s); load average at start {result['load_start']}, "
          f"at end {result['load_end']}.", "",
          f"Seeds {result['seeds']}; cells are test accuracy (%) as mean ± sample standard "
          "deviation over seeds. Budgets `eps` are fractions of the input range [0, 1]: L∞ "
          "moves each pixel by at most eps, L2 allows a perturbation of length eps·sqrt(d) "
          "(an RMS of eps per pixel). PGD: 10 steps of 0.25·eps, random start, 1 restart. "
          "Corruption severities as in docs/robustness.md. Methods: `ulr` (likelihood ratio), "
          "`bp` (backprop, same budget), `bp-noise` (backprop through the same training noise "
          "at the same sites), `bp-matched` (backprop stopped at the step count whose "
          "validation accuracy is closest to ULR's).", ""]
    md += ["## Summary", ""]
    head = ["suite", "method", "steps", *HEADLINE]
    md += ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(HEADLINE)]
    for suite in suites:
        for method in METHODS:
            mine = [r for r in rows if r["suite"] == suite and r["method"] == method]
            if not mine:
                continue
            steps = sorted({r["steps"] for r in mine})
            cells = [_ms([a for r in mine if (a := _acc(r, c)) is not None]) for c in HEADLINE]
            md.append(f"| {suite} | {method} | {'/'.join(map(str, steps))} | "
                      + " | ".join(cells) + " |")
    md += ["", "## Does the paper's claim hold here?", ""]
    for suite in suites:
        md.append(f"**{suite}**")
        md.append("")
        md += [f"- {line}" for line in verdict(rows, suite)]
        md.append("")
        md.append("(Paired over seeds, in points of accuracy; higher/lower: the mean difference "
                  "is beyond 2 standard errors and 0.5 points.)")
        md.append("")
    for suite in suites:
        spec = SUITES.get(suite, {})
        n = next(r["n"] for r in rows if r["suite"] == suite)
        md += [f"## {suite}", "",
               f"{spec.get('model', '?')} on {spec.get('data', '?')}; evaluated on the first "
               f"{n} test examples. Plot: `robustness-{suite}.png`.", "",
               robust.format_markdown(results_of(rows, suite)), ""]
        if plots:
            files.append(robust.plot(results_of(rows, suite), out / f"robustness-{suite}.png",
                                     title=f"{suite}: mean ± std over seeds {result['seeds']}"))
    md += ["## Commands", "",
           "Every trained model, as a `ulr train` command (the benchmark calls the same "
           "`ulr.train.fit`); `ulr robust RUN --limit N` evaluates one the same way "
           "(`--seed` = the run's seed).", ""]
    md += [f"- `{c['command']}`" for c in result["commands"]]
    (out / "robustness.md").write_text("\n".join(md) + "\n")
    files.insert(1, out / "robustness.md")
    return files


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", nargs="*", choices=list(SUITES), default=list(SUITES))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--runs", default=None,
                   help="keep the run directories here (default: a temporary directory)")
    p.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="rewrite the report from JSON results (several are merged)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.from_json:
        # Several files (e.g. suites run in separate processes) are merged into one report.
        parts = [json.loads(Path(f).read_text()) for f in args.from_json]
        result = {**parts[0], "rows": [r for p in parts for r in p["rows"]],
                  "commands": [c for p in parts for c in p["commands"]]}
        if len(parts) > 1:
            result["command"] = " + ".join(p["command"] for p in parts)
            result["wall_min"] = sum(p["wall_min"] for p in parts)
            result["load_end"] = parts[-1]["load_end"]
        write_report(result, Path(args.out), plots=not args.no_plots)
        return result["rows"]
    torch.set_num_threads(args.threads)
    suites = ["digits-mlp"] if args.smoke else args.suite
    seeds = [0] if args.smoke else args.seeds
    started, load_start = time.time(), [round(v, 2) for v in os.getloadavg()]
    argv_text = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])

    def finish(result: dict) -> dict:
        return {**result,
                "command": f"python benchmarks/robustness.py {argv_text}".strip(),
                "date": _dt.datetime.now().isoformat(timespec="seconds"),
                "wall_min": (time.time() - started) / 60, "seeds": seeds,
                "threads": args.threads, "load_start": load_start,
                "load_end": [round(v, 2) for v in os.getloadavg()],
                "environment": {**environment("cpu"), "processor": platform.processor()}}

    def progress(partial: dict) -> None:  # a partial report after every suite and seed
        write_report(finish(partial), Path(args.out), plots=False)

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs) if args.runs else Path(tmp)
        result = finish(study(suites, seeds, runs, args.threads, args.smoke, not args.quiet,
                              progress=None if args.smoke else progress))
    files = write_report(result, Path(args.out), plots=not args.no_plots)
    if not args.quiet:
        print("wrote " + ", ".join(str(f) for f in files))
    return result["rows"]


if __name__ == "__main__":
    main()
