"""What backprop cannot train: binary weights, sign units, the 0-1 loss, a numpy black box.

``--model binary-mlp``: hidden weights are sign(W) in the forward pass and hidden units output
+-1; trained by ULR directly on the 0-1 loss (``--loss zero-one``) or on cross-entropy.
``--model blackbox-mlp``: the hidden nonlinearity is a 4-bit tanh lookup table computed in
numpy (torch -> numpy -> torch, no autograd).

    python examples/binary.py                              # binary net, 0-1 loss, ~1 min
    python examples/binary.py --model blackbox-mlp --loss ce
    python examples/binary.py --smoke
"""

import argparse

import torch
import torch.nn.functional as F

import ulr
from ulr.models.binary import zero_one_loss

parser = argparse.ArgumentParser()
parser.add_argument("--model", choices=["binary-mlp", "blackbox-mlp"], default="binary-mlp")
parser.add_argument("--loss", choices=["zero-one", "ce"], default="zero-one")
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
torch.set_num_threads(2)

torch.manual_seed(0)
data = ulr.data.load("digits", seed=0)
model = ulr.models.build(args.model, in_shape=data.input_shape, num_classes=10)
# The 0-1 loss changes only when a unit or the argmax flips: wider noise than for smooth nets,
# and widest at the logits, so that rows misclassified by a wide margin still flip sometimes.
if args.loss == "zero-one":
    noise = {"out": ulr.Gaussian(2.0), "*": ulr.Gaussian(0.5)}
else:
    noise = ulr.Gaussian(0.3 if args.model == "binary-mlp" else 0.1)
est = ulr.LikelihoodRatio(model, noise=noise, num_copies=32,
                          sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                          plan=ulr.plans.layerwise())
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
order = torch.Generator().manual_seed(0)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


loss = zero_one_loss if args.loss == "zero-one" else ce
for epoch in range(args.epochs):
    for i, (xb, yb) in enumerate(ulr.data.batches(*data.train, 64, shuffle=True,
                                                  generator=order)):
        opt.zero_grad()
        est.loss_and_grads(loss, xb, yb)
        opt.step()
        if hasattr(model, "clip_"):
            model.clip_()  # BinaryConnect keeps the latent weights in [-1, 1]
        if args.smoke and i == 1:
            break
    with torch.no_grad():
        acc = (model(data.test[0]).argmax(1) == data.test[1]).float().mean().item()
    print(f"epoch {epoch + 1:3d}  test accuracy {acc:.3f}")
    if args.smoke:
        break
