"""A model split over two processes that never send a gradient backwards.

Process 0 holds the front of an MLP (64 -> 128), process 1 the back (128 -> 64 -> 10). Each has
its own ULR estimator and optimizer. Per step:

    process 0: noisy forward of K copies of the batch  --- activations [K*B, 128] --->  process 1
    process 1: noisy forward of its layers, per-row losses L [K*B]
    process 1: broadcasts L  --- K*B floats --->  process 0
    both:      each computes its own layers' LR gradient from L and its own noise, and steps

Nothing travels backwards but the K*B per-row losses: no activation gradient, and process 1
never waits for process 0 (nor 0 for a backward pass of 1) once the losses are out; the two
halves compute their updates at the same time. Together they compute exactly the all-sites ULR
estimate of the whole model (tests/test_distributed.py checks the split against one estimator
with the same noise).

    python examples/model_parallel.py            # 2 gloo processes, ~95% test accuracy
    python examples/model_parallel.py --smoke    # a few steps, for CI
"""

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ulr
from ulr.train.launch import launch

K, BATCH, WIDTH = 32, 32, 128


def front() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, WIDTH), nn.Tanh())


def back() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, 64), nn.Tanh(), nn.Linear(64, 10))


def stage(rank: int, world_size: int, epochs: int, smoke: bool) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # each process initialises its own part
    data = ulr.data.load("digits", seed=0)  # both processes load the same data ...
    (x_train, y_train), (x_test, y_test) = data.train, data.test
    order = torch.Generator().manual_seed(0)  # ... and draw the same batches
    model = front() if rank == 0 else back()
    est = ulr.LikelihoodRatio(
        model, noise=ulr.Gaussian(0.1), num_copies=K, sampler=ulr.iid(),
        baseline=ulr.baselines.leave_one_out(),  # same losses, same weights in both parts
        plan=ulr.plans.all_sites(),  # one pass: one exchange of losses per step
        generator=torch.Generator().manual_seed(100 + rank),  # independent noise streams
        # process 1 receives K*B rows that already are the copies: no tiling
        replicate=None if rank == 0 else (lambda inputs, k: inputs))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    clock = {"compute": 0.0, "wait for losses": 0.0, "wait for activations": 0.0}
    sent = 0

    def remote_loss(h):  # process 0: the loss is computed by process 1
        nonlocal sent
        t = time.perf_counter()
        dist.send(h.contiguous(), dst=1)
        losses = torch.empty(h.shape[0])
        dist.broadcast(losses, src=1)
        sent += h.numel() * h.element_size()
        clock["wait for losses"] += time.perf_counter() - t
        return losses

    def local_loss(out, y):  # process 1: compute the losses and broadcast them at once
        nonlocal sent
        losses = F.cross_entropy(out, y, reduction="none")
        dist.broadcast(losses, src=1)
        sent += losses.numel() * losses.element_size()
        return losses

    step = 0
    for epoch in range(epochs):
        for xb, yb in ulr.data.batches(x_train, y_train, BATCH, shuffle=True, generator=order):
            opt.zero_grad()
            if rank == 0:
                t = time.perf_counter()
                est.loss_and_grads(remote_loss, xb)
            else:
                t = time.perf_counter()
                h = torch.empty(K * len(xb), WIDTH)
                dist.recv(h, src=0)
                clock["wait for activations"] += time.perf_counter() - t
                t = time.perf_counter()
                est.loss_and_grads(local_loss, h, yb)
            clock["compute"] += time.perf_counter() - t  # minus the wait, below
            opt.step()
            step += 1
            if smoke and step == 3:
                break
        # clean evaluation: process 0 sends the features of the test set
        with torch.no_grad():
            if rank == 0:
                dist.send(model(x_test), dst=1)
            else:
                feats = torch.empty(len(x_test), WIDTH)
                dist.recv(feats, src=0)
                acc = (model(feats).argmax(1) == y_test).float().mean().item()
                print(f"epoch {epoch + 1}  test accuracy {acc:.3f}", flush=True)
        if smoke:
            break
    clock["compute"] -= clock["wait for losses"]
    return {"rank": rank, "steps": step, "sent_bytes_per_step": sent / max(step, 1),
            "seconds": clock}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="3 steps, for CI")
    args = parser.parse_args()
    t = time.perf_counter()
    results = launch(stage, 2, args.epochs, args.smoke, timeout_s=120,
                     deadline_s=120 if args.smoke else None)
    print(f"{results[0]['steps']} steps in {time.perf_counter() - t:.1f} s (2 processes)")
    for r in results:
        what = ("activations forward" if r["rank"] == 0 else "losses broadcast back")
        secs = ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items() if v)
        print(f"process {r['rank']}: sends {r['sent_bytes_per_step'] / 1024:.1f} KiB per step "
              f"({what}); {secs}")


if __name__ == "__main__":
    main()
