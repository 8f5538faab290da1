"""ULR in a Hugging Face ``accelerate`` loop.

``Accelerator.prepare`` places the model, optimizer and data loader as usual; where the loop would
call ``accelerator.backward(loss)``, ``est.loss_and_grads(...)`` writes the gradients instead.
This is a one-process loop (CPU or one GPU, mixed precision as accelerate sets it up). Over
several processes use :class:`ulr.distributed.DistributedLikelihoodRatio` on the unwrapped model
(it splits the noise copies over the ranks and all-reduces the gradients itself, which DDP's
backward hooks would otherwise do; see docs/distributed.md), or ``ulr train --nproc N``.

    pip install accelerate                    # or: pip install 'ulr[integrations]'
    python examples/accelerate_train.py        # digits MLP, 20 epochs, ~97% test accuracy
    python examples/accelerate_train.py --smoke
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ulr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="a few steps only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    data = ulr.data.load("digits", seed=0)
    loader = DataLoader(TensorDataset(*data.train), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model, opt, loader = accelerator.prepare(model, opt, loader)

    # The estimator hooks the bare module (prepare may wrap it); noise on the model's device.
    net = accelerator.unwrap_model(model)
    est = ulr.LikelihoodRatio(net, num_copies=32,
                              generator=torch.Generator(accelerator.device).manual_seed(0))

    def row_loss(logits, y):  # one loss per row; never differentiated
        return F.cross_entropy(logits.float(), y, reduction="none")

    x_test, y_test = (t.to(accelerator.device) for t in data.test)
    for epoch in range(1 if args.smoke else args.epochs):
        for step, (xb, yb) in enumerate(loader):
            opt.zero_grad()
            loss = est.loss_and_grads(row_loss, xb, yb)  # instead of accelerator.backward(loss)
            opt.step()
            if args.smoke and step == 2:
                break
        with torch.no_grad():
            acc = (net(x_test).argmax(1) == y_test).float().mean().item()
        accelerator.print(f"epoch {epoch + 1:2d}  noisy loss {loss.item():.3f}  "
                          f"test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
