"""Samplers: how the ``K`` noise copies of one site are drawn jointly.

A sampler draws noise of shape ``[K, B, *site]`` for ``K = num_copies`` copies of a batch of
``B`` examples. The estimator flattens it copy-major to ``[K·B, *site]``: row ``k·B + b`` is
copy ``k`` of example ``b`` (the layout of :meth:`LikelihoodRatio.replicate`).

Samplers also say which copies are statistically dependent (:meth:`Sampler.copy_groups`), so
that baselines built from *other* copies of an example (leave-one-out) stay unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.quasirandom import SobolEngine

from .noise import Noise

__all__ = ["Sampler", "iid", "antithetic", "sobol"]


class Sampler:
    """Base class: draws ``[K, B, *site]`` noise for one site."""

    def sample(
        self,
        noise: Noise,
        num_copies: int,
        shape: torch.Size,
        *,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        """Return noise of shape ``[num_copies, *shape]`` (``shape = [B, *site]``), float32."""
        raise NotImplementedError

    def blocks(
        self,
        noise: Noise,
        num_copies: int,
        shape: torch.Size,
        *,
        generator: torch.Generator | None,
        device: torch.device,
        block_copies: int,
        out: Tensor | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        """Draw the same noise as a sequence of copy blocks: yield ``(first copy, noise
        [n, *shape])`` with ``n <= block_copies``, every copy exactly once (in any order).

        The memory modes of :class:`ulr.LikelihoodRatio` draw every site through this, with a
        block size fixed by the site's shape, so a pass that consumes one block at a time sees
        the noise that a pass keeping the whole ``[K, *shape]`` tensor sees. With ``out``
        (contiguous ``[num_copies, *shape]``) each block is written into its rows of ``out``
        and the yielded tensor is that view. The caller may overwrite a yielded block.

        This default draws everything with :meth:`sample` and yields slices of it (correct for
        any sampler; a subclass that draws block by block saves the memory)."""
        z = self.sample(noise, num_copies, shape, generator=generator, device=device)
        if out is not None:
            z = out.copy_(z)
        for k in range(0, num_copies, block_copies):
            yield k, z[k:k + block_copies]

    def check_num_copies(self, num_copies: int) -> None:
        """Raise ``ValueError`` if this sampler cannot draw ``num_copies`` copies."""
        if num_copies < 1:
            raise ValueError(f"num_copies must be >= 1, got {num_copies}")

    def copy_groups(self, num_copies: int) -> Tensor:
        """Group id of each copy ``[K]``: copies in different groups are independent."""
        return torch.arange(num_copies)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def snapshot(self) -> object:
        """A cheap copy of the sampler's state, to draw the same noise again (replay, chunks)."""
        return self.state_dict()

    def restore(self, snapshot: object) -> None:
        """Return to a :meth:`snapshot`."""
        self.load_state_dict(snapshot)


class _IID(Sampler):
    def sample(self, noise, num_copies, shape, *, generator, device):
        return noise.sample((num_copies, *shape), generator=generator, device=device)

    def blocks(self, noise, num_copies, shape, *, generator, device, block_copies, out=None):
        # Successive draws from one generator: on CPU the same numbers as one draw of all
        # copies whenever a block holds a multiple of 16 values.
        for k in range(0, num_copies, block_copies):
            n = min(block_copies, num_copies - k)
            yield k, noise.sample((n, *shape), generator=generator, device=device,
                                  out=None if out is None else out[k:k + n])

    def __repr__(self) -> str:
        return "iid()"


