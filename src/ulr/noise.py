"""Noise densities for likelihood-ratio sites.

A noise object knows three things about its density ``f``: how to draw from it
(:meth:`Noise.sample`), its **score** ``-∇_z ln f(z)`` (:meth:`Noise.score`), which turns a
per-row loss into the LR output signal ``g = L · score(z)``, and its inverse CDF
(:meth:`Noise.icdf`), which maps uniform points (e.g. quasi-Monte Carlo) to noise.

All densities here are centred and symmetric, so antithetic pairs ``(z, -z)`` are valid.

The scale may be a Python float or a tensor that broadcasts against the *per-row* site
shape (e.g. a per-output-unit ``sigma`` of shape ``[out_features]`` for a Linear site, or
``[C, 1, 1]`` for a per-channel Conv2d site).

Scores are always computed in float32 (or float64 if the noise is float64), even when the
network runs in bfloat16/float16 under autocast: low-precision scores make the estimate noisier.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Noise", "Gaussian", "Laplace", "Logistic"]


def _as_scale(value: float | Tensor, name: str) -> float | Tensor:
    if isinstance(value, Tensor):
        if not torch.is_floating_point(value):
            raise TypeError(f"{name} must be a float or a floating-point tensor, got {value.dtype}")
        if not bool(torch.all(value > 0)):
            raise ValueError(f"{name} must be > 0 everywhere, got min {value.min().item():g}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class Noise:
    """Base class of a centred, symmetric noise density with independent components.

    Subclasses implement :meth:`standard_sample`, :meth:`standard_score` and
    :meth:`standard_icdf` for the unit-scale density; scaling is handled here.
    """

    #: Name of the scale argument, for messages and ``repr``.
    scale_name: str = "scale"

    def __init__(self, scale: float | Tensor) -> None:
        self._scale = _as_scale(scale, self.scale_name)

    @property
    def scale(self) -> float | Tensor:
        """The scale (float or tensor broadcasting against the per-row site shape)."""
        return self._scale

    def _scale_like(self, like: Tensor) -> float | Tensor:
        if isinstance(self._scale, Tensor):
            return self._scale.to(device=like.device, dtype=like.dtype)
        return self._scale

    def check_shape(self, site_shape: torch.Size, site: str) -> None:
        """Raise a ``ValueError`` if a tensor scale does not broadcast to ``site_shape``."""
        if not isinstance(self._scale, Tensor):
            return
        try:
            shape = torch.broadcast_shapes(self._scale.shape, site_shape)
        except RuntimeError:
            shape = None
        if shape != site_shape:
            raise ValueError(
                f"site {site!r}: {self.scale_name} of shape {tuple(self._scale.shape)} does not "
                f"broadcast to the per-row site shape {tuple(site_shape)}; give a float, a tensor "
                f"of shape {tuple(site_shape)}, or one that broadcasts to it "
                f"(e.g. [C, 1, 1] for per-channel conv noise)"
            )

    # -- unit-scale density: what a subclass writes ------------------------------------------
    def standard_sample(
        self, shape: torch.Size, *, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        raise NotImplementedError

    def standard_score(self, e: Tensor) -> Tensor:
        raise NotImplementedError

    def standard_icdf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------------
    def sample(
        self,
        shape: torch.Size | tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw noise of ``shape`` (``[..., *site]``; the scale broadcasts on the right)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        e = self.standard_sample(torch.Size(shape), generator=generator, device=device)
        return self.scale_noise(e.to(dtype))

    def scale_noise(self, e: Tensor) -> Tensor:
        """Map unit-scale noise ``e`` to this density: ``z = scale · e``."""
        return e * self._scale_like(e)

    def score(self, z: Tensor) -> Tensor:
        """The score ``-∇_z ln f(z)`` of noise ``z`` (same shape), in at least float32."""
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()
        s = self._scale_like(z)
        return self.standard_score(z / s) / s

    def icdf(self, u: Tensor) -> Tensor:
        """Inverse CDF: maps ``u`` in (0, 1) to noise with this density (scale applied)."""
        return self.scale_noise(self.standard_icdf(u))

    def __repr__(self) -> str:
        s = self._scale
        text = f"tensor{tuple(s.shape)}" if isinstance(s, Tensor) else f"{s:g}"
        return f"{type(self).__name__}({self.scale_name}={text})"


class Gaussian(Noise):
    """Gaussian noise ``z ~ N(0, σ²)``; score ``z / σ²``.

    Args:
        sigma: standard deviation (float or tensor broadcasting to the per-row site shape).

    Example:
        >>> import torch, ulr
        >>> noise = ulr.Gaussian(0.5)
        >>> noise.score(torch.tensor([0.5]))
        tensor([2.])
    """

    scale_name = "sigma"

    def __init__(self, sigma: float | Tensor) -> None:
        super().__init__(sigma)

    @property
    def sigma(self) -> float | Tensor:
        return self._scale

    def standard_sample(self, shape, *, generator, device):
        return torch.randn(shape, generator=generator, device=device)

    def standard_score(self, e: Tensor) -> Tensor:
        return e

    def standard_icdf(self, u: Tensor) -> Tensor:
        return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


class Laplace(Noise):
    """Laplace noise with density ``exp(-|z|/b) / 2b``; score ``sign(z) / b`` (a 1-bit signal).

    Args:
        scale: the scale ``b`` (float or tensor); the standard deviation is ``b·√2``.
    """

    def standard_sample(self, shape, *, generator, device):
        # Inverse-CDF sampling keeps the stream on `generator` (torch.distributions cannot).
        u = torch.rand(shape, generator=generator, device=device)
        return self.standard_icdf(u.clamp_(min=torch.finfo(u.dtype).tiny))

    def standard_score(self, e: Tensor) -> Tensor:
        return torch.sign(e)

    def standard_icdf(self, u: Tensor) -> Tensor:
        c = u - 0.5
        return -torch.sign(c) * torch.log1p(-2.0 * c.abs())


class Logistic(Noise):
    """Logistic noise with density ``f(z) = e^{-z/s} / (s (1 + e^{-z/s})²)``;
    score ``tanh(z / 2s) / s``.

    Args:
        scale: the scale ``s`` (float or tensor); the standard deviation is ``s·π/√3``.
    """

    def standard_sample(self, shape, *, generator, device):
        u = torch.rand(shape, generator=generator, device=device)
        return self.standard_icdf(u.clamp_(min=torch.finfo(u.dtype).tiny))

    def standard_score(self, e: Tensor) -> Tensor:
        return torch.tanh(0.5 * e)

    def standard_icdf(self, u: Tensor) -> Tensor:
        return torch.log(u) - torch.log1p(-u)
