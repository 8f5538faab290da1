"""Domain adaptation (DANN) rearranged by ULR: the gradient reversal acts on the LR signal.

Source domain: the MNIST subset (labelled), shrunk to 8x8 and scaled to a maximum of 1.
Target domain: scikit-learn's 8x8 digits (labels used only to measure accuracy). A feature
extractor F feeds a label classifier C and a domain classifier D (Ganin & Lempitsky 2015):

* C minimises the label loss L_y on source rows, D minimises the domain loss L_d on all rows;
* F minimises L_y - λ L_d: it learns features that classify digits and hide the domain.

Backprop does this with a gradient-reversal layer between F and D. Here no backward pass
crosses the boundary: one noise site sits at F's output, and F's parameters get the local VJP
(backprop inside F only) of the LR signal ``g = score(z) · (L_y - λ L_d)`` — the reversal is
applied to the per-row loss weights of that site. C and D get ordinary LR gradients from their
own sites with the weights ``L_y + L_d``: in the layer-wise passes that perturb C, L_d does not
depend on C's noise, so the leave-one-out baseline removes it exactly (and L_y in D's passes).
Two estimators on the one model carry the two weightings.

    python examples/domain_adaptation.py                  # ULR, with and without adaptation
    python examples/domain_adaptation.py --method bp      # the same with backprop + GRL
    python examples/domain_adaptation.py --smoke
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import ulr
from ulr.data import load


def domains(seed: int = 0):
    """((x_s, y_s) source train, x_t target train, (x_t, y_t) target test), all [N, 1, 8, 8]."""

    def shrink(x):
        x = F.adaptive_avg_pool2d(x, 8)
        return x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)

    mnist, digits = load("mnist-subset", seed=seed), load("digits", seed=seed)
    source = (shrink(mnist.train[0]), mnist.train[1])
    return source, digits.train[0], digits.test


class DANN(nn.Module):
    """F: 64-128-64 ReLU MLP; C: linear to 10 classes; D: 64-64-1 (domain logit)."""

    def __init__(self, hidden: int = 128, features: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(),
                                      nn.Linear(hidden, features), nn.ReLU())
        self.classifier = nn.Linear(features, 10)
        self.domain = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        f = self.features(x)
        return self.classifier(f), self.domain(f).squeeze(1)


def row_losses(outputs, targets):
    """Per-row (L_y, L_d): L_y is 2·CE on source rows (y >= 0), 0 on target rows, so that its
    batch mean is the mean CE over the source half; L_d is the domain BCE."""
    logits, dom_logit = outputs
    y, domain = targets
    ly = F.cross_entropy(logits, y.clamp_min(0), reduction="none") * (y >= 0) * 2.0
    ld = F.binary_cross_entropy_with_logits(dom_logit, domain, reduction="none")
    return ly, ld


class _Reverse(torch.autograd.Function):
    """Backprop's gradient-reversal layer (only for --method bp)."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


def train(method: str = "ulr", adapt: bool = True, *, epochs: int = 15, batch: int = 32,
          lam_max: float = 0.1, num_copies: int = 32, sigma: float = 0.1,
          feature_sites: str = "boundary", seed: int = 0, max_steps: int | None = None,
          data=None) -> dict:
    """Train F, C, D; return the target test accuracy and the source train accuracy.

    ``feature_sites``: ``"boundary"`` (one site at F's output, backprop inside F: the reversal
    acts on that one LR signal) or ``"layers"`` (a site after each of F's Linear layers: pure
    ULR). λ ramps from 0 to ``lam_max`` as in DANN: ``λ_p = lam_max (2 / (1 + e^{-10 p}) - 1)``.
    """
    (xs, ys), xt, (xt_test, yt_test) = data if data is not None else domains(seed)
    torch.manual_seed(seed)
    model = DANN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if method == "bp" else 3e-3)
    lam_now = 0.0
    if method == "ulr":
        f_sites = (["features"] if feature_sites == "boundary" else
                   [n for n in ulr.hybrid.layers(model) if n.startswith("features.")])
        head_sites = [n for n in ulr.hybrid.layers(model) if not n.startswith("features")]
        common = dict(noise=ulr.Gaussian(sigma), num_copies=num_copies,
                      baseline=ulr.baselines.leave_one_out(), plan=ulr.plans.layerwise())
        gen = torch.Generator().manual_seed(seed)
        est_f = ulr.LikelihoodRatio(model, sites=f_sites, exclude=["classifier.*", "domain.*"],
                                    generator=gen, **common)
        est_heads = ulr.LikelihoodRatio(model, sites=head_sites, exclude=["features.*"],
                                        generator=gen, **common)

        def f_loss(out, t):  # the reversal, on the LR signal of F's site(s)
            ly, ld = row_losses(out, t)
            return ly - lam_now * ld

        def head_loss(out, t):
            ly, ld = row_losses(out, t)
            return ly + ld

    gen_data = torch.Generator().manual_seed(seed)
    steps = len(xs) // batch
    total = epochs * steps if max_steps is None else min(max_steps, epochs * steps)
    step = 0
    domain = torch.cat([torch.zeros(batch), torch.ones(batch)])
    while step < total:
        order = torch.randperm(len(xs), generator=gen_data)
        for i in range(steps):
            if step >= total:
                break
            p = step / total
            lam_now = lam_max * (2 / (1 + math.exp(-10 * p)) - 1) if adapt else 0.0
            idx = order[i * batch:(i + 1) * batch]
            tidx = torch.randint(0, len(xt), (batch,), generator=gen_data)
            x = torch.cat([xs[idx], xt[tidx]])
            y = torch.cat([ys[idx], torch.full((batch,), -1)])
            opt.zero_grad(set_to_none=True)
            if method == "ulr":
                est_f.loss_and_grads(f_loss, x, (y, domain))
                est_heads.loss_and_grads(head_loss, x, (y, domain))
            else:
                f = model.features(x)
                ly = F.cross_entropy(model.classifier(f[:batch]), ys[idx])
                dom = model.domain(_Reverse.apply(f, lam_now)).squeeze(1)
                ld = F.binary_cross_entropy_with_logits(dom, domain)
                (ly + ld).backward()
            opt.step()
            step += 1
    with torch.no_grad():
        target_acc = (model(xt_test)[0].argmax(1) == yt_test).float().mean().item()
        source_acc = (model(xs)[0].argmax(1) == ys).float().mean().item()
    return {"method": method, "adapt": adapt, "target_acc": target_acc,
            "source_train_acc": source_acc, "steps": step}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["ulr", "bp"], default="ulr")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = domains()
    for adapt in (False, True):
        r = train(args.method, adapt, epochs=args.epochs, lam_max=args.lam, data=data,
                  max_steps=3 if args.smoke else None, num_copies=4 if args.smoke else 32)
        print(f"{args.method} {'DANN       ' if adapt else 'source only'}: target (digits) "
              f"accuracy {r['target_acc']:.1%}, source train accuracy "
              f"{r['source_train_acc']:.1%}")


if __name__ == "__main__":
    main()
