"""Pure tensor math of the likelihood-ratio estimator (no state, no hooks).

Notation: ``N = K·B`` rows (``K`` noise copies of ``B`` examples, copy-major), a site's output
``v`` of shape ``[N, *site]``, its noise ``z`` of the same shape, per-row weights ``w`` of shape
``[N]`` (losses after the baseline). The **LR signal** of the site is

.. math::  g_n = \\frac{1}{N} \\, w_n \\, \\bigl(-\\nabla_z \\ln f(z_n)\\bigr)

and the gradient of a parameter ``θ`` of the site's module is the local vector-Jacobian product
``J_θ(v)^T g``. For ``nn.Linear`` and ``nn.Conv{1,2,3}d`` it has a closed form that needs no
autograd graph (functions below); any other module uses autograd inside its own segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "lr_signal",
    "linear_weight_grad",
    "conv_weight_grad",
    "bias_grad",
    "module_grads",
    "has_closed_form",
    "per_example_weight_output",
]

_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FORWARDS = tuple(t.forward for t in _CONV_TYPES)
_CONV_BLOCK_BYTES = 32 * 2**20


def lr_signal(weights: Tensor, score: Tensor, num_rows: int | None = None) -> Tensor:
    """``g = w · score / N``: ``weights [N]``, ``score [N, *site]`` -> ``[N, *site]`` (fp32+)."""
    n = score.shape[0] if num_rows is None else num_rows
    dtype = torch.promote_types(score.dtype, weights.dtype)
    w = weights.reshape(weights.shape[0], *([1] * (score.dim() - 1))).to(dtype)
    return score.to(dtype) * (w / n)


def linear_weight_grad(inputs: Tensor, signal: Tensor) -> Tensor:
    """``∇W = Σ_n g_n x_n^T`` for ``v = x W^T + b``.

    Shapes: ``inputs [N, ..., in]``, ``signal [N, ..., out]`` -> ``[out, in]``.
    """
    return signal.reshape(-1, signal.shape[-1]).T @ inputs.reshape(-1, inputs.shape[-1])


def bias_grad(signal: Tensor, channel_dim: int) -> Tensor:
    """``∇b``: the signal summed over every dimension but ``channel_dim``."""
    dims = [d for d in range(signal.dim()) if d != channel_dim % signal.dim()]
    return signal.sum(dim=dims)


def conv_weight_grad(inputs: Tensor, signal: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """``∇W`` of a ``Conv{1,2,3}d`` module: correlation of its input with the signal maps.

    Handles any stride, dilation, groups, numeric or ``"same"``/``"valid"`` padding and every
    ``padding_mode`` (the input is padded exactly as the module's forward pads it).

    The rows are processed in blocks of about ``_CONV_BLOCK_BYTES``: the backend converts its
    operands to its own layout, and on all rows at once that workspace is as large as two more
    activations (measured with oneDNN on CPU), which would dominate ULR's memory.
    """
    nd = len(conv.kernel_size)
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        pad = _explicit_padding(conv)
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        inputs = F.pad(inputs, pad, mode=mode)
        padding = (0,) * nd
    row_bytes = (inputs[0].numel() + signal[0].numel()) * inputs.element_size()
    step = max(1, _CONV_BLOCK_BYTES // max(row_bytes, 1))
    grad = None
    for start in range(0, inputs.shape[0], step):
        part = _CONV_WEIGHT[nd](inputs[start:start + step], conv.weight.shape,
                                signal[start:start + step], stride=conv.stride, padding=padding,
                                dilation=conv.dilation, groups=conv.groups)
        grad = part if grad is None else grad.add_(part)
    return grad


def _explicit_padding(conv: nn.modules.conv._ConvNd) -> list[int]:
    """Padding of the module as ``F.pad`` wants it (last dimension first, left then right)."""
    if conv.padding == "valid":
        return [0, 0] * len(conv.kernel_size)
    if conv.padding == "same":
        pad: list[int] = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size), strict=True):
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
        return pad
    return [p for p in reversed(conv.padding) for _ in range(2)]


def has_closed_form(module: nn.Module) -> bool:
    """True for plain ``nn.Linear`` / ``nn.Conv{1,2,3}d`` (unmodified ``forward``, no
    parametrizations), whose parameter gradients :func:`module_grads` computes directly."""
    if nn.utils.parametrize.is_parametrized(module):
        return False
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, _CONV_TYPES):
        return type(module).forward in _CONV_FORWARDS
    return False


def module_grads(module: nn.Module, inputs: Tensor, signal: Tensor) -> dict[str, Tensor]:
    """Closed-form ``{"weight": ∇W, "bias": ∇b}`` of a Linear/Conv module from its input and
    the LR signal at its output (only for parameters that require grad), in fp32 or wider."""
    if inputs.dtype != signal.dtype:
        dtype = torch.promote_types(inputs.dtype, signal.dtype)
        inputs, signal = inputs.to(dtype), signal.to(dtype)
    grads: dict[str, Tensor] = {}
    is_linear = isinstance(module, nn.Linear)
    if module.weight.requires_grad:
        grads["weight"] = (linear_weight_grad(inputs, signal) if is_linear
                           else conv_weight_grad(inputs, signal, module))
    if module.bias is not None and module.bias.requires_grad:
        grads["bias"] = bias_grad(signal, -1 if is_linear else 1)
    return grads


def per_example_weight_output(module: nn.Module, inputs: Tensor, weight_noise: Tensor,
                              bias_noise: Tensor | None) -> Tensor:
    """The output change ``E_n x_n + e_n`` of a Linear/Conv layer whose weights get a different
    perturbation ``E_n`` for every row ``n``.

    Shapes: ``inputs [R, ...]`` as the layer takes them, ``weight_noise [R, *W.shape]``,
    ``bias_noise [R, out]`` or None -> the layer's output shape. Linear uses a batched product;
    Conv one grouped convolution with ``R·groups`` groups (each row convolved with its own
    kernel), padded exactly as the module pads.
    """
    rows = inputs.shape[0]
    weight_noise = weight_noise.to(inputs.dtype)
    if isinstance(module, nn.Linear):
        out = torch.einsum("r...i,roi->r...o", inputs, weight_noise)
        if bias_noise is not None:
            shape = (rows, *([1] * (out.dim() - 2)), out.shape[-1])
            out = out + bias_noise.to(out.dtype).view(shape)
        return out
    nd = len(module.kernel_size)
    padding = module.padding
    if module.padding_mode != "zeros":
        inputs = F.pad(inputs, _explicit_padding(module), mode=module.padding_mode)
        padding = (0,) * nd
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    grouped = inputs.reshape(1, rows * inputs.shape[1], *inputs.shape[2:])
    kernels = weight_noise.reshape(rows * weight_noise.shape[1], *weight_noise.shape[2:])
    out = conv(grouped, kernels, None, module.stride, padding, module.dilation,
               module.groups * rows)
    out = out.view(rows, -1, *out.shape[2:])
    if bias_noise is not None:
        out = out + bias_noise.to(out.dtype).view(rows, -1, *([1] * nd))
    return out
