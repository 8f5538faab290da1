"""Natural corruptions at severities 1-5 (Gaussian and impulse noise, blur, contrast), drawn
deterministically from a seed; the parameters are :data:`~.conditions.SEVERITIES`."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .conditions import CORRUPTIONS, SEVERITIES, check_range, choose, clip


def _corruption_generator(name: str, seed: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, CORRUPTIONS.index(name) + 1]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _gaussian_kernel(sigma: float) -> Tensor:
    half = max(1, math.ceil(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur_last(x: Tensor, kernel: Tensor) -> Tensor:
    """Convolve along the last dimension with replicate padding."""
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    half = (kernel.numel() - 1) // 2
    flat = F.pad(flat, (half, half), mode="replicate")
    out = F.conv1d(flat, kernel.to(x.dtype).view(1, 1, -1).to(x.device))
    return out.reshape(shape)


def corrupt(x: Tensor, name: str, severity: int, *, seed: int = 0,
            value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """A corrupted copy of ``x`` (``[B, ...]``); ``x`` itself is not changed.

    Args:
        x: inputs within ``value_range``: images ``[B, C, H, W]`` (or ``[B, C, L]`` signals for
            ``blur``).
        name: one of :data:`CORRUPTIONS`.
        severity: 1 (mild) to 5 (strong); the parameters are :data:`SEVERITIES`.
        seed: seed of the random corruptions; the draws depend on ``seed`` and ``name`` only
            (not on ``severity``, and they are made on the CPU), so the result is deterministic
            and the distortion of every example grows with the severity.
        value_range: ``(lo, hi)`` of valid inputs; results are clipped to it.

    Example:
        >>> import torch
        >>> x = torch.full((2, 1, 8, 8), 0.5)
        >>> torch.equal(corrupt(x, "gaussian-noise", 3, seed=1),
        ...             corrupt(x, "gaussian-noise", 3, seed=1))
        True
    """
    (name,) = choose([name], CORRUPTIONS, "corruption", "--corruptions")
    if isinstance(severity, bool) or severity not in range(1, 6):
        raise ValueError(f"severity must be an int from 1 to 5, got {severity!r}")
    check_range(value_range)
    lo, hi = value_range
    level = SEVERITIES[name][severity - 1]
    span = hi - lo
    if name == "gaussian-noise":
        z = torch.randn(x.shape, generator=_corruption_generator(name, seed))
        return clip(x + (level * span) * z.to(x.device, x.dtype), value_range)
    if name == "impulse-noise":
        gen = _corruption_generator(name, seed)
        u = torch.rand(x.shape, generator=gen).to(x.device)
        salt = torch.rand(x.shape, generator=gen).to(x.device) < 0.5
        hit = u < level
        out = x.clone()
        out[hit & salt] = hi
        out[hit & ~salt] = lo
        return out
    if name == "blur":
        if x.dim() not in (3, 4):
            raise ValueError(f"blur needs images [B, C, H, W] or signals [B, C, L], got inputs "
                             f"of shape {tuple(x.shape)}")
        kernel = _gaussian_kernel(level)
        out = _blur_last(x, kernel)
        if x.dim() == 4:
            out = _blur_last(out.transpose(-1, -2), kernel).transpose(-1, -2)
        return clip(out.contiguous(), value_range)
    mean = x.flatten(1).mean(1).view(-1, *([1] * (x.dim() - 1)))
    return clip(mean + level * (x - mean), value_range)

