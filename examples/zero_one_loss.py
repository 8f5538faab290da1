"""What backprop cannot train: hard-threshold (sign) neurons optimised directly on the 0-1 loss.

The network's hidden units output ±1 and the loss is the classification error itself, so
autograd gives zero (or no) gradient. The likelihood-ratio estimate needs neither: it only
looks at the losses of noisy forward passes.

    python examples/zero_one_loss.py          # ~10 s, sign MLP on digits, 0-1 loss
    python examples/zero_one_loss.py --smoke
"""

import argparse

import torch
from torch import nn

import ulr


class Sign(nn.Module):
    def forward(self, x):
        return torch.where(x >= 0, 1.0, -1.0)


parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=40)
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()

torch.manual_seed(0)
data = ulr.data.load("digits", seed=0)
(x_train, y_train), (x_test, y_test) = data.train, data.test
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), Sign(), nn.Linear(256, 10))


def zero_one(logits, y):  # the error indicator per row: not differentiable anywhere
    return (logits.argmax(1) != y).float()


# Wider noise than for smooth nets: the loss only changes when a unit or the argmax flips.
# Widest at the logits (module "3"), so that badly misclassified rows still flip sometimes.
noise = {"3": ulr.Gaussian(2.0), "*": ulr.Gaussian(0.5)}
est = ulr.LikelihoodRatio(model, noise=noise, num_copies=64,
                          sampler=ulr.antithetic(), plan=ulr.plans.layerwise())
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
order = torch.Generator().manual_seed(0)
for epoch in range(args.epochs):
    for i, (xb, yb) in enumerate(ulr.data.batches(x_train, y_train, 64, shuffle=True,
                                                  generator=order)):
        opt.zero_grad()
        est.loss_and_grads(zero_one, xb, yb)
        opt.step()
        if args.smoke and i == 1:
            break
    if args.smoke:
        break
    if (epoch + 1) % 5 == 0:
        with torch.no_grad():
            err = zero_one(model(x_test), y_test).mean().item()
        print(f"epoch {epoch + 1:3d}  test accuracy {1 - err:.3f}")
