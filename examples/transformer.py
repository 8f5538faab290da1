"""A small Transformer encoder trained by ULR: the 8 rows of a digit are 8 tokens.

Every projection (q, k, v, out, the MLP, the embedding, the head) is an ``nn.Linear`` site
with a closed-form gradient; the LayerNorms and the position table get the autograd VJP of
their own module only. One perturbed pass per group of sites (a layer-wise plan).

    python examples/transformer.py            # ~5 min on 2 cores
    python examples/transformer.py --smoke
"""

import argparse

import torch
import torch.nn.functional as F

import ulr

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=15)
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
torch.set_num_threads(2)

torch.manual_seed(0)
data = ulr.data.load("sequential-digits", seed=0)
model = ulr.models.build("transformer", in_shape=data.input_shape, num_classes=10, d_model=32)
groups = [["embed", "embed.proj"], ["blocks.*.norm1", "blocks.*.attn.*"],
          ["blocks.*.norm2", "blocks.*.fc1", "blocks.*.fc2"], ["norm", "head"]]
est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.05), num_copies=16,
                          sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                          plan=ulr.plans.layerwise(groups))
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
