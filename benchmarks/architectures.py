"""One estimator for every architecture: ULR next to its backprop reference, per architecture.

For each architecture the same model (same initial weights, same data order, same optimiser)
is trained twice: by ULR (sites on every parametrised module, antithetic noise, leave-one-out
baseline, layer-wise passes) and by backprop (BPTT for recurrent nets, surrogate-gradient BPTT
for the spiking net, a differentiable relaxation for hard thresholds and the numpy black box).
Writes ``architectures-cpu.json`` and ``architectures-cpu.md`` (test accuracy, or test MSE for
the adding problem; wall time; seeds).

    python benchmarks/architectures.py                    # all, ~1 h on 2 CPU cores
    python benchmarks/architectures.py --only lstm gcn-sbm
    python benchmarks/architectures.py --smoke            # tiny, for CI
"""


import argparse
import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ulr
from ulr.models import gnn
from ulr.models.binary import zero_one_loss


def ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def mse(out: Tensor, y: Tensor) -> Tensor:
    return (out[:, 0] - y).square()


@dataclass
class Task:
    """One architecture on one dataset: how to build the ULR model and its BP reference."""

    arch: str
    data: str
    model: str
    ulr_kwargs: dict[str, Any] = field(default_factory=dict)  # model kwargs for the ULR run
    bp_kwargs: dict[str, Any] = field(default_factory=dict)  # model kwargs for the reference
    reference: str = "backprop"
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    bp_epochs: int | None = None
    lr: float = 3e-3
    batch: int = 64
    sigma: float | dict[str, float] = 0.05  # one σ, or {site pattern: σ} (fnmatch, first match)
    copies: int = 32
    loss: str = "ce"  # "ce", "mse" or "zero-one" (ULR only; BP then trains on CE)
    sites: Any = None
    groups: list[list[str]] | None = None  # layerwise site groups (default: one pass per site)
    schedule: str = "constant"  # or "cosine": cosine annealing of the lr over all steps
    easy: bool = True  # the floor "within 5 points of the reference" applies


_BLOCK_GROUPS = [["embed", "embed.proj"], ["blocks.*.norm1", "blocks.*.attn.*"],
                 ["blocks.*.norm2", "blocks.*.fc1", "blocks.*.fc2"], ["norm", "head"]]

TASKS: dict[str, Task] = {
    "rnn": Task("RNN (Elman), cells", "sequential-digits", "rnn",
                {"hidden_size": 64}, {"hidden_size": 64}, "BPTT", epochs=40, copies=64,
                schedule="cosine"),
    "gru": Task("GRU, cells", "sequential-digits", "gru",
                {"hidden_size": 64}, {"hidden_size": 64}, "BPTT", epochs=40, copies=64,
                schedule="cosine"),
    "lstm": Task("LSTM, cells", "sequential-digits", "lstm",
                 {"hidden_size": 32}, {"hidden_size": 32}, "BPTT", epochs=100, copies=64,
                 lr=1e-2, schedule="cosine"),
    "lstm-adding": Task("LSTM, cells", "adding", "lstm", {"hidden_size": 32},
                        {"hidden_size": 32}, "BPTT", {"seq_len": 20, "n_train": 4000},
                        epochs=30, copies=16, lr=1e-2, loss="mse", easy=False),
    "gcn-karate": Task("GCN", "karate", "gcn", epochs=100, lr=0.01, sigma=0.1, copies=64),
    "gcn-sbm": Task("GCN", "sbm", "gcn", epochs=100, lr=0.01, sigma=0.1, copies=32),
    "snn": Task("SNN (LIF, Heaviside spike)", "digits", "snn", {"hidden": (128,)},
                {"hidden": (128,), "surrogate": "fast-sigmoid"}, "surrogate-gradient BPTT",
                epochs=15, sigma=0.1, copies=64),
    "transformer": Task("Transformer encoder", "sequential-digits", "transformer",
                        {"d_model": 32}, {"d_model": 32}, epochs=45, copies=32,
                        groups=_BLOCK_GROUPS),
    # Sites at the BN outputs: each conv+BN pair is one block whose local VJP includes the
    # batch statistics exactly (docs/architectures.md, BatchNorm).
    "resnet5-bn": Task("ResNet-5 + CopyBatchNorm, sites at BN outputs", "digits", "resnet5-bn",
                       epochs=10, sigma=0.1, copies=16,
                       sites=ulr.sites.by_name("bn1", "bn2", "bn3", "bn4", "fc")),
    "binary-mlp": Task("binary weights + sign units", "digits", "binary-mlp",
                       {"hidden": (256,)}, {"hidden": (256,), "relaxation": "ste"},
                       "BP, straight-through", epochs=20, sigma=0.3),
    # The 0-1 loss is flat unless the noisy argmax flips: σ = 2 at the logits keeps rows that
    # are misclassified by a wide margin within reach (docs/architectures.md, 0-1 loss).
    "binary-mlp-01": Task("binary weights + sign units, 0-1 loss", "digits", "binary-mlp",
                          {"hidden": (256,)}, {"hidden": (256,), "relaxation": "ste"},
                          "BP, straight-through, CE", epochs=60,
                          sigma={"hidden.*": 0.5, "out": 2.0}, loss="zero-one",
                          schedule="cosine"),
    "blackbox-mlp": Task("numpy black box (4-bit tanh table)", "digits", "blackbox-mlp",
                         {"hidden": 128}, {"hidden": 128, "relaxation": "tanh"},
                         "BP, tanh relaxation", epochs=20, sigma=0.1),
}


