"""Hybrid BP/LR training: backprop inside blocks, the likelihood-ratio signal between them.

LeNet-5 on scikit-learn's digits, split into two blocks of layers (conv1, conv2, fc1 | fc2,
fc3). Noise goes only at each block's end; each block's parameters get backprop of the LR
signal at its end, and no backward pass crosses a block boundary, so the blocks could update
independently once the loss is known. ``ulr train --model lenet5 --blocks 2`` does the same.

    python examples/hybrid.py            # ~1 min on one CPU thread
    python examples/hybrid.py --smoke
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import ulr
from ulr.data import batches, load
from ulr.models import LeNet5


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = load("digits", seed=0)
    model = LeNet5(input_size=8)
    print("layers:", ulr.hybrid.layers(model))
    print("block ends:", ulr.hybrid.block_ends(model, args.blocks))
    est = ulr.LikelihoodRatio(model, sites=ulr.hybrid.blocks(model, args.blocks),
                              noise=ulr.Gaussian(0.05), num_copies=4 if args.smoke else 32,
                              sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                              plan=ulr.plans.layerwise())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    steps = 0
    for epoch in range(1 if args.smoke else args.epochs):
        for xb, yb in batches(*ds.train, 32, shuffle=True, generator=gen):
            opt.zero_grad()
            est.loss_and_grads(lambda out, y: F.cross_entropy(out, y, reduction="none"), xb, yb)
            opt.step()
            steps += 1
            if args.smoke and steps == 3:
                break
        with torch.no_grad():
            acc = (model(ds.test[0]).argmax(1) == ds.test[1]).float().mean()
        print(f"epoch {epoch + 1}: test accuracy {acc:.1%}")


if __name__ == "__main__":
    main()
