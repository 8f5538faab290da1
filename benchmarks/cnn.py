"""Which levers make ULR's convolutional gradients good: LeNet-5 at equal forward rows (issue 14).

The `ulr bench` gradient-quality protocol (`ulr.evaluate.bench.quality`: LeNet-5, the same
initial weights, minibatches of 32 and seeds; states `init` and `trained` = after 150 backprop
Adam steps), on the MNIST subset and on Fashion-MNIST, with one ULR configuration per row, each
spending at most 321 forward rows per example (1 clean row + 320 perturbed copies split over the
layer-wise plan's 5 passes). Per layer: the cosine of the estimate with the exact minibatch
gradient (backprop), mean over minibatches per seed, then mean ± std over seeds.

The levers, each alone against the reference (the bench's "ulr" row: output noise σ = 0.05, the
model's recommended value; antithetic pairs; leave-one-out; 64 copies per pass), then combined:

* scale: σ ∈ {0.1, 0.03, 0.01, 0.003}, or σ_s = c · std of the clean output of site s;
* weight noise (`ulr.weight_noise`) on conv1 and conv2: σ = 1e-3, or c · std of the weights;
* copy allocation over the 5 passes at the same 320 copies: proportional to the site's noise
  dimension, to its square root, or to its measured relative variance (a backprop-free pilot:
  two independent estimates on another minibatch; the pilot's rows are not counted, a training
  run would measure it once and keep it);
* sampling and baseline: i.i.d., Sobol (clean baseline: leave-one-out needs independent
  copies), antithetic Sobol, antithetic with the clean baseline.

"combined" takes each family's best option (if it beats the reference) together, and drops
each one in turn. The winner is the row with the highest *worst conv cell*: the smallest
seed-mean cosine of conv1 or conv2 over the (dataset, state) cells, the issue's floor being
>= 0.5. Forward gradient, SPSA and ES at the same rows (`ulr.evaluate.bench.methods`) run on the
same minibatches. `cpu ×` is an estimate's CPU time over the reference's (one thread).

    python benchmarks/cnn.py                 # docs/results/cnn.{json,md} (~10 min, 1 thread)
    python benchmarks/cnn.py --smoke         # seconds: digits, one seed, a few rows
    python benchmarks/cnn.py --train-check   # + the 1-epoch Fashion-MNIST `ulr train` runs
"""

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

import ulr
from ulr.evaluate.bench import build_estimator, machine
from ulr.evaluate.bench.harness import (
    BATCH,
    accuracy,
    ce,
    cosine,
    generator_for,
    initial_model,
    layer_grads,
    load_dataset,
    mean_std,
)
from ulr.evaluate.bench.quality import bp_warmup
from ulr.peers import Backprop

ROOT = Path(__file__).resolve().parents[1]
SITES = ("conv1", "conv2", "fc1", "fc2", "fc3")
CONVS = ("conv1", "conv2")
POOLED = {"conv1": "pool1", "conv2": "pool2"}  # each conv block's output
FLOOR = 0.5
PEERS = ("fg", "spsa", "es")


@dataclass(frozen=True)
class Lever:
    """One ULR configuration of LeNet-5's 5 sites.

    Attributes:
        name: the row's name.
        family: which lever it varies (``ref``, ``scale``, ``weight``, ``alloc``, ``sampling``,
            ``combined``).
        sigma: output-noise σ of every site, unless ``match`` is set.
        match: σ_s = match · std of the clean output of site s (on the minibatch).
        weight_sigma: weight noise of this σ on conv1 and conv2 (instead of output noise).
        weight_match: weight noise on conv1 and conv2 of σ = weight_match · std(W).
        weight_on: the convs that get weight noise (default both).
        pooled: noise at ``pool1``/``pool2`` instead of the conv outputs (hybrid blocks).
        through_fc1: conv2 has no site of its own: it learns from fc1's noise, back-propagated
            through fc1's linear map, the max-pool and the ReLU (a hybrid block conv2 -> fc1;
            fc1 is linear in pool2's output, so this is pool2's noise restricted to the 120
            directions fc1 can see).
        alloc: ``uniform``, ``dim`` (∝ noise dimension), ``sqrt-dim``, ``variance``.
        sampler: ``iid``, ``antithetic``, ``sobol``, ``antithetic-sobol``.
        baseline: ``leave-one-out`` or ``clean``.
    """

    name: str
    family: str
    sigma: float = 0.05
    match: float | None = None
    weight_sigma: float | None = None
    weight_match: float | None = None
    weight_on: tuple[str, ...] = CONVS
    pooled: bool = False
    through_fc1: bool = False
    alloc: str = "uniform"
    sampler: str = "antithetic"
    baseline: str = "leave-one-out"

    def weight_noised(self, layer: str) -> bool:
        return layer in self.weight_on and (self.weight_sigma is not None
                                            or self.weight_match is not None)

    def sites(self) -> dict[str, str]:
        """Layer -> its noise site: the layer's own output (or weights), or (``pooled``, for a
        conv without weight noise) its block's output after ReLU and max-pooling
        (``ulr.hybrid``: the LR signal is back-propagated inside the block); conv2 (without
        weight noise) at ``fc1`` with ``through_fc1``."""
        def site(s: str) -> str:
            if self.weight_noised(s):
                return s
            if s == "conv2" and self.through_fc1:
                return "fc1"
            return POOLED[s] if self.pooled and s in POOLED else s

        return {s: site(s) for s in SITES}