def _estimator(model: nn.Module, task: Task, seed: int, **kwargs: Any) -> ulr.LikelihoodRatio:
    noise = (ulr.Gaussian(task.sigma) if not isinstance(task.sigma, dict)
             else {pattern: ulr.Gaussian(s) for pattern, s in task.sigma.items()})
    return ulr.LikelihoodRatio(
        model, sites=task.sites, noise=noise, num_copies=task.copies,
        sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
        plan=ulr.plans.layerwise(task.groups), generator=torch.Generator().manual_seed(seed),
        **kwargs)


@torch.no_grad()
def _score(model: nn.Module, x: Tensor, y: Tensor, regression: bool) -> float:
    model.eval()
    outs = torch.cat([model(x[i:i + 512]) for i in range(0, len(x), 512)])
    model.train()
    if regression:
        return float(mse(outs, y).mean())
    return float((outs.argmax(1) == y).float().mean())


def _train_batches(task: Task, ds: Any, model: nn.Module, method: str, epochs: int, seed: int,
                   smoke: bool) -> None:
    (x, y) = ds.train
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    # Backprop under the same contract: one step for both methods (bp trains on the
    # differentiable loss of the task, CE for the 0-1 tasks).
    row_loss = ({"ce": ce, "mse": mse, "zero-one": zero_one_loss}[task.loss] if method == "ulr"
                else mse if task.loss == "mse" else ce)
    est = _estimator(model, task, seed) if method == "ulr" else ulr.peers.Backprop(model)
    order = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(x) // task.batch)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
             if task.schedule == "cosine" else None)
    clip = getattr(model, "clip_", None)
    for _ in range(epochs):
        for i, (xb, yb) in enumerate(ulr.data.batches(x, y, task.batch, shuffle=True,
                                                      generator=order)):
            opt.zero_grad(set_to_none=True)
            est.loss_and_grads(row_loss, xb, yb)
            opt.step()
            if sched is not None:
                sched.step()
            if clip is not None:
                clip()
            if smoke:
                break


def _train_graph(task: Task, ds: Any, model: nn.Module, method: str, epochs: int, seed: int
                 ) -> None:
    (x, adj), (y, mask) = ds.train
    opt = torch.optim.Adam(model.parameters(), lr=task.lr, weight_decay=5e-4)
    if method == "ulr":
        est = _estimator(model, task, seed, replicate=gnn.tile_graph)
        loss = gnn.NodeLoss(adj, hops=model.loss_hops)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        if method == "ulr":
            est.loss_and_grads(loss, (x, adj), (y, mask))
        else:
            (ce(model(x, adj), y) * mask).sum().div(mask.sum()).backward()
        opt.step()


