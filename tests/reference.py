"""A naive, loop-based likelihood-ratio estimator used only as a test oracle.

It shares nothing with ``ulr``'s estimator but the noise draws: one row (copy k of example b)
at a time, no hooks, the loss per row by a plain forward with noise added by hand, and every
layer's local vector-Jacobian product by ``torch.autograd`` on that layer alone.

Supported models: ``nn.Sequential`` whose site layers are the children that own parameters.
"""

from __future__ import annotations

import torch
from torch import nn


def _site_layers(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if any(True for _ in m.parameters())]


def _clean_inputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Input of every layer on the clean batch (only to learn the site shapes)."""
    ins = []
    with torch.no_grad():
        for m in model:
            ins.append(x)
            x = m(x)
    return ins


def reference_grads(
    model: nn.Sequential,
    loss_fn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    noise,
    sampler,
    num_copies: int,
    generator: torch.Generator,
    baseline: str = "none",
    layerwise: bool = False,
) -> dict[str, torch.Tensor]:
    """Return {param name: gradient estimate}.

    ``baseline`` is one of "none", "leave_one_out", "clean".
    """
    batch = x.shape[0]
    sites = _site_layers(model)
    ins = _clean_inputs(model, x)
    shapes = {i: model[i](ins[i]).shape[1:] for i in sites}
    passes = [[s] for s in sites] if layerwise else [sites]
    groups = sampler.copy_groups(num_copies).tolist()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}

    clean = None
    if baseline == "clean":
        with torch.no_grad():
            clean = [float(loss_fn(model(x[b : b + 1]), y[b : b + 1])[0]) for b in range(batch)]

    for perturbed in passes:
        noise_of = {}
        for s in sites:  # draws in firing order, as the estimator does
            if s in perturbed:
                z = sampler.sample(noise, num_copies, torch.Size((batch, *shapes[s])),
                                   generator=generator, device=generator.device)
                noise_of[s] = z  # [K, B, *site]
        losses = torch.zeros(num_copies, batch)
        layer_inputs = {}
        with torch.no_grad():
            for k in range(num_copies):
                for b in range(batch):
                    h = x[b : b + 1]
                    for i, m in enumerate(model):
                        layer_inputs[(k, b, i)] = h
                        h = m(h)
                        if i in noise_of:
                            h = h + noise_of[i][k, b].unsqueeze(0)
                    losses[k, b] = loss_fn(h, y[b : b + 1])[0]
        weights = losses.clone()
        for k in range(num_copies):
            for b in range(batch):
                if baseline == "leave_one_out":
                    others = [losses[j, b] for j in range(num_copies) if groups[j] != groups[k]]
                    weights[k, b] = losses[k, b] - sum(others) / len(others)
                elif baseline == "clean":
                    weights[k, b] = losses[k, b] - clean[b]
        rows = num_copies * batch
        for s in perturbed:
            layer = model[s]
            params = list(layer.parameters())
            for k in range(num_copies):
                for b in range(batch):
                    z = noise_of[s][k, b].unsqueeze(0)
                    signal = weights[k, b] * noise.score(z) / rows
                    out = layer(layer_inputs[(k, b, s)])
                    for p, g in zip(params, torch.autograd.grad(out, params, signal)):
                        grads[names[id(p)]] += g
    return grads
