"""Recurrent nets without backpropagation through time.

Each LSTM cell is one ``nn.Linear`` on ``[x_t, h_{t-1}]`` called once per step, so every
step's pre-activation is its own noise site: the gradient is the sum over steps of closed-form
local products and nothing is propagated back through time. The digits are read row by row
(8 steps of 8 pixels).

    python examples/rnn.py                    # ~3 min on 2 cores, LSTM, ~90% test accuracy
    python examples/rnn.py --kind gru
    python examples/rnn.py --smoke
"""

import argparse

import torch
import torch.nn.functional as F

import ulr

parser = argparse.ArgumentParser()
parser.add_argument("--kind", choices=["rnn", "gru", "lstm"], default="lstm")
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
torch.set_num_threads(2)

torch.manual_seed(0)
data = ulr.data.load("sequential-digits", seed=0)  # x: [N, 8 steps, 8 features]
model = ulr.models.build(args.kind, in_shape=data.input_shape, num_classes=10, hidden_size=64)
# Default sites: every module that owns parameters = the cell's Linear (one site event per
# step) and the read-out head.
est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.05), num_copies=16,
                          sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                          plan=ulr.plans.layerwise())
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
order = torch.Generator().manual_seed(0)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


for epoch in range(args.epochs):
    for i, (xb, yb) in enumerate(ulr.data.batches(*data.train, 64, shuffle=True,
                                                  generator=order)):
        opt.zero_grad()
        est.loss_and_grads(ce, xb, yb)
        opt.step()
        if args.smoke and i == 1:
            break
    with torch.no_grad():
        acc = (model(data.test[0]).argmax(1) == data.test[1]).float().mean().item()
    print(f"epoch {epoch + 1:3d}  test accuracy {acc:.3f}")
    if args.smoke:
        break
