"""ResNet-5 with BatchNorm trained by ULR: CopyBatchNorm keeps the noise copies apart.

A plain BatchNorm in training mode would normalise all K copies of the batch together (the
estimator warns). ``CopyBatchNorm`` reads the copy layout from ``ulr.copy_layout()`` and uses
each copy's own batch statistics, so each copy is exactly the training-mode network. With
``--whole-batch`` every row is weighted by the loss of its whole copy of the batch (unbiased
for the training-mode gradient, noisier); by default rows keep their own loss (the gradient
with the batch statistics held fixed; lower variance). docs/architectures.md compares them.

    python examples/batchnorm.py              # ~3 min on 2 cores
    python examples/batchnorm.py --smoke
"""

import argparse

import torch
import torch.nn.functional as F

import ulr
from ulr.models.norm import whole_batch

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--whole-batch", action="store_true")
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
torch.set_num_threads(2)

torch.manual_seed(0)
data = ulr.data.load("digits", seed=0)
model = ulr.models.build("resnet5-bn", in_shape=data.input_shape, num_classes=10)
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
        est.loss_and_grads(whole_batch(ce, len(xb)) if args.whole_batch else ce, xb, yb)
        opt.step()
        if args.smoke and i == 1:
            break
    model.eval()  # running statistics for evaluation
    with torch.no_grad():
        acc = (model(data.test[0]).argmax(1) == data.test[1]).float().mean().item()
    model.train()
    print(f"epoch {epoch + 1:3d}  test accuracy {acc:.3f}")
    if args.smoke:
        break
