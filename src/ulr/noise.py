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
from torch import Tensor, nn

__all__ = ["Noise", "Gaussian", "Laplace", "Logistic", "WeightNoise", "weight_noise"]


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

    def __init__(self, scale: float | Tensor, *, learnable: bool = False) -> None:
        self._scale = _as_scale(scale, self.scale_name)
        #: With ``learnable=True``: the parameter ``ln(scale)`` (shape of ``scale``), whose
        #: gradient the estimator writes to ``.grad``; give ``noise.parameters()`` to an optimizer.
        self.log_scale: nn.Parameter | None = None
        if learnable:
            self.log_scale = nn.Parameter(torch.log(torch.as_tensor(self._scale,
                                                                    dtype=torch.float32)))

    @property
    def learnable(self) -> bool:
        return self.log_scale is not None

    def parameters(self) -> list[nn.Parameter]:
        """The learnable parameters (``[log_scale]`` or ``[]``), for an optimizer."""
        return [self.log_scale] if self.log_scale is not None else []

    @property
    def scale(self) -> float | Tensor:
        """The scale (float or tensor broadcasting against the per-row site shape)."""
        if self.log_scale is not None:
            return self.log_scale.detach().exp()
        return self._scale

    @scale.setter
    def scale(self, value: float | Tensor) -> None:
        """Set the scale (schedules use this); a learnable scale keeps its parameter object."""
        value = _as_scale(value, self.scale_name)
        if self.log_scale is not None:
            with torch.no_grad():
                self.log_scale.copy_(torch.log(torch.as_tensor(value, dtype=torch.float32)))
        else:
            self._scale = value

    def _scale_like(self, like: Tensor) -> float | Tensor:
        scale = self.scale
        if isinstance(scale, Tensor):
            return scale.to(device=like.device, dtype=like.dtype)
        return scale

    def check_shape(self, site_shape: torch.Size, site: str) -> None:
        """Raise a ``ValueError`` if a tensor scale does not broadcast to ``site_shape``."""
        scale = self.scale
        if not isinstance(scale, Tensor):
            return
        try:
            shape = torch.broadcast_shapes(scale.shape, site_shape)
        except RuntimeError:
            shape = None
        if shape != site_shape:
            raise ValueError(
                f"site {site!r}: {self.scale_name} of shape {tuple(scale.shape)} does not "
                f"broadcast to the per-row site shape {tuple(site_shape)}; give a float, a tensor "
                f"of shape {tuple(site_shape)}, or one that broadcasts to it "
                f"(e.g. [C, 1, 1] for per-channel conv noise)"
            )

    # -- unit-scale density: what a subclass writes ------------------------------------------
    def standard_sample(
        self, shape: torch.Size, *, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """Draw unit-scale noise of ``shape`` into a new tensor (the caller scales it in
        place)."""
        raise NotImplementedError

    def standard_score(self, e: Tensor) -> Tensor:
        raise NotImplementedError

    def standard_icdf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def standard_score_(self, e: Tensor) -> Tensor:
        """In-place :meth:`standard_score` (subclasses override where an in-place op exists)."""
        return self.standard_score(e)

    # -- public API -----------------------------------------------------------------------------
    def sample(
        self,
        shape: torch.Size | tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        out: Tensor | None = None,
    ) -> Tensor:
        """Draw noise of ``shape`` (``[..., *site]``; the scale broadcasts on the right), into
        ``out`` when given (a contiguous tensor of that shape; its device and dtype win)."""
        if out is not None:
            if out.shape != torch.Size(shape) or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous tensor of shape {tuple(shape)}, "
                                 f"got {tuple(out.shape)}")
            self._standard_sample_into(out, generator)
            return out.mul_(self._scale_like(out))
        device = torch.device(device) if device is not None else torch.device("cpu")
        e = self.standard_sample(torch.Size(shape), generator=generator, device=device)
        # standard_sample returns a fresh tensor: scale it in place (one noise-sized buffer
        # instead of two at the peak of a site)
        e = e.to(dtype)
        return e.mul_(self._scale_like(e))

    def _standard_sample_into(self, out: Tensor, generator: torch.Generator | None) -> None:
        """:meth:`standard_sample` written into ``out`` (the same numbers)."""
        out.copy_(self.standard_sample(out.shape, generator=generator, device=out.device))

    def scale_noise(self, e: Tensor) -> Tensor:
        """Map unit-scale noise ``e`` to this density: ``z = scale · e``."""
        return e * self._scale_like(e)

    def score(self, z: Tensor) -> Tensor:
        """The score ``-∇_z ln f(z)`` of noise ``z`` (same shape), in at least float32."""
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()
        s = self._scale_like(z)
        return self.standard_score(z / s) / s

    def signal_(self, z: Tensor, weights: Tensor, num_rows: int) -> Tensor:
        """The LR signal ``w·score(z)/num_rows`` (``weights [R]``, ``z [R, *site]``), computed
        in the storage of ``z`` when the dtypes allow: ``z`` is consumed. Memory matters here:
        the signal is as large as the site's value, for all ``K·B`` rows."""
        if z.dtype not in (torch.float32, torch.float64) or weights.dtype != z.dtype:
            from .functional import lr_signal

            return lr_signal(weights, self.score(z), num_rows)
        s = self._scale_like(z)
        e = self.standard_score_(z.div_(s))
        w = weights.reshape(weights.shape[0], *([1] * (z.dim() - 1))) / num_rows
        return e.div_(s).mul_(w)

    def icdf(self, u: Tensor) -> Tensor:
        """Inverse CDF: maps ``u`` in (0, 1) to noise with this density (scale applied)."""
        return self.scale_noise(self.standard_icdf(u))

    def log_scale_grad(self, z: Tensor, weights: Tensor, num_rows: int) -> Tensor:
        r"""LR estimate of ``∂F/∂ ln s`` from noise ``z [R, *site]`` and row weights ``[R]``.

        For ``z = s·e`` with ``e`` of unit scale, ``∂ ln f_s(z)/∂ ln s = e·ψ(e) − 1`` where
        ``ψ`` is the unit score, so

        .. math:: \frac{∂F}{∂ \ln s} = E[\, L\, (e\,ψ(e) − 1)]

        (``ε² − 1`` for Gaussian noise). Summed over the rows (divided by ``num_rows``) and over
        the site dimensions the scale broadcasts along; returns the shape of ``log_scale``.
        """
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        e = z / self._scale_like(z)
        term = e * self.standard_score(e) - 1.0
        w = weights.reshape(weights.shape[0], *([1] * (z.dim() - 1))).to(term.dtype)
        g = (w * term).sum(0) / num_rows  # [*site]
        shape = self.log_scale.shape if self.log_scale is not None else torch.Size()
        extra = g.dim() - len(shape)
        if extra:
            g = g.sum(dim=tuple(range(extra)))
        dims = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
        return g.sum(dim=dims, keepdim=True) if dims else g

    def __repr__(self) -> str:
        s = self.scale
        text = f"tensor{tuple(s.shape)}" if isinstance(s, Tensor) else f"{s:g}"
        extra = ", learnable=True" if self.learnable else ""
        return f"{type(self).__name__}({self.scale_name}={text}{extra})"


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

    def __init__(self, sigma: float | Tensor, *, learnable: bool = False) -> None:
        super().__init__(sigma, learnable=learnable)

    @property
    def sigma(self) -> float | Tensor:
        return self.scale

    def standard_sample(self, shape, *, generator, device):
        return torch.randn(shape, generator=generator, device=device)

    def _standard_sample_into(self, out: Tensor, generator: torch.Generator | None) -> None:
        # standard_sample draws in the default dtype: the same numbers only when out has it
        if out.dtype == torch.get_default_dtype():
            torch.randn(out.shape, generator=generator, device=out.device, out=out)
        else:
            super()._standard_sample_into(out, generator)

    def standard_score(self, e: Tensor) -> Tensor:
        return e

    def standard_score_(self, e: Tensor) -> Tensor:
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

    def standard_score_(self, e: Tensor) -> Tensor:
        return e.sign_()

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

    def standard_score_(self, e: Tensor) -> Tensor:
        return e.mul_(0.5).tanh_()

    def standard_icdf(self, u: Tensor) -> Tensor:
        return torch.log(u) - torch.log1p(-u)


class WeightNoise:
    """Marks a Linear/Conv site for **weight noise**: each example gets its own perturbed
    weights ``W_n = W + E_n`` (and bias ``b + e_n``), with ``E_n`` drawn from ``noise``.

    The gradient is ``mean_n w_n · score(E_n)`` — it needs neither the layer's input nor an
    autograd graph. The perturbed output ``(W + E_n) x_n`` is computed per example with a
    batched product (Linear) or a grouped convolution (Conv), so memory grows with the number of
    weights: meant for layers with few weights and large outputs, such as the first
    convolutions (the ULR authors use ``σ = 1e-3`` there). Use with :func:`weight_noise`.
    """

    def __init__(self, noise: Noise) -> None:
        if not isinstance(noise, Noise):
            raise TypeError(f"weight_noise() wraps a ulr noise, got {noise!r}")
        self.noise = noise

    def __repr__(self) -> str:
        return f"weight_noise({self.noise!r})"


def weight_noise(noise: Noise) -> WeightNoise:
    """Per-example weight noise for a Linear/Conv site, e.g.
    ``sites=ulr.sites.by_name({"conv1": ulr.weight_noise(ulr.Gaussian(1e-3))})``."""
    return WeightNoise(noise)