class _Antithetic(Sampler):
    def __init__(self, inner: Sampler) -> None:
        if not isinstance(inner, Sampler):
            raise TypeError(f"antithetic() wraps a Sampler, got {type(inner).__name__}")
        if isinstance(inner, _Antithetic):
            raise ValueError("antithetic(antithetic(...)) is not meaningful; use antithetic()")
        self.inner = inner

    def check_num_copies(self, num_copies: int) -> None:
        if num_copies < 2 or num_copies % 2:
            raise ValueError(
                f"antithetic sampling needs an even num_copies >= 2 (pairs (z, -z) are the two "
                f"halves of the copy dimension), got {num_copies}; use num_copies="
                f"{max(2, num_copies + num_copies % 2)}"
            )

    def sample(self, noise, num_copies, shape, *, generator, device):
        half = self.inner.sample(noise, num_copies // 2, shape, generator=generator, device=device)
        out = torch.cat([half, half], dim=0)  # no negated temporary: 1.5 noise-sized buffers
        del half
        out[num_copies // 2:].neg_()
        return out

    def blocks(self, noise, num_copies, shape, *, generator, device, block_copies, out=None):
        h = num_copies // 2
        inner = self.inner.blocks(noise, h, shape, generator=generator, device=device,
                                  block_copies=max(1, block_copies // 2),
                                  out=None if out is None else out[:h])
        for k, z in inner:
            mirror = torch.neg(z, out=out[h + k:h + k + z.shape[0]]) if out is not None else -z
            yield h + k, mirror
            yield k, z

    def copy_groups(self, num_copies: int) -> Tensor:
        inner = self.inner.copy_groups(num_copies // 2)
        return torch.cat([inner, inner])

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state.get("inner", {}))

    def snapshot(self) -> object:
        return self.inner.snapshot()

    def restore(self, snapshot: object) -> None:
        self.inner.restore(snapshot)

    def __repr__(self) -> str:
        return f"antithetic({self.inner!r})"


class _Sobol(Sampler):
    def __init__(self) -> None:
        # One scrambled sequence per site width, continued from call to call: building a
        # scrambled engine is costly for wide sites, and successive blocks of 2^m points are
        # nets too. State: (seed, points drawn) per width, enough to rebuild exactly.
        self._engines: dict[int, tuple[int, list[SobolEngine]]] = {}

    def _engine(self, dims: int, generator: torch.Generator | None) -> list[SobolEngine]:
        if dims not in self._engines:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                     device=generator.device if generator is not None else None))
            self._engines[dims] = (seed, self._build(dims, seed))
        return self._engines[dims][1]

    @staticmethod
    def _build(dims: int, seed: int) -> list[SobolEngine]:
        return [SobolEngine(min(SobolEngine.MAXDIM, dims - start), scramble=True,
                            seed=(seed + start) % 2**62)
                for start in range(0, dims, SobolEngine.MAXDIM)]

    def sample(self, noise, num_copies, shape, *, generator, device):
        batch, site = shape[0], shape[1:]
        dims = math.prod(site)
        engines = self._engine(dims, generator)
        points = torch.cat([e.draw(num_copies, dtype=torch.float64) for e in engines], dim=1)
        points = points.to(device)  # [K, D], shared by all examples
        # An independent uniform shift per example (mod 1) makes every row exactly uniform,
        # so the estimate stays unbiased, while each example's K copies keep the Sobol spacing.
        shift = torch.rand(batch, dims, generator=generator, device=device, dtype=torch.float64)
        u = torch.frac(points[:, None, :] + shift[None])
        eps = torch.finfo(torch.float32).eps
        u = u.clamp_(eps, 1 - eps).to(torch.float32)
        return noise.icdf(u.view(num_copies, batch, *site))  # a tensor scale broadcasts on site

    def blocks(self, noise, num_copies, shape, *, generator, device, block_copies, out=None):
        # The draws of sample() in the same order (points, then shifts); the uniforms of one
        # block of copies at a time.
        batch, site = shape[0], shape[1:]
        dims = math.prod(site)
        engines = self._engine(dims, generator)
        points = torch.cat([e.draw(num_copies, dtype=torch.float64) for e in engines], dim=1)
        points = points.to(device)
        shift = torch.rand(batch, dims, generator=generator, device=device, dtype=torch.float64)
        eps = torch.finfo(torch.float32).eps
        for k in range(0, num_copies, block_copies):
            n = min(block_copies, num_copies - k)
            u = torch.frac(points[k:k + n, None, :] + shift[None])
            z = noise.icdf(u.clamp_(eps, 1 - eps).to(torch.float32).view(n, batch, *site))
            yield k, z if out is None else out[k:k + n].copy_(z)

    def copy_groups(self, num_copies: int) -> Tensor:
        return torch.zeros(num_copies, dtype=torch.long)

    def state_dict(self) -> dict:
        return {str(d): (seed, engines[0].num_generated)
                for d, (seed, engines) in self._engines.items()}

    def load_state_dict(self, state: dict) -> None:
        self._engines = {}
        for d, (seed, drawn) in state.items():
            engines = self._build(int(d), seed)
            for e in engines:
                e.fast_forward(drawn)
            self._engines[int(d)] = (seed, engines)

    def snapshot(self) -> object:
        return {d: (seed, engines[0].num_generated)
                for d, (seed, engines) in self._engines.items()}

    def restore(self, snapshot: object) -> None:
        # reset + fast_forward is cheap; rebuilding the scrambled engines is not, so an engine
        # is rebuilt only when an earlier restore dropped it (snapshots restored out of order).
        for d in list(self._engines):
            if d not in snapshot:
                del self._engines[d]
        for d, (seed, drawn) in snapshot.items():
            if d not in self._engines:
                self._engines[d] = (seed, self._build(d, seed))
            for e in self._engines[d][1]:
                e.reset()
                e.fast_forward(drawn)

    def __repr__(self) -> str:
        return "sobol()"


def iid() -> Sampler:
    """Independent noise for every copy and every example (the plain Monte Carlo estimator)."""
    return _IID()


def antithetic(inner: Sampler | None = None) -> Sampler:
    """Antithetic pairs: copy ``k + K/2`` carries the negated noise of copy ``k``.

    Layout along the copy dimension (``K = 6``)::

        copy:   0    1    2  |  3    4    5
        noise:  z0   z1   z2 | -z0  -z1  -z2

    Each pair gives ``½[L(v+z) − L(v−z)]·score(z)``, which cancels the zeroth-order term
    ``L(v)·score(z)`` of the estimate. Needs a symmetric density (all of ``ulr``'s are) and an
    even ``num_copies``.

    Args:
        inner: sampler of the first half (default :func:`iid`).
    """
    return _Antithetic(inner if inner is not None else iid())


def sobol() -> Sampler:
    """Randomised quasi-Monte Carlo: scrambled Sobol points mapped through the inverse CDF.

    The ``K`` copies of an example are ``K`` points of one scrambled Sobol sequence in the
    site's ``D`` noise dimensions, moved by an independent uniform shift per example (modulo 1)
    and mapped by :meth:`Noise.icdf`. Every row is exactly distributed as the noise, so the
    estimate is unbiased; the copies of an example are evenly spread, which lowers its variance
    for smooth losses. Use a power of two for ``K`` (or ``2·2^m`` with :func:`antithetic`).

    Sites wider than ``SobolEngine.MAXDIM`` (21,201) are split into chunks with independently
    scrambled sequences: the points stay low-discrepancy within each chunk but are independent
    across chunks, so very wide sites gain less. The seed comes from the estimator's generator.

    The copies of an example depend on each other, so a leave-one-out baseline is not available
    with this sampler (it raises); use ``clean()`` or ``running_average()``.
    """
    return _Sobol()