REF = Lever("reference (bench ulr: σ 0.05, antithetic, LOO, 64/pass)", "ref")
ALONE = [
    REF,
    replace(REF, name="ulr train default (σ 0.1, iid, LOO)", sigma=0.1, sampler="iid"),
    *[replace(REF, name=f"σ {s:g}", family="scale", sigma=s) for s in (0.1, 0.03, 0.01, 0.003)],
    *[replace(REF, name=f"σ_s = {c:g}·std(out_s)", family="scale", match=c)
      for c in (0.3, 0.1, 0.03)],
    replace(REF, name="weight noise 1e-3 on conv1/2", family="weight", weight_sigma=1e-3),
    *[replace(REF, name=f"weight noise {c:g}·std(W) on conv1/2", family="weight", weight_match=c)
      for c in (0.01, 0.1)],
    replace(REF, name="weight noise 1e-3 on conv1", family="weight", weight_sigma=1e-3,
            weight_on=("conv1",)),
    replace(REF, name="weight noise 0.01·std(W) on conv1", family="weight", weight_match=0.01,
            weight_on=("conv1",)),
    replace(REF, name="conv noise after ReLU+pool (hybrid blocks)", family="site", pooled=True),
    replace(REF, name="conv2 through fc1's noise (hybrid block conv2→fc1)", family="site",
            through_fc1=True),
    replace(REF, name="conv1 after ReLU+pool, conv2 through fc1's noise", family="site",
            pooled=True, through_fc1=True),
    *[replace(REF, name=f"copies ∝ {a}", family="alloc", alloc=a)
      for a in ("dim", "sqrt-dim", "variance")],
    replace(REF, name="iid + LOO", family="sampling", sampler="iid"),
    replace(REF, name="sobol + clean", family="sampling", sampler="sobol", baseline="clean"),
    replace(REF, name="antithetic-sobol + clean", family="sampling", sampler="antithetic-sobol",
            baseline="clean"),
    replace(REF, name="antithetic + clean", family="sampling", baseline="clean"),
]
# the fields each family sets (reverting them gives the reference's)
FAMILY_FIELDS = {"scale": ("sigma", "match"),
                 "weight": ("weight_sigma", "weight_match", "weight_on"),
                 "site": ("pooled", "through_fc1"), "alloc": ("alloc",),
                 "sampling": ("sampler", "baseline")}


