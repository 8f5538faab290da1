"""Samplers: how the ``K`` noise copies of one site are drawn jointly.

A sampler draws noise of shape ``[K, B, *site]`` for ``K = num_copies`` copies of a batch of
``B`` examples. The estimator flattens it copy-major to ``[K·B, *site]``: row ``k·B + b`` is
copy ``k`` of example ``b`` (the layout of :meth:`LikelihoodRatio.replicate`).

Samplers also say which copies are statistically dependent (:meth:`Sampler.copy_groups`), so
that baselines built from *other* copies of an example (leave-one-out) stay unbiased.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.quasirandom import SobolEngine

from .noise import Noise

__all__ = ["Sampler", "iid", "antithetic", "sobol"]


# A site's noise is drawn in blocks of whole copies: at most this many values (8 MB in fp32),
# and an eighth of the copies unless that is under _MIN_BLOCK_VALUES. A pass that consumes the
# noise block by block (replay, chunks) holds one block, never the K·B rows; a block is big
# enough to amortise its call.
_BLOCK_VALUES = 1 << 21
_MIN_BLOCK_VALUES = 1 << 18


def block_copies(num_copies: int, shape: torch.Size) -> int:
    """Copies per noise block for ``num_copies`` copies of ``shape = [B, *site]``."""
    per_copy = max(1, math.prod(shape))
    return max(1, min(_BLOCK_VALUES // per_copy,
                      max(-(-num_copies // 8), _MIN_BLOCK_VALUES // per_copy)))


def _overlaps(k: int, n: int, copies: tuple[int, int] | None) -> bool:
    return copies is None or (k < copies[1] and copies[0] < k + n)


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor | None:
    """Threads drawing CPU noise blocks in parallel (one per intra-op thread), or None."""
    global _POOL
    threads = torch.get_num_threads()
    if threads < 2:
        return None
    if _POOL is None or _POOL[:2] != (os.getpid(), threads):  # new after fork / set_num_threads
        _POOL = (os.getpid(), threads,
                 ThreadPoolExecutor(threads, thread_name_prefix="ulr-noise"))
    return _POOL[2]


class Sampler:
    """Base class: draws ``[K, B, *site]`` noise for one site, as copy blocks.

    A subclass implements :meth:`blocks` (then :meth:`sample` assembles them) or only
    :meth:`sample` (then :meth:`blocks` slices it, which costs the memory of all copies).
    """

    def sample(
        self,
        noise: Noise,
        num_copies: int,
        shape: torch.Size,
        *,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> Tensor:
        """Return noise of shape ``[num_copies, *shape]`` (``shape = [B, *site]``), float32:
        the blocks of :meth:`blocks`, assembled."""
        if type(self).blocks is Sampler.blocks:
            raise NotImplementedError(f"{type(self).__name__} must implement sample or blocks")
        out = torch.empty((num_copies, *shape), dtype=torch.float32, device=device)
        for _ in self.blocks(noise, num_copies, shape, generator=generator, device=device,
                             out=out):
            pass
        return out

    def blocks(
        self,
        noise: Noise,
        num_copies: int,
        shape: torch.Size,
        *,
        generator: torch.Generator | None,
        device: torch.device,
        out: Tensor | None = None,
        copies: tuple[int, int] | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        """Draw the noise as blocks of copies: yield ``(first copy, noise [n, *shape])``,
        every copy exactly once, in an order fixed by the arguments.

        The generator advances by the same amount whichever blocks are consumed, so the memory
        modes of :class:`ulr.LikelihoodRatio` (which all draw through this) see the same
        numbers. With ``out`` (contiguous ``[num_copies, *shape]``, float32) each block is
        written into its rows and the yielded tensor is that view. With ``copies=(k0, k1)``
        only blocks that hold one of those copies are yielded (and, where the sampler can,
        drawn). The caller may overwrite a yielded block.
        """
        if type(self).sample is Sampler.sample:
            raise NotImplementedError(f"{type(self).__name__} must implement sample or blocks")
        z = self.sample(noise, num_copies, shape, generator=generator, device=device)
        if out is not None:
            z = out.copy_(z)
        step = block_copies(num_copies, shape)
        for k in range(0, num_copies, step):
            if _overlaps(k, step, copies):
                yield k, z[k:k + step]

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
    def blocks(self, noise, num_copies, shape, *, generator, device, out=None, copies=None):
        # On CPU each block has its own generator, seeded by one draw of all blocks' seeds from
        # `generator`: blocks are independent, so they are drawn in parallel threads (the CPU
        # generator is sequential and drawing the noise would otherwise cost as much as a
        # forward), skipped when not wanted, and the numbers do not depend on the threads.
        step = block_copies(num_copies, shape)
        starts = range(0, num_copies, step)
        if torch.device(device).type != "cpu":
            # An accelerator's generator draws in parallel already, and reading seeds back
            # would synchronise: successive blocks from `generator` (unwanted ones are drawn
            # too, so that the generator ends in the same state).
            for k in starts:
                n = min(step, num_copies - k)
                z = noise.sample((n, *shape), generator=generator, device=device,
                                 out=None if out is None else out[k:k + n])
                if _overlaps(k, step, copies):
                    yield k, z
            return
        seeds = torch.randint(0, 2**62, (len(starts),), generator=generator,
                              device=generator.device if generator is not None else "cpu")
        todo = [(k, min(step, num_copies - k), seed)
                for k, seed in zip(starts, seeds.tolist(), strict=True)
                if _overlaps(k, step, copies)]

        def draw(k: int, n: int, seed: int) -> Tensor:
            g = torch.Generator(device=device).manual_seed(seed)
            return noise.sample((n, *shape), generator=g, device=device,
                                out=None if out is None else out[k:k + n])

        pool = _pool() if len(todo) > 1 else None
        if pool is None:
            for k, n, seed in todo:
                yield k, draw(k, n, seed)
            return
        # all at once into `out`; otherwise one block ahead of the consumer (two in memory)
        ahead = len(todo) if out is not None else 1
        futures = [pool.submit(draw, *t) for t in todo[:ahead]]
        for i, (k, _, _) in enumerate(todo):
            if i + ahead < len(todo):
                futures.append(pool.submit(draw, *todo[i + ahead]))
            yield k, futures[i].result()
            futures[i] = None

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

    def blocks(self, noise, num_copies, shape, *, generator, device, out=None, copies=None):
        h = num_copies // 2
        inner_copies = None
        if copies is not None:  # the first-half copies whose block or mirror is wanted
            k0, k1 = copies
            parts = [(max(k0, 0), min(k1, h)), (max(k0 - h, 0), min(k1 - h, h))]
            parts = [p for p in parts if p[0] < p[1]]
            inner_copies = (min(p[0] for p in parts), max(p[1] for p in parts)) if parts \
                else (0, 0)
        inner = self.inner.blocks(noise, h, shape, generator=generator, device=device,
                                  out=None if out is None else out[:h], copies=inner_copies)
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

    def blocks(self, noise, num_copies, shape, *, generator, device, out=None, copies=None):
        # The K points and the per-example shifts are drawn whole (K·D and B·D values, small
        # next to K·B·D); the uniforms of one block of copies at a time.
        batch, site = shape[0], shape[1:]
        dims = math.prod(site)
        engines = self._engine(dims, generator)
        points = torch.cat([e.draw(num_copies, dtype=torch.float64) for e in engines], dim=1)
        points = points.to(device)
        shift = torch.rand(batch, dims, generator=generator, device=device, dtype=torch.float64)
        eps = torch.finfo(torch.float32).eps
        step = block_copies(num_copies, shape)
        for k in range(0, num_copies, step):
            if not _overlaps(k, step, copies):
                continue
            n = min(step, num_copies - k)
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
    """Independent noise for every copy and every example (the plain Monte Carlo estimator;
    the estimator's default: with a baseline as good as antithetic pairs or better)."""
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
