"""Record every gradient the estimators write for a fixed set of cases, or compare two records.

Used to check that a refactoring keeps behaviour bit for bit (issue 15): run it on the commit
before and the commit after, then compare.

    python scripts/grad_fingerprint.py record before.pt     # on the old commit
    python scripts/grad_fingerprint.py record after.pt      # on the new commit
    python scripts/grad_fingerprint.py compare before.pt after.pt

The cases use only the public API: the 18 model families of ``tests/zoo.py`` under the
defaults; the test registries (every noise x sampler x baseline x plan) on the conftest MLP and
CNN; the three memory modes and worker threads; weight noise, hybrid blocks, dropout and
train-mode BatchNorm; the peers. Each case takes three steps (so stateful baselines and
generator continuation are covered) and records the mean loss and every ``p.grad`` of each
step. ``compare`` demands exact equality (``torch.equal``) and lists every case that differs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zoo import ZOO  # noqa: E402

import ulr  # noqa: E402

STEPS = 3
NOISES = {"gaussian": lambda: ulr.Gaussian(0.1), "laplace": lambda: ulr.Laplace(0.1),
          "logistic": lambda: ulr.Logistic(0.1)}
SAMPLERS = {"iid": ulr.iid, "antithetic": ulr.antithetic, "sobol": ulr.sobol,
            "antithetic_sobol": lambda: ulr.antithetic(ulr.sobol())}
BASELINES = {
    "none": lambda: ulr.baselines.none(),
    "leave_one_out": lambda: ulr.baselines.leave_one_out(),
    "clean": lambda: ulr.baselines.clean(),
    "running_average": lambda: ulr.baselines.running_average(),
    "chain": lambda: ulr.baselines.chain(ulr.baselines.clean(),
                                         ulr.baselines.running_average()),
}
PLANS = {"all_sites": ulr.plans.all_sites, "layerwise": ulr.plans.layerwise}


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 4))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, 3))


def dropout_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(16, 4)).train()


def _data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "cnn":
        return torch.randn(8, 1, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    return torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def _run(make_model: Callable[[], nn.Module], make_est: Callable[[nn.Module], Any],
         inputs: Any, targets: Any, loss_fn: Callable) -> list[dict[str, torch.Tensor]]:
    model = make_model()
    est = make_est(model)
    torch.manual_seed(123)  # model randomness (dropout) comes from the global RNG
    steps = []
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        loss = est.loss_and_grads(loss_fn, inputs, targets)
        rec = {"loss": torch.as_tensor(loss).detach().clone()}
        for name, p in model.named_parameters():
            if p.grad is not None:
                rec[name] = p.grad.detach().clone()
        steps.append(rec)
        with torch.no_grad():  # move the weights, so the next step sees a new point
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.05 * p.grad)
    return steps


def _lr(**kw: Any) -> Callable[[nn.Module], Any]:
    return lambda m: ulr.LikelihoodRatio(m, generator=torch.Generator().manual_seed(7), **kw)


def cases() -> dict[str, Callable[[], list[dict[str, torch.Tensor]]]]:
    out: dict[str, Callable[[], list[dict[str, torch.Tensor]]]] = {}
    for name, make_case in ZOO.items():
        def zoo_case(make_case: Callable = make_case) -> list:
            case = make_case(0)
            return _run(lambda: case.model, _lr(num_copies=8), case.inputs, case.targets,
                        case.loss_fn)
        out[f"zoo/{name}"] = zoo_case
    for model_name, make_model in (("mlp", small_mlp), ("cnn", small_cnn)):
        x, y = _data(model_name)
        for n, noise in NOISES.items():
            for s, sampler in SAMPLERS.items():
                for b, baseline in BASELINES.items():
                    for p, plan in PLANS.items():
                        def grid_case(make_model=make_model, x=x, y=y, noise=noise,
                                      sampler=sampler, baseline=baseline, plan=plan) -> list:
                            return _run(make_model, _lr(num_copies=8, noise=noise(),
                                                        sampler=sampler(),
                                                        baseline=baseline(), plan=plan()),
                                        x, y, ce)
                        out[f"grid/{model_name}/{n}/{s}/{b}/{p}"] = grid_case
        for mode, kw in (("store", {}), ("chunked", dict(memory="chunked", chunk_size=3)),
                         ("replay", dict(memory="replay")), ("workers", dict(workers=2)),
                         ("chunked-workers", dict(memory="chunked", chunk_size=4, workers=2))):
            for p, plan in PLANS.items():
                out[f"mode/{model_name}/{mode}/{p}"] = (
                    lambda make_model=make_model, x=x, y=y, kw=kw, plan=plan:
                    _run(make_model, _lr(num_copies=8, plan=plan(), **kw), x, y, ce))
        out[f"weight-noise/{model_name}"] = (
            lambda make_model=make_model, x=x, y=y: _run(
                make_model, lambda m: ulr.LikelihoodRatio(
                    m, num_copies=8, generator=torch.Generator().manual_seed(7),
                    noise={"0": ulr.weight_noise(ulr.Gaussian(0.05)), "*": ulr.Gaussian(0.1)}),
                x, y, ce))
        out[f"hybrid/{model_name}"] = (
            lambda make_model=make_model, x=x, y=y: _run(
                make_model, lambda m: ulr.LikelihoodRatio(
                    m, num_copies=8, sites=ulr.hybrid.blocks(m, 2),
                    generator=torch.Generator().manual_seed(7)), x, y, ce))
    x, y = _data("mlp")
    for mode, kw in (("store", {}), ("chunked", dict(memory="chunked", chunk_size=3)),
                     ("replay", dict(memory="replay"))):
        out[f"dropout-bn/{mode}"] = (lambda kw=kw: _run(dropout_bn, _lr(num_copies=8, **kw),
                                                        x, y, ce))
    from ulr import peers

    for name in ("forward-gradient", "spsa", "es", "backprop"):
        out[f"peer/{name}"] = (lambda name=name: _run(small_mlp, lambda m: peers.build(
            name, m, generator=torch.Generator().manual_seed(7)), x, y, ce))
    return out


def record(path: str) -> None:
    result: dict[str, Any] = {}
    for name, run in cases().items():
        try:
            result[name] = run()
        except Exception as exc:  # a case an older commit cannot run is recorded as such
            result[name] = f"{type(exc).__name__}: {exc}"
    torch.save(result, path)
    failed = [k for k, v in result.items() if isinstance(v, str)]
    print(f"recorded {len(result)} cases to {path} ({len(failed)} raised)")
    for k in failed:
        print(f"  {k}: {result[k]}")


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    bad = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            bad.append(f"{name}: only in {'the first' if name in a else 'the second'}")
            continue
        x, y = a[name], b[name]
        if isinstance(x, str) or isinstance(y, str):
            if x != y:
                bad.append(f"{name}: {x if isinstance(x, str) else 'ok'} vs "
                           f"{y if isinstance(y, str) else 'ok'}")
            continue
        for step, (u, v) in enumerate(zip(x, y, strict=True)):
            if u.keys() != v.keys():
                bad.append(f"{name} step {step}: gradients for {sorted(u)} vs {sorted(v)}")
            else:
                diff = [k for k in u if not torch.equal(u[k], v[k])]
                if diff:
                    bad.append(f"{name} step {step}: differs in {diff}")
    print(f"{len(set(a) | set(b))} cases, {len(bad)} differ")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