# ------------------------------------------------------------------ building an estimator
def _site_stats(model: torch.nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per site: std and numel per example of its clean output, std and numel of its
    weights+bias (the noise dimensions of output and weight noise)."""
    stats: dict[str, dict[str, float]] = {}
    handles = []
    for name in (*SITES, *POOLED.values()):
        mod = model.get_submodule(name)

        def hook(m, args, out, name=name):
            stats[name] = {"out_std": float(out.detach().std()), "out_dim": out[0].numel()}
            if name in SITES:
                w = torch.cat([p.detach().flatten() for p in m.parameters(recurse=False)])
                stats[name].update(w_std=float(m.weight.detach().std()), w_dim=w.numel())
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return stats


def _noise(lever: Lever, stats: dict[str, dict[str, float]]) -> dict[str, Any]:
    noise: dict[str, Any] = {}
    for s, t in lever.sites().items():
        if lever.weight_noised(s) and lever.weight_sigma is not None:
            noise[t] = ulr.weight_noise(ulr.Gaussian(lever.weight_sigma))
        elif lever.weight_noised(s):
            noise[t] = ulr.weight_noise(ulr.Gaussian(lever.weight_match * stats[s]["w_std"]))
        else:
            sigma = lever.sigma if lever.match is None else lever.match * stats[t]["out_std"]
            noise[t] = ulr.Gaussian(sigma)
    return noise


def _sampler(name: str):
    return {"iid": ulr.iid, "antithetic": ulr.antithetic, "sobol": ulr.sobol,
            "antithetic-sobol": lambda: ulr.antithetic(ulr.sobol())}[name]()


def allocate(weights: dict[str, float], total: int, sampler: str) -> dict[str, int]:
    """Split ``total`` copies over the sites ∝ ``weights``: each count a multiple of 2
    (antithetic pairs; a power of two for Sobol), at least 4, the sum at most ``total``."""
    kmin = 4
    norm = sum(weights.values())
    raw = {s: total * w / norm for s, w in weights.items()}
    if "sobol" in sampler:
        return {s: max(kmin, 2 ** int(math.log2(max(r, 1)))) for s, r in raw.items()}
    k = {s: max(kmin, 2 * int(r // 2)) for s, r in raw.items()}
    while sum(k.values()) > total:  # the minimum pushed it over: take from the largest
        big = max(k, key=k.get)
        k[big] -= 2
    while sum(k.values()) + 2 <= total:  # hand the rest to the largest shortfall
        s = max(k, key=lambda s: raw[s] - k[s])
        k[s] += 2
    return k


def copies_for(lever: Lever, stats, total: int, variance: dict[str, float] | None = None):
    """Copies per pass (keyed by site) of ``lever`` at ``total`` perturbed copies per
    example; ``variance`` is keyed by layer."""
    sites = lever.sites()
    if lever.alloc == "uniform":
        return allocate(dict.fromkeys(sites.values(), 1.0), total, lever.sampler)
    if lever.alloc == "variance":
        return allocate({sites[s]: v for s, v in variance.items()}, total, lever.sampler)
    dim = {t: stats[s]["w_dim"] if lever.weight_noised(s) else stats[t]["out_dim"]
           for s, t in sites.items()}
    if lever.alloc == "sqrt-dim":
        dim = {s: math.sqrt(d) for s, d in dim.items()}
    return allocate(dim, total, lever.sampler)


def make_estimator(model, lever: Lever, stats, copies: dict[str, int], gen: torch.Generator):
    base = {"leave-one-out": ulr.baselines.leave_one_out, "clean": ulr.baselines.clean}
    named = list(dict.fromkeys(lever.sites().values()))
    sites = None if named == list(SITES) else ulr.sites.by_name(*named)
    return ulr.LikelihoodRatio(model, sites=sites, noise=_noise(lever, stats),
                               sampler=_sampler(lever.sampler),
                               baseline=base[lever.baseline](),
                               plan=ulr.plans.layerwise(num_copies=copies), generator=gen)


def pilot_variance(model, lever: Lever, stats, x, y, total: int, seed: int) -> dict[str, float]:
    """Each site's relative variance ``tr Σ / ||g||²`` (per copy, up to a common factor), from
    pairs of independent uniform-copy estimates ``a, b``: ``E||a−b||² = 2 tr Σ / K`` and
    ``E||a+b||² − E||a−b||² = 4 ||g||²`` (no backprop). A site whose signal the pilot cannot
    see is capped at 50x the noise."""
    uniform = replace(lever, alloc="uniform")
    copies = copies_for(uniform, stats, total)
    d = dict.fromkeys(SITES, 0.0)
    s = dict.fromkeys(SITES, 0.0)
    for rep in range(2):
        grads = []
        for half in range(2):
            est = make_estimator(model, uniform, stats, copies, generator_for(seed, rep, half, 31))
            model.zero_grad(set_to_none=True)
            est.loss_and_grads(ce, x, y)
            grads.append(layer_grads(model))
        for n in SITES:
            d[n] += float((grads[0][n] - grads[1][n]).pow(2).sum())
            s[n] += float((grads[0][n] + grads[1][n]).pow(2).sum())
    model.zero_grad(set_to_none=True)
    return {n: 2 * d[n] / max(s[n] - d[n], 0.04 * d[n]) for n in SITES}


# ------------------------------------------------------------------ the measurement
def measure(levers: list[Lever], datasets, seeds, batches: int, warmup: int, rows: int,
            peers: bool, verbose: bool) -> list[dict[str, Any]]:
    """One row per (lever or peer, dataset, seed, state, minibatch)."""
    total = rows - 1
    out: list[dict[str, Any]] = []
    for data in datasets:
        for seed in seeds:
            ds = load_dataset(data, seed)
            x_all, y_all = ds.train
            model = initial_model("lenet5", ds, seed)
            for state in ("init", "trained") if warmup else ("init",):
                if state == "trained":
                    bp_warmup(model, x_all, y_all, warmup, seed)
                acc = accuracy(model, *ds.test)
                pick = generator_for(seed, 77)  # the bench's minibatches
                idx = [torch.randperm(len(x_all), generator=pick)[:BATCH] for _ in range(batches)]
                pilot_idx = torch.randperm(len(x_all), generator=generator_for(seed, 78))[:BATCH]
                pilot_stats = _site_stats(model, x_all[pilot_idx])
                variances = {}
                for b, ib in enumerate(idx):
                    xb, yb = x_all[ib], y_all[ib]
                    model.zero_grad(set_to_none=True)
                    Backprop(model).loss_and_grads(ce, xb, yb)
                    true = layer_grads(model)
                    stats = _site_stats(model, xb)
                    for lever in levers:
                        key = zlib.crc32(lever.name.encode())
                        var = None
                        if lever.alloc == "variance":
                            if lever.name not in variances:
                                variances[lever.name] = pilot_variance(
                                    model, lever, pilot_stats, x_all[pilot_idx],
                                    y_all[pilot_idx], total, seed)
                            var = variances[lever.name]
                        copies = copies_for(lever, stats, total, var)
                        est = make_estimator(model, lever, stats, copies,
                                             generator_for(seed, b, key, 14))
                        out.append(_one(est, model, xb, yb, true, lever.name, lever.family,
                                        data, seed, state, b, acc, copies=copies))
                    if peers:
                        for p in PEERS:
                            est = build_estimator(p, model, generator_for(seed, b, PEERS.index(p),
                                                                          15), rows)
                            out.append(_one(est, model, xb, yb, true, p, "peer", data, seed,
                                            state, b, acc))
                if verbose:
                    print(f"cnn: {data} seed {seed} {state} done", file=sys.stderr, flush=True)
    return out


def _one(est, model, xb, yb, true, name, family, data, seed, state, b, acc, copies=None):
    model.zero_grad(set_to_none=True)
    t = time.process_time()
    est.loss_and_grads(ce, xb, yb)
    dt = time.process_time() - t
    got = layer_grads(model)
    model.zero_grad(set_to_none=True)
    return {"name": name, "family": family, "dataset": data, "seed": seed, "state": state,
            "batch": b, "test_acc_at_state": acc, "copies": copies,
            "rows_per_example": est.last_forward_rows / BATCH, "cpu_s": dt,
            "cosine": {n: cosine(got[n], true[n]) for n in true}}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (name, dataset, state): per layer mean ± std over seeds of the per-seed mean over
    minibatches; then per name the worst conv cell and means over cells."""
    cells: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        cells.setdefault((r["name"], r["dataset"], r["state"]), {}).setdefault(
            r["seed"], []).append(r)
    ref_cpu: dict[tuple, float] = {}
    out: dict[str, dict[str, Any]] = {}
    for (name, data, state), by_seed in cells.items():
        per_seed = {n: [statistics.fmean(r["cosine"][n] for r in rs) for rs in by_seed.values()]
                    for n in SITES}
        flat = [r for rs in by_seed.values() for r in rs]
        cpu = statistics.fmean(r["cpu_s"] for r in flat)
        if name == REF.name:
            ref_cpu[(data, state)] = cpu
        entry = out.setdefault(name, {"name": name, "family": flat[0]["family"], "cells": {}})
        entry["cells"][f"{data}/{state}"] = {
            "layers": {n: mean_std(v) for n, v in per_seed.items()},
            "mean": mean_std([statistics.fmean(v[i] for v in per_seed.values())
                              for i in range(len(by_seed))]),
            "rows_per_example": statistics.fmean(r["rows_per_example"] for r in flat),
            "cpu_s": cpu, "copies": flat[0]["copies"], "seeds": len(by_seed),
            "test_acc_at_state": statistics.fmean(r["test_acc_at_state"] for r in flat)}
    for entry in out.values():
        cs = entry["cells"]
        entry["worst_conv"] = min(c["layers"][n][0] for c in cs.values() for n in CONVS)
        entry["mean_conv"] = statistics.fmean(c["layers"][n][0] for c in cs.values()
                                              for n in CONVS)
        entry["mean_per_layer"] = {n: statistics.fmean(c["layers"][n][0] for c in cs.values())
                                   for n in SITES}
        entry["mean_layers"] = statistics.fmean(c["mean"][0] for c in cs.values())
        entry["rows_per_example"] = max(c["rows_per_example"] for c in cs.values())
        ratios = [c["cpu_s"] / ref_cpu[tuple(k.split("/"))] for k, c in cs.items()
                  if tuple(k.split("/")) in ref_cpu]
        entry["cpu_ratio"] = statistics.fmean(ratios) if ratios else float("nan")
    return list(out.values())


def combinations(alone: dict[str, dict[str, Any]]) -> list[Lever]:
    """Each family's best option (by worst conv cell) that beats the reference, all together,
    then with each of them dropped in turn."""
    by_name = {lv.name: lv for lv in ALONE}
    ref_score = alone[REF.name]["worst_conv"]
    best: dict[str, Lever] = {}
    for fam in FAMILY_FIELDS:
        cands = [lv for lv in ALONE if lv.family == fam and lv.name in alone]
        if cands:
            top = max(cands, key=lambda lv: alone[lv.name]["worst_conv"])
            if alone[top.name]["worst_conv"] > ref_score:
                best[fam] = top
    if len(best) < 2:
        return []

    def combine(fams: list[str]) -> Lever:
        lever = replace(REF, family="combined")
        for fam in fams:
            lever = replace(lever, **{f: getattr(best[fam], f) for f in FAMILY_FIELDS[fam]})
        return replace(lever, name=" + ".join(best[f].name for f in fams))

    combos = [combine(list(best))]
    if len(best) > 2:
        combos += [combine([f for f in best if f != drop]) for drop in best]
    iid = by_name.get("iid + LOO")
    if "sampling" in best and best["sampling"] is not iid and iid is not None:
        # the library's default sampling (iid copies, leave-one-out) in place of the pick, which
        # was chosen by one noisy cell (the fc layers prefer iid + LOO, variance.md)
        best["sampling"] = iid
        combos.append(combine(list(best)))
    return [c for c in combos if c.name not in by_name]


# ------------------------------------------------------------------ the training check
TRAIN_RUNS = {
    # label: extra `ulr train` flags after `--method ulr bp --data fashion-mnist --model lenet5
    # --epochs 1`
    # no flags: LeNet-5's model defaults (ulr.train.recipes.MODEL_DEFAULTS)
    "default": [],
    # the generic defaults, ulr train's no-flags run before LeNet-5 had model defaults
    "generic-defaults": ["--no-model-defaults"],
    # the ablation's "conv noise after ReLU+pool (hybrid blocks)" row at 321 rows per example,
    # constant lr
    "hybrid-pooled": ["--no-model-defaults", "--sites", "pool1", "pool2", "fc1", "fc2", "fc3",
                      "--num-copies", "64", "--sampler", "antithetic", "--sigma", "0.05"],
    # the same at twice the copies (still cheaper per step than the default, see the table)
    "hybrid-pooled-128": ["--no-model-defaults", "--sites", "pool1", "pool2", "fc1", "fc2",
                          "fc3", "--num-copies", "128", "--sampler", "antithetic", "--sigma",
                          "0.05"],
    # the model's recommended configuration, LeNet5.ulr_config() (recorded with the run)
    "recommended": ["--no-model-defaults", "--recommended"],
    # the same with LeNet5.ulr_config() replaced by TRAIN_CONFIGS's: weight noise on conv1
    "recommended-wn-conv1": ["--no-model-defaults", "--recommended"],
}
# LeNet5.ulr_config() as a run sees it, where it differs from the model's own
TRAIN_CONFIGS = {
    "recommended-wn-conv1": {"sigma": dict.fromkeys(("conv2", "fc1", "fc2", "fc3"), 0.05),
                             "weight_sigma": {"conv1": 1e-3},
                             "num_copies": dict.fromkeys(SITES, 32)},
}
# `python -m ulr` with LeNet5.ulr_config() returning the JSON of argv[1]
_PATCHED_ULR = """import json, sys
from ulr.cli import main
from ulr.models.lenet import LeNet5
LeNet5.ulr_config = lambda self: json.loads(sys.argv[1])
raise SystemExit(main(sys.argv[2:]))"""


TRAIN_NOTES = """Reading (times on a shared 2-core machine, so compare the ratios within a row; the
`--no-model-defaults` rows ran earlier the same day on a busier machine, hence their slower
backprop): with no options (`default`) LeNet-5 trains with its model defaults, the
hybrid-blocks placement (noise after each conv block's ReLU + max-pool and at the fc layers, 64
antithetic copies per pass, σ 0.05) with the learning rate decayed to 0 over the run by a
per-step cosine: 82.9% after one epoch at 12.1× backprop's time, the issue's floor (>= 80% in
<= 20×) met with no flags. The cosine decay applies to backprop too, which then ends its one
epoch at 82.6% instead of the 84.4% of a constant rate. The generic defaults (output noise at
the conv outputs, 32 iid copies, σ 0.1) give 71.1%; the same placement with a constant rate
82.7%; twice the copies gain under a point for 1.6× the time; `--recommended` (the
per-layer copies of `LeNet5.ulr_config()`) 80.8% at 3× the time. Weight noise 1e-3 on conv1
with 32 copies per pass (`recommended-wn-conv1`) reaches 81.4%.""".splitlines()


def train_check(labels: list[str], threads: int, workdir: Path) -> list[dict[str, Any]]:
    """One epoch of Fashion-MNIST LeNet-5 by ``ulr train --method ulr bp`` per configuration
    (backprop alongside in the same command, so its time is measured next to ULR's). Each run
    writes ``workdir/<label>``; a label whose run finished there is read, not rerun."""
    out = []
    for label in labels:
        run = workdir / label
        cmd = ["ulr", "train", "--method", "ulr", "bp", "--data", "fashion-mnist", "--model",
               "lenet5", "--epochs", "1", *TRAIN_RUNS[label], "--threads", str(threads),
               "--quiet", "--no-plots"]
        if not (run / "comparison.json").exists():
            if run.exists():
                shutil.rmtree(run)
            run.parent.mkdir(parents=True, exist_ok=True)
            print("cnn:", " ".join(cmd), file=sys.stderr, flush=True)
            # what --recommended reads (LeNet5.ulr_config()), kept beside the run
            config = TRAIN_CONFIGS.get(label) or ulr.models.recommended_config(
                ulr.models.build("lenet5", in_shape=(1, 28, 28), num_classes=10))
            (workdir / f"{label}.ulr_config.json").write_text(json.dumps(config))
            python = ([sys.executable, "-c", _PATCHED_ULR, json.dumps(config)]
                      if label in TRAIN_CONFIGS else [sys.executable, "-m", "ulr"])
            subprocess.run([*python, *cmd[1:], "--out", str(run)], check=True,
                           stdout=subprocess.DEVNULL)
        runs = {r["label"]: r for r in json.loads((run / "comparison.json").read_text())}
        u, b = runs["ulr"], runs["bp"]
        patched = " (LeNet5.ulr_config() replaced)" if label in TRAIN_CONFIGS else ""
        out.append({"label": label, "command": " ".join(cmd) + patched,
                    "ulr_test_acc": u["final"]["test_acc"], "bp_test_acc": b["final"]["test_acc"],
                    "ulr_train_s": u["train_time_s"], "bp_train_s": b["train_time_s"],
                    "time_ratio": u["train_time_s"] / b["train_time_s"],
                    "ulr_rows_per_example": u["forward_rows"] / u["samples"],
                    "ulr_config": {k: u["config"][k] for k in ("sigma", "site_sigma", "num_copies",
                                                               "sampler", "baseline", "recommended",
                                                               "plan", "sites")},
                    "recommended_config": json.loads(
                        (workdir / f"{label}.ulr_config.json").read_text())})
    return out


# ------------------------------------------------------------------ the report
def _table(summary, cell: str) -> list[str]:
    lines = [f"| config | rows/ex | cpu × | {' | '.join(f'`{s}`' for s in SITES)} | mean |",
             "|---|---:|---:|" + "---|" * (len(SITES) + 1)]
    for e in summary:
        c = e["cells"].get(cell)
        if c is None:
            continue
        ratio = f"{e['cpu_ratio']:.2f}"
        cols = " | ".join(f"{c['layers'][n][0]:.3f} ± {c['layers'][n][1]:.3f}" for n in SITES)
        lines.append(f"| {e['name']} | {c['rows_per_example']:.0f} | {ratio} | {cols} | "
                     f"{c['mean'][0]:.3f} ± {c['mean'][1]:.3f} |")
    return lines


# The reading of the tables, written with the run committed in docs/results/cnn.json
# (2026-12-05); the numbers it quotes are that run's.
NOTES = """## Reading the ablation

- **Noise scale** (σ from 0.1 to 0.003, or σ_s = c · std of the site's clean output): no
  consistent change of the conv cosines at 64 copies per pass; the differences stay inside the
  seed spread (± 0.1-0.2 per cell). At this budget the conv estimates are limited by variance,
  not by the smoothing bias that separates σ = 0.1 from 0.01 at K = 4096
  (`defaults-cpu-sigma0.01.md`).
- **Weight noise on conv1** (`ulr.weight_noise`): conv1's cosine goes from -0.01-0.39
  (reference, per cell) to 0.40-0.50 in every cell, with a small spread, at the same CPU
  time: conv1 has 156 weights against 4704 output values per example. On conv2 (2416
  weights, 1600 outputs) it lowers the cosine (about 0.2 to 0.13), so it belongs on conv1
  only. 1e-3, 0.01·std(W) (about 1e-3 here) and 0.1·std(W) are level.
- **Noise after ReLU + max-pool** (hybrid blocks, `ulr.hybrid`: the LR signal is
  back-propagated through ReLU and pooling inside the block to the conv): both convs gain (noise
  dimension 4704 -> 1176 and 1600 -> 400, no noise on units the ReLU switches off), and an
  estimate costs a third of the reference's: the conv runs on the B clean rows and only the
  layers after the pool run on K·B rows. This is LeNet-5's model default for `ulr train`.
- **conv2 through fc1's noise** (a hybrid block conv2 -> pool -> fc1, no site at pool2): fc1
  is linear in pool2's output, so fc1's output noise back-propagated through fc1's weights is
  pool2's noise restricted to the 120 directions fc1 can see (400 -> 120 dimensions): conv2's
  cosine goes from 0.19 (reference) and 0.31 (pooled) to 0.67 on the mean over the cells, and
  the plan has one pass fewer. It back-propagates through one linear layer more than the pooled
  placement; the loss and everything after fc1's site stay undifferentiated.
- **Copy allocation**: moving copies to the conv passes lifts the convs (∝ sqrt-dim: about
  0.37 / 0.32) but takes them from the fc layers (their cosines fall, the mean over layers too),
  and costs 2.5× the CPU at equal rows, because a conv pass runs the whole network on K·B rows.
  The variance pilot (4 estimates of 64 copies, no backprop) is too noisy to beat sqrt-dim.
- **Sampling and baseline**: no consistent effect on the convs. i.i.d. copies with leave-one-out
  give the best fc cosines; Sobol doubles the CPU time, and its power-of-two copy counts spend
  fewer rows in the non-uniform combinations.
- **Combined**: weight noise on conv1 + conv2 through fc1's noise + copies ∝ sqrt-dim of the
  four sites' noise dimensions (conv1's 156 weights, fc1's 120, fc2's 84, fc3's 10: about 112 /
  98 / 82 / 28 copies) keeps both convs >= 0.5 in every cell: with the library's default
  sampling (iid copies, leave-one-out) worst conv cell 0.64, conv1 0.66 and conv2 0.81 on the
  mean over the cells, all layers 0.74 (the winner); with antithetic pairs 0.50. The Sobol
  sampling the selection picked (on one noisy family row) spends only 209 rows (power-of-two
  copy counts) and stays at 0.40.
- **Peers at the same rows**: on conv2 and the fc layers every ULR row is ahead of forward
  gradient, SPSA and ES; on conv1 output-noise ULR is level with forward gradient (0.10-0.26
  against 0.16), the weight-noise and pooled rows are well ahead; the winner is 3-10× their
  cosines on every layer. Each peer estimate costs 3.6-6.5× the reference's CPU (`cpu ×`).

## Where ULR still loses to backprop, and why

At equal rows the gradient floor is met by a configuration that costs 1.7× the reference's
CPU per estimate (5× the pooled placement's): weight noise on conv1 runs the whole network on
K·B rows.
For training at equal *time* the cheap pooled placement wins (`cnn-long.md`: 88.9% on the mean
of 3 seeds in 22 min, `cnn-peers.md`), which keeps conv cosines near 0.3-0.5 at 64 copies per
pass; backprop reaches 90.6% in 84 s (`training-cpu.md`). The remaining gap is variance: the
estimate's error grows with the noise dimensions of a site (cosine ≈ sqrt(K / (K + r)), r
about 1.5× the site's dimensions here), so a conv block needs hundreds of copies per pass for
backprop's gradient, at K forwards of the layers after it. One seed with conv2 through fc1's
noise in training (`--sites pool1 fc1 fc2 fc3`, 18 epochs, cosine decay) reached 88.94% in
1080 s against the default placement's 89.43% in 1326 s on seed 0: faster per epoch, lower at
equal epochs, so not the default. Not tried: local losses (Ren, Kornblith, Liao, Hinton, ICLR
2023; an auxiliary head per block whose own loss is that block's LR signal) — it changes the
objective each block learns, and needs per-site losses in the estimator.
""".splitlines()


def write_report(result: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    s = result["settings"]
    summary = result["summary"]
    for e in summary:  # (JSON written before this column existed)
        e.setdefault("mean_per_layer", {n: statistics.fmean(
            c["layers"][n][0] for c in e["cells"].values()) for n in SITES})
    cells = list(summary[0]["cells"])
    win = result["winner"]
    m = result["machine"]
    lines = [
        "# ULR on convolutions: which levers make LeNet-5's conv gradients good",
        "",
        f"Generated by `{result['command']}` in {result['seconds'] / 60:.1f} min (wall) on "
        f"{m['cpu']}, {m['logical_cores']} logical cores (shared); torch {m['torch']}, ulr "
        f"{m['ulr']}, one torch thread.",
        "",
        f"Protocol (the `ulr bench` gradient-quality one): LeNet-5 on {', '.join(s['datasets'])};"
        f" seeds {s['seeds']}; {s['batches']} minibatches of {BATCH} per seed and state "
        f"(the bench's); `init` and `trained` (after {s['warmup']} backprop Adam steps; test "
        "accuracy in the cell heading). Per layer (weight and bias together): cosine of the "
        "estimate with the exact minibatch gradient, mean over minibatches per seed, then mean "
        "± std over seeds. Every ULR row spends at most "
        f"{s['rows']} forward rows per example (1 clean + {s['rows'] - 1} perturbed copies over "
        "the layer-wise plan's 5 passes; `rows/ex` is what it spent). `cpu ×`: CPU time of one "
        "estimate over the reference's in the same cell (one thread). Variance allocation's "
        "pilot (4 estimates on another minibatch, no backprop) is not counted in the rows.",
        "",
        "## Ablation: each lever alone and combined",
        "",
        "`worst conv`: the smallest seed-mean cosine of conv1 or conv2 over the "
        f"{len(cells)} cells ({', '.join(cells)}): the issue's floor is >= {FLOOR}. "
        "`conv1`, `conv2`: the layer's cosine, mean over the cells; `mean layers`: all 5 "
        "layers over the cells."
        " Combined rows take each family's best option that beats the reference (chosen by "
        "`worst conv` on these same minibatches), then drop each in turn.",
        "",
        "| config | lever | worst conv | conv1 | conv2 | mean layers | rows/ex | cpu × | floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in summary:
        ratio = f"{e['cpu_ratio']:.2f}"
        ok = "met" if e["worst_conv"] >= FLOOR else "**not met**"
        per = e["mean_per_layer"]
        lines.append(f"| {e['name']} | {e['family']} | {e['worst_conv']:.3f} | "
                     f"{per['conv1']:.3f} | {per['conv2']:.3f} | {e['mean_layers']:.3f} | "
                     f"{e['rows_per_example']:.0f} | {ratio} | {ok} |")
    met = [e["name"] for e in summary if e["worst_conv"] >= FLOOR and e["family"] != "peer"]
    lines += [
        "",
        f"**Winner:** {win['name']}: worst conv cell {win['worst_conv']:.3f}, mean conv "
        f"{win['mean_conv']:.3f}, mean over layers {win['mean_layers']:.3f} at "
        f"{win['rows_per_example']:.0f} rows per example. Its configuration: "
        f"`{json.dumps(win['lever'])}`.",
        "",
        "**Floor** (every conv layer's cosine >= 0.5 at <= 321 rows per example, both datasets,"
        " both states): " + (f"met by {', '.join(met)}." if met else
                             "**not met** by any configuration measured here."),
        "",
        *NOTES,
        "## Per cell",
    ]
    for cell in cells:
        acc = summary[0]["cells"][cell]["test_acc_at_state"]
        lines += ["", f"### {cell} (test accuracy {acc:.3f})", "", *_table(summary, cell)]
    lines += _training_section(result.get("training"))
    lines += _full_runs_section(out)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def _full_runs_section(out: Path) -> list[str]:
    """Headlines of the full training runs (cnn_long.py) and of the peers trained to equal time
    and rows (cnn_peers.py), read from their result files beside this one."""
    lines = []
    long_file, peers_file = out / "cnn-long.json", out / "cnn-peers.json"
    if long_file.exists():
        runs = json.loads(long_file.read_text())["runs"]
        accs = [r["test_acc"] for r in runs]
        lines += ["", "## Full runs: `ulr train --method ulr --data fashion-mnist --model lenet5`",
                  "", f"With no options but the seed (LeNet-5's model defaults), {len(runs)} "
                  f"seeds: test accuracy {', '.join(f'{100 * a:.2f}%' for a in accs)}, mean "
                  f"**{100 * statistics.fmean(accs):.2f}%**, each in at most "
                  f"{max(r['train_s'] for r in runs) / 60:.1f} min of training "
                  "([cnn-long.md](cnn-long.md): per epoch, system time, page faults)."]
    if peers_file.exists():
        peers = json.loads(peers_file.read_text())
        s = peers["settings"]
        lines += ["", "## Training against the peers at equal time and equal rows", "",
                  f"{s['data']} LeNet-5, {len(s['seeds'])} seeds ([cnn-peers.md](cnn-peers.md)):",
                  "", f"| method | test acc after {s['time_s']:g} CPU s | after {s['rows']:.3g} "
                  "forward rows |", "|---|---:|---:|"]
        for e in peers["summary"]:
            lines.append(f"| `{e['method']}` | {100 * e['time']['mean']:.2f}% ± "
                         f"{100 * e['time']['std']:.2f} | {100 * e['rows']['mean']:.2f}% ± "
                         f"{100 * e['rows']['std']:.2f} |")
        lines += ["", *PEERS_NOTES]
    return lines


# The reading of cnn-peers.json as committed (2026-12-05); the numbers it quotes are that run's.
PEERS_NOTES = """At equal CPU time ULR is 11-20 points ahead of every peer with any copy count
(the default's 64 copies per pass: 78.3% against ES 62.5%, forward gradient 61.7%, SPSA 58.7%).
At equal forward rows the copy count matters. With the copies sized for a rows budget (4, 8 or
16 per pass: 21-81 rows per example and step) ULR is ahead of every peer on the mean, 72.1-73.7%
against ES 70.0%, forward gradient 58.7% and SPSA 60.2%; with 16 copies per pass on each of the
5 seeds (by 1.0-6.8 points over ES), with 8 or 4 on 3 or 4 of them. With the default's 64
copies per pass (321 rows per example and step, chosen for time) it has taken only 196 steps at
2e6 rows and is behind ES (67.1%). The copy counts 4/8/16 were all run on the same seeds and
are all shown; the learning rates (ULR 3e-3, ES 3e-3) are the best of the grid 1e-3, 3e-3, 1e-2
on seed 0 (cnn-peers.md). ES spends 129 CPU seconds on its 2e6 rows, ULR 10-40.""".splitlines()


def _training_section(training) -> list[str]:
    if not training:
        return []
    lines = ["", "## Training check: one epoch of Fashion-MNIST LeNet-5", "",
             "Each line is one `ulr train` command (run by `python benchmarks/cnn.py "
             "--train-check`), ULR then backprop from the same seed, so the time ratio is "
             "measured side by side. Train time: the run's `train_time_s` (training steps, "
             "evaluation excluded) on the shared 2-core machine. Issue floor: >= 80% after one "
             "epoch in <= 20× backprop's time.", "",
             "| run | ULR test acc | bp test acc | ULR train s | bp train s | ULR / bp time | "
             "ULR rows/ex | floor |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in training["runs"]:
        ok = "met" if t["ulr_test_acc"] >= 0.8 and t["time_ratio"] <= 20 else "**not met**"
        lines.append(f"| `{t['command']}` | {100 * t['ulr_test_acc']:.2f}% | "
                     f"{100 * t['bp_test_acc']:.2f}% | {t['ulr_train_s']:.1f} | "
                     f"{t['bp_train_s']:.1f} | {t['time_ratio']:.1f} | "
                     f"{t['ulr_rows_per_example']:.0f} | {ok} |")
    lines += ["", "`--recommended` reads `LeNet5.ulr_config()` as it was at the time of the run:"]
    for t in training["runs"]:
        if "--recommended" in t["command"]:
            lines.append(f"- `{t['label']}`: `{json.dumps(t['recommended_config'])}`")
    return [*lines, "", *TRAIN_NOTES]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--smoke", "--quick", action="store_true",
                   help="seconds: digits, one seed, init only, one minibatch, a few rows")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--train-check", nargs="*", metavar="LABEL", default=None,
                   help=f"run the 1-epoch `ulr train` checks ({', '.join(TRAIN_RUNS)}; all by "
                        "default) and add them to an existing cnn.json instead of measuring")
    p.add_argument("--train-dir", default=str(ROOT / "benchmarks" / "out" / "cnn-train"),
                   help="where --train-check's runs go (a finished run is reused)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    command = "python benchmarks/cnn.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.train_check is not None:
        runs = train_check(args.train_check or list(TRAIN_RUNS), args.threads,
                           Path(args.train_dir))
        result = json.loads((out / "cnn.json").read_text())  # read after: it may have changed
        done = {t["label"]: t for t in (result.get("training") or {}).get("runs", [])}
        done.update({t["label"]: t for t in runs})
        order = list(TRAIN_RUNS)
        result["training"] = {"command": command.strip(), "runs": sorted(
            done.values(), key=lambda t: order.index(t["label"]) if t["label"] in order else 99)}
        write_report(result, out, "cnn")
        return result["training"]["runs"]
    if args.smoke:
        datasets, seeds, batches, warmup, rows = ("digits",), (0,), 1, 0, 41
        levers = [ALONE[i] for i in (0, 4, 7, 12, 14, 15, 19, 21)]
    else:
        datasets, seeds, batches, warmup, rows = (("mnist-subset", "fashion-mnist"),
                                                  tuple(range(args.seeds)), args.batches, 150, 321)
        levers = ALONE
    t0 = time.time()
    rows_out = measure(levers, datasets, seeds, batches, warmup, rows, not args.no_peers,
                       not args.smoke)
    alone = {e["name"]: e for e in summarize(rows_out)}
    combos = combinations(alone)
    if combos:
        rows_out += measure(combos, datasets, seeds, batches, warmup, rows, False,
                            not args.smoke)
    summary = summarize(rows_out)
    by_lever = {lv.name: lv for lv in [*levers, *combos]}
    win = max((e for e in summary if e["family"] != "peer"), key=lambda e: e["worst_conv"])
    result = {
        "command": command.strip(), "seconds": time.time() - t0, "machine": machine(),
        "settings": {"datasets": list(datasets), "seeds": list(seeds), "batches": batches,
                     "warmup": warmup, "rows": rows, "threads": args.threads},
        "levers": [asdict(lv) for lv in by_lever.values()],
        "summary": summary,
        "winner": {**{k: win[k] for k in ("name", "worst_conv", "mean_conv", "mean_layers",
                                          "rows_per_example")},
                   "lever": asdict(by_lever[win["name"]]),
                   "copies": {c: win["cells"][c]["copies"] for c in win["cells"]}},
        "rows": rows_out,
    }
    stem = "cnn-smoke" if args.smoke else "cnn"
    if not args.smoke and (out / "cnn.json").exists():  # keep the training check's runs
        result["training"] = json.loads((out / "cnn.json").read_text()).get("training")
    write_report(result, out, stem)
    print(f"winner: {win['name']} (worst conv cell {win['worst_conv']:.3f})")
    return summary


if __name__ == "__main__":
    main()