def run_task(key: str, task: Task, seed: int, smoke: bool, epochs_override: int | None = None,
             methods: tuple[str, ...] = ("ulr", "bp")) -> list[dict[str, Any]]:
    if smoke:
        task = replace(task, copies=4, batch=16)
    data_kwargs = dict(task.data_kwargs)
    if smoke and task.data == "adding":
        data_kwargs.update(n_train=128, n_val=32, n_test=64)
    if smoke and task.data == "sbm":
        data_kwargs.update(num_nodes=300, num_val=50, num_test=100)
    ds = ulr.data.load(task.data, seed=seed, **data_kwargs)
    graph = task.data in ("karate", "sbm")
    regression = getattr(ds, "task", "") == "regression"
    outputs = 1 if regression else ds.num_classes
    rows = []
    for method, kwargs in (("ulr", task.ulr_kwargs), ("bp", task.bp_kwargs)):
        if method not in methods:
            continue
        torch.manual_seed(seed)
        model = ulr.models.build(task.model, in_shape=ds.input_shape, num_classes=outputs,
                                 **kwargs)
        epochs = task.epochs if method == "ulr" else (task.bp_epochs or task.epochs)
        if smoke:
            epochs = 1 if not graph else 2
        elif epochs_override:
            epochs = epochs_override
        t0 = time.perf_counter()
        if graph:
            _train_graph(task, ds, model, method, epochs, seed)
            (x, adj), (y, mask) = ds.test
            with torch.no_grad():
                pred = model(x, adj).argmax(1)
            value = float((pred[mask] == y[mask]).float().mean())
        else:
            _train_batches(task, ds, model, method, epochs, seed, smoke)
            value = _score(model, *ds.test, regression)
        wall = time.perf_counter() - t0
        chance = (1 / 6 if regression else _graph_chance(ds) if graph else
                  float(torch.bincount(ds.test[1]).max()) / len(ds.test[1]))
        rows.append({
            "task": key, "arch": task.arch, "data": task.data, "model": task.model,
            "method": "ULR" if method == "ulr" else task.reference,
            "metric": "test MSE" if regression else "test accuracy",
            "value": value, "chance": chance, "epochs": epochs, "wall_s": wall, "seed": seed,
            "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
            "loss": task.loss if method == "ulr" else ("mse" if task.loss == "mse" else "ce"),
            "ulr": ({"sigma": task.sigma, "num_copies": task.copies, "sampler": "antithetic",
                     "baseline": "leave_one_out", "plan": "layerwise", "groups": task.groups,
                     "sites": None if task.sites is None else repr(task.sites),
                     "lr": task.lr, "schedule": task.schedule, "batch": task.batch}
                    if method == "ulr" else {"lr": task.lr, "schedule": task.schedule,
                                             "batch": task.batch}),
        })
        print(f"{key:14s} {rows[-1]['method']:28s} {rows[-1]['metric']} {value:.4f} "
              f"({wall:.0f} s)", flush=True)
    return rows


