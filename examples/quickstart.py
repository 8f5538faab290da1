"""Train an MLP on the embedded digits data without backpropagation.

The loop is an ordinary PyTorch loop; only the line that computes gradients differs:
`est.loss_and_grads(...)` replaces `loss.backward()`.

    python examples/quickstart.py            # ~5-10 s on 2 cores, ~98% test accuracy
    python examples/quickstart.py --smoke    # a few steps, for CI
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import ulr

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--smoke", action="store_true", help="run 2 steps only")
parser.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: this small MLP is fastest on one thread; "
                         "0: torch's default of all cores, ~2.6x slower on shared cores)")
args = parser.parse_args()

# As `ulr train` does: one thread (a small model gains nothing from more, and on cores shared
# with other jobs extra threads only wait for each other), and the allocator tuned for the
# K·B-row buffers of each step.
if args.threads:
    torch.set_num_threads(args.threads)
ulr.tune_allocator()
torch.manual_seed(0)
data = ulr.data.load("digits", seed=0)
(x_train, y_train), (x_test, y_test) = data.train, data.test
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

# The defaults: noise N(0, 0.1²) on the output of both Linear layers; 32 iid copies per
# example; each copy's loss minus the mean of the other copies' (leave-one-out); one perturbed
# pass per layer (layer-wise).
est = ulr.LikelihoodRatio(model, num_copies=32)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)


def loss_fn(logits, y):  # one loss per row; never differentiated
    return F.cross_entropy(logits, y, reduction="none")


order = torch.Generator().manual_seed(0)
step = 0
for epoch in range(args.epochs):
    for xb, yb in ulr.data.batches(x_train, y_train, 32, shuffle=True, generator=order):
        opt.zero_grad()
        loss = est.loss_and_grads(loss_fn, xb, yb)  # instead of loss.backward()
        opt.step()
        step += 1
        if args.smoke and step == 2:
            break
    if args.smoke:
        break
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"epoch {epoch + 1:2d}  noisy loss {loss.item():.3f}  test accuracy {acc:.3f}")
