"""A spiking net with a true Heaviside spike, trained by ULR with no surrogate gradient.

Leaky integrate-and-fire neurons; the digits are latency-coded (bright pixels spike early).
Noise goes on the synaptic input currents (the Linear outputs); the spike is never
differentiated. ``--reference`` trains the same net by surrogate-gradient backprop instead.

    python examples/snn.py                # ~3 min on 2 cores
    python examples/snn.py --reference    # fast-sigmoid surrogate, BPTT
    python examples/snn.py --smoke
"""

import argparse

import torch
import torch.nn.functional as F

import ulr

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--reference", action="store_true")
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
torch.set_num_threads(2)

torch.manual_seed(0)
data = ulr.data.load("digits", seed=0)
model = ulr.models.build("snn", in_shape=data.input_shape, num_classes=10, hidden=(128,),
                         num_steps=16, surrogate="fast-sigmoid" if args.reference else None)
est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.1), num_copies=16,
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
        if args.reference:
            ce(model(xb), yb).mean().backward()
        else:
            est.loss_and_grads(ce, xb, yb)
        opt.step()
        if args.smoke and i == 1:
            break
    with torch.no_grad():
        acc = (model(data.test[0]).argmax(1) == data.test[1]).float().mean().item()
    print(f"epoch {epoch + 1:3d}  test accuracy {acc:.3f}")
    if args.smoke:
        break