def time_graph_copies(smoke: bool, repeats: int = 5) -> list[dict[str, Any]]:
    """Seconds per ULR gradient of a 2-layer GCN on the SBM graph with the K copies made by
    a shared adjacency (tile_graph) or a block-diagonal one (block_diagonal_graph)."""
    kwargs = {"num_nodes": 300, "num_val": 50, "num_test": 100} if smoke else {}
    ds = ulr.data.load("sbm", **kwargs)
    (x, adj), (y, mask) = ds.train
    rows = []
    for k in ([4] if smoke else [8, 32, 128]):
        for name, hook in (("shared adjacency (tile_graph)", gnn.tile_graph),
                           ("block-diagonal adjacency", gnn.block_diagonal_graph)):
            torch.manual_seed(0)
            model = gnn.GCN(ds.input_shape[0], ds.num_classes)
            est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.1), num_copies=k,
                                      sampler=ulr.antithetic(), replicate=hook,
                                      baseline=ulr.baselines.none(), plan=ulr.plans.all_sites(),
                                      generator=torch.Generator().manual_seed(0))
            loss = gnn.NodeLoss(adj, hops=1)
            times = []
            for _ in range(1 if smoke else repeats + 1):
                t0 = time.perf_counter()
                est.loss_and_grads(loss, (x, adj), (y, mask))
                times.append(time.perf_counter() - t0)
            rows.append({"copies": k, "replicate": name, "nodes": ds.num_nodes,
                         "seconds": sorted(times[1:] or times)[len(times[1:] or times) // 2]})
            print(f"graph copies K={k:4d} {name:32s} {rows[-1]['seconds'] * 1e3:8.1f} ms",
                  flush=True)
    return rows


def _graph_chance(ds: Any) -> float:
    y, mask = ds.y[ds.test_mask], ds.test_mask
    return float(torch.bincount(y).max()) / int(mask.sum())


def to_markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        f"Machine: {env['machine']}; torch {env['torch']}; seeds {env['seeds']}. "
        f"Command: `{env['command']}`. Threads per row below (a row from an earlier run keeps "
        f"that run's conditions).",
        "",
        "| task | architecture | data | method | seed | metric | result | chance | epochs | "
        "lr (schedule) | ULR K, σ | threads | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = r["metric"] == "test accuracy"
        val = f"{100 * r['value']:.1f}%" if pct else f"{r['value']:.4f}"
        chance = f"{100 * r['chance']:.0f}%" if pct else f"{r['chance']:.3f}"
        u = r["ulr"]
        sched = u.get("schedule", "constant")
        lr = f"{u['lr']:g} ({sched})" if "lr" in u else sched
        ks = f"{u['num_copies']}, {_sigma_text(u['sigma'])}" if "num_copies" in u else "–"
        threads = r.get("env", env)["threads"]
        lines.append(f"| {r['task']} | {r['arch']} | {r['data']} | {r['method']} | {r['seed']} "
                     f"| {r['metric']} | {val} | {chance} | {r['epochs']} | {lr} | {ks} "
                     f"| {threads} | {r['wall_s']:.0f} |")
    return "\n".join(lines + _summary(rows)) + "\n"


def _sigma_text(sigma: float | dict[str, float]) -> str:
    if isinstance(sigma, dict):
        return " / ".join(f"{pattern} {s:g}" for pattern, s in sigma.items())
    return f"{sigma:g}"


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per task: ULR and its reference, mean (range) over the seeds, and the gap of the means
    (the issue's floor: ULR within 5 points of its reference)."""
    out = ["", "Per task, mean over seeds (min–max):", "",
           "| task | seeds | ULR | reference | gap (points) |", "|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        ulr_rows = [r for r in mine if r["method"] == "ULR"]
        ref_rows = [r for r in mine if r["method"] != "ULR"]
        if not ulr_rows or not ref_rows:
            continue
        pct = ulr_rows[0]["metric"] == "test accuracy"

        def fmt(vals: list[float], pct: bool = pct) -> str:
            m = sum(vals) / len(vals)
            if pct:
                return f"{100 * m:.1f}% ({100 * min(vals):.1f}–{100 * max(vals):.1f})"
            return f"{m:.4f} ({min(vals):.4f}–{max(vals):.4f})"

        u = [r["value"] for r in ulr_rows]
        b = [r["value"] for r in ref_rows]
        gap = (f"{100 * (sum(b) / len(b) - sum(u) / len(u)):.1f}" if pct
               else f"MSE, chance {ulr_rows[0]['chance']:.3f}")
        seeds = sorted({r["seed"] for r in ulr_rows})
        out.append(f"| {task} | {', '.join(map(str, seeds))} | {fmt(u)} | "
                   f"{fmt(b)} ({ref_rows[0]['method']}) | {gap} |")
    return out


def _parse_sets(items: list[str]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(Task)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set needs FIELD=JSON with FIELD one of {sorted(fields)}, "
                             f"got {item!r}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--set {key}: {text!r} is not JSON ({e})") from None
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", default=None, choices=sorted(TASKS))
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--epochs", type=int, default=None, help="override every task's epochs")
    p.add_argument("--methods", nargs="*", default=["ulr", "bp"], choices=["ulr", "bp"])
    p.add_argument("--graph-copies", action="store_true",
                   help="only time the two ways of replicating a graph")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a Task field of every task run, e.g. --set copies=64 "
                        "--set lr=0.01 --set sites=null (the variants of the tuning path in "
                        "docs/architectures.md)")
    p.add_argument("--merge", action="store_true",
                   help="replace only the rows of the tasks run in the existing result file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.graph_copies or args.smoke:
        grows = time_graph_copies(args.smoke)
        name = "architectures-graph-copies" + ("-smoke" if args.smoke else "")
        (out / f"{name}.json").write_text(json.dumps(grows, indent=1))
        lines = ["| copies K | replication | nodes | ms per ULR gradient |", "|---|---|---|---|"]
        lines += [f"| {r['copies']} | {r['replicate']} | {r['nodes']} | "
                  f"{1e3 * r['seconds']:.1f} |" for r in grows]
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")
        if args.graph_copies:
            return grows
    changes = _parse_sets(args.set)
    keys = args.only or list(TASKS)
    if args.smoke:
        keys = args.only or ["rnn", "gcn-karate", "snn", "blackbox-mlp"]
    rows = []
    for seed in args.seeds:
        for key in keys:
            rows.extend(run_task(key, replace(TASKS[key], **changes), seed, args.smoke,
                                 args.epochs, tuple(args.methods)))
    env = {"machine": f"{platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads, CPU",
           "torch": torch.__version__, "ulr": ulr.__version__, "threads": args.threads,
           "seeds": args.seeds,
           "command": "python benchmarks/architectures.py" + (
               f" --only {' '.join(args.only)}" if args.only else "")
           + "".join(f" --set {item}" for item in args.set)}
    name = "architectures-smoke" if args.smoke else "architectures-cpu"
    path = out / f"{name}.json"
    if args.merge and path.exists():
        # Keep the other tasks' rows (and their run conditions) from the earlier run.
        old = json.loads(path.read_text())
        ran = {r["task"] for r in rows}
        kept = [r for r in old["rows"] if r["task"] not in ran]
        for r in kept:
            r.setdefault("env", old["env"])
        for r in rows:
            r["env"] = env
        order = list(TASKS)
        rows = sorted(kept + rows, key=lambda r: (order.index(r["task"]) if r["task"] in order
                                                  else len(order), r["method"] != "ULR",
                                                  r["seed"]))
        env = {**env, "command": "python benchmarks/architectures.py (several runs, --merge; "
                                 "each row's conditions in the JSON)"}
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(to_markdown(rows, env))
    return rows


if __name__ == "__main__":
    main()
