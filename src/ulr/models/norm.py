r"""BatchNorm that keeps the noise copies apart, and a ResNet-5 built with it.

A plain ``nn.BatchNorm2d`` in training mode computes its statistics over all ``K·B`` rows of a
perturbed pass, so each copy's normalisation depends on the noise of every other copy: the
copies are no longer independent samples of the noisy network, and the estimate is biased
(``ulr`` warns). :class:`CopyBatchNorm` uses :func:`ulr.copy_layout` to compute the statistics
**per copy** (rows ``k·B:(k+1)·B``): copy ``k`` is then exactly the training-mode network applied
to the batch with noise ``z_k``, as backprop would see it. Outside a perturbed pass (or when the
layout does not match) it is an ordinary BatchNorm.

One point remains: inside one copy the batch statistics still couple the ``B`` examples, so the
noise of example ``b`` changes the loss of example ``b'``. The estimate with per-example losses
(the default ``loss_fn``) then misses those cross terms: it is the gradient with the statistics
held fixed. :func:`whole_batch` makes each row's weight the loss of its whole copy of the batch,
which makes the estimate unbiased for the training-mode gradient at the price of more variance
(the noise dimension per "example" becomes ``B`` times larger). ``docs/architectures.md``
gives the measured trade-off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sites import copy_layout
from ._common import Activation, ULRConfig, check_input_size, check_positive, make_activation

__all__ = ["CopyBatchNorm", "ResNet5BN", "whole_batch"]


class CopyBatchNorm(nn.Module):
    """BatchNorm over dim 1 (inputs ``[N, C]`` or ``[N, C, *]``) with per-copy statistics in
    a perturbed pass.

    Same parameters and buffers as ``nn.BatchNorm{1,2,3}d`` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so state dicts are
    interchangeable. In training mode inside a ``K``-copy pass of ``B`` examples it normalises
    each block of rows ``k·B:(k+1)·B`` with that block's own mean and variance, and updates the
    running statistics with their average over the copies. A layerwise plan runs several passes
    per step, each of which updates the running statistics (the average then follows the
    training batches more closely than the nominal ``momentum`` suggests; the values stay
    batch statistics of the same batch).

    It is deliberately not an ``nn.modules.batchnorm._BatchNorm`` subclass: the estimator warns
    about those in training mode, and this one is safe.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True) -> None:
        super().__init__()
        check_positive(num_features=num_features)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        #: Hold the batch statistics fixed in the backward pass (detach mean and variance): the
        #: gradient that ULR's per-example estimate targets; an oracle for it.
        self.detach_statistics = False

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected [N, {self.num_features}, ...] input, got "
                             f"{tuple(x.shape)}")
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        layout = copy_layout()
        copies = 1
        if layout is not None and layout[0] > 1 and x.shape[0] == layout[0] * layout[1]:
            copies = layout[0]
        n = x.shape[0] // copies
        grouped = x.reshape(copies, n, *x.shape[1:])
        dims = [1, *range(3, grouped.dim())]
        mean = grouped.mean(dim=dims, keepdim=True)
        var = grouped.var(dim=dims, unbiased=False, keepdim=True)
        if self.detach_statistics:
            mean, var = mean.detach(), var.detach()
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        with torch.no_grad():
            count = grouped.numel() // (copies * self.num_features)
            batch_mean = mean.reshape(copies, -1).mean(0)
            batch_var = var.reshape(copies, -1).mean(0) * count / max(count - 1, 1)
            self.running_mean.lerp_(batch_mean, self.momentum)
            self.running_var.lerp_(batch_var, self.momentum)
            self.num_batches_tracked += 1
        if self.weight is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def whole_batch(row_loss: Callable[[Tensor, Tensor], Tensor], batch_size: int
                ) -> Callable[[Tensor, Tensor], Tensor]:
    r"""Per-row weights for a model whose examples interact inside a batch (BatchNorm).

    Wraps ``row_loss(out, y) -> [K·B]`` so that every row of copy ``k`` gets
    :math:`\sum_{b'} L_{kb'}`, the summed loss of its copy of the batch. The estimator's average
    over the ``K·B`` rows then gives the gradient of the mean loss with the batch (not the
    example) as the unit that the noise acts on: unbiased when examples interact. Build it per
    step with the step's ``batch_size = len(xb)``.
    """
    check_positive(batch_size=batch_size)

    def loss(out: Tensor, y: Tensor) -> Tensor:
        losses = row_loss(out, y)
        per_copy = losses.view(-1, batch_size).sum(dim=1, keepdim=True)
        return per_copy.expand(-1, batch_size).reshape(-1)

    return loss


class ResNet5BN(nn.Module):
    """:class:`ulr.models.ResNet5` with a :class:`CopyBatchNorm` after every convolution.

    conv3x3 ``in -> 8``, BN, act; conv ``8 -> 16``, BN, act, maxpool2; conv ``16 -> 32``, BN,
    act (= ``h``); conv ``32 -> 32``, BN, add ``h``, act; maxpool4; linear. Convolutions have no
    bias (BN's shift replaces it). Shapes ``(B, C, S, S) -> (B, num_classes)``, ``S >= 8``.

    Sites (param owners): ``conv1``..``conv4``, ``bn1``..``bn4``, ``fc``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 activation: Activation = "relu") -> None:
        super().__init__()
        check_positive(in_channels=in_channels, num_classes=num_classes)
        check_input_size("ResNet5BN", input_size, 8)
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size
        side = input_size // 2 // 4
        chans = [(in_channels, 8), (8, 16), (16, 32), (32, 32)]
        for i, (a, b) in enumerate(chans, 1):
            setattr(self, f"conv{i}", nn.Conv2d(a, b, 3, padding=1, bias=False))
            setattr(self, f"bn{i}", CopyBatchNorm(b))
            setattr(self, f"act{i}", make_activation(activation))
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32 * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.pool1(self.act2(self.bn2(self.conv2(x))))
        h = self.act3(self.bn3(self.conv3(x)))
        x = self.act4(self.bn4(self.conv4(h)) + h)
        return self.fc(self.flatten(self.pool2(x)))

    def ulr_config(self) -> ULRConfig:
        """``sigma`` 0.1 everywhere; ``num_copies`` as ResNet-5's reference for the convs and
        their BNs (conv 100/200/200/100, fc 50)."""
        copies = {"conv1": 100, "conv2": 200, "conv3": 200, "conv4": 100}
        owners = {**copies, **{f"bn{i}": copies[f"conv{i}"] for i in range(1, 5)}, "fc": 50}
        return {"sigma": dict.fromkeys(owners, 0.1), "num_copies": owners}
