"""The noise stream: every random number of an estimate, drawn from one generator through the
sampler, site by site, and the snapshots that let a pass (or a chunk of it) see its noise
again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..samplers import Sampler
from .site_table import Site

__all__ = ["NoiseStream", "Snapshot"]

#: (generator state, sampler snapshot, model RNG state, how much noise was kept)
Snapshot = tuple


def _model_rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """torch's global CPU RNG state and, once CUDA is in use, every device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_model_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class NoiseStream:
    """Draws each site's noise from ``generator`` through ``sampler``.

    A site's noise is ``[K, B, *row_shape]`` for the ``K`` copies of a pass, drawn in the
    sampler's copy blocks; :meth:`sample` gives all of it, :meth:`blocks` one block at a time
    (a chunk of copies takes its rows of the same draw). The generator lives on the device of
    the values when it is the estimator's own (``own=True``): moved there once, reseeded from
    itself.

    For a second forward that must see exactly the noise of a first one on another rank's
    behalf, :meth:`keep` notes every site's noise as drawn and :meth:`replay` hands it out
    again in the same order.
    """

    def __init__(self, generator: torch.Generator, sampler: Sampler, *, own: bool) -> None:
        self.generator, self.sampler, self.own = generator, sampler, own
        self._kept: list[Tensor] | None = None
        self._clone_kept = False
        self._replay_pos: int | None = None

    # -- drawing ---------------------------------------------------------------------------------
    def generator_on(self, device: torch.device) -> torch.Generator:
        """The generator, moved to ``device`` (reseeded from itself) when it is our own."""
        gen = self.generator
        if gen.device != device and self.own:
            seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
            gen = self.generator = torch.Generator(device=device).manual_seed(seed)
        return gen

    def _draw(self, site: Site, row_shape: torch.Size, num_copies: int, batch: int,
              device: torch.device, out: Tensor | None = None,
              copies: tuple[int, int] | None = None) -> Iterator[tuple[int, Tensor]]:
        """The sampler's copy blocks ``(first copy, [n, B, *row_shape])`` of one site, on the
        generator's device (see :meth:`ulr.samplers.Sampler.blocks`)."""
        site.noise.check_shape(row_shape, site.name)
        gen = self.generator_on(device)
        return self.sampler.blocks(site.noise, num_copies, torch.Size((batch, *row_shape)),
                                   generator=gen, device=gen.device, out=out, copies=copies)

    def sample(self, site: Site, row_shape: torch.Size, num_copies: int, batch: int,
               device: torch.device) -> Tensor:
        """All of a site's noise, ``[K·B, *row_shape]``."""
        if self._replay_pos is not None:  # hand out what the first forward drew, in order
            z = self._kept[self._replay_pos]
            self._replay_pos += 1
            return z
        z = torch.empty((num_copies, batch, *row_shape), dtype=torch.float32,
                        device=self.generator_on(device).device)
        for _ in self._draw(site, row_shape, num_copies, batch, device, out=z):
            pass
        z = z.view(num_copies * batch, *row_shape).to(device)
        if self._kept is not None:
            self._kept.append(z.clone() if self._clone_kept else z)
        return z

    def blocks(self, site: Site, row_shape: torch.Size, num_copies: int, batch: int,
               device: torch.device, copies: tuple[int, int] | None = None
               ) -> Iterator[tuple[int, Tensor]]:
        """A site's noise one copy block at a time, ``(first copy, [n, B, *row_shape])``
        (memory: a block instead of ``K·B`` rows); with ``copies=(k0, k1)`` the blocks
        holding those copies. While keeping or replaying: one block, all copies."""
        if self._replay_pos is not None or self._kept is not None:
            yield 0, self.sample(site, row_shape, num_copies, batch, device).view(
                num_copies, batch, *row_shape)
            return
        for k, z in self._draw(site, row_shape, num_copies, batch, device, copies=copies):
            yield k, z.to(device)

    # -- keeping noise for a second forward ------------------------------------------------------
    def keep(self, *, clone: bool) -> None:
        """Note every site's noise from now on (cloned with ``clone``: the forward that draws
        it may consume it in place)."""
        self._kept, self._clone_kept = [], clone

    def kept(self) -> list[Tensor] | None:
        """Stop keeping; the noise noted since :meth:`keep`."""
        kept, self._kept = self._kept, None
        return kept

    def replay(self, kept: list[Tensor] | None) -> None:
        """Hand out ``kept`` (from :meth:`kept`) instead of drawing, until :meth:`stop`."""
        if kept is not None:
            self._kept, self._replay_pos = kept, 0

    def stop(self) -> None:
        """Draw from the generator again."""
        self._kept = self._replay_pos = None

    # -- snapshots -------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The noise stream's state and the model's own randomness (torch's global RNGs, which
        dropout and other train-mode layers draw from): restoring both makes a repeated forward
        see the same noise *and* the same dropout masks."""
        keeping = self._kept is not None and self._replay_pos is None
        return (self.generator.get_state(), self.sampler.snapshot(), _model_rng_state(),
                len(self._kept) if keeping else None)

    def restore(self, snapshot: Snapshot, model_rng: Any = None) -> None:
        """Back to ``snapshot`` (with the model's randomness ``model_rng`` when given).

        A forward that replays kept noise and starts over (autograd turned on midway) draws
        the noise again from the generator, which is back at the start of the pass: the kept
        noise was consumed in place. A forward that keeps noise and starts over keeps it
        afresh."""
        self.generator.set_state(snapshot[0])
        self.sampler.restore(snapshot[1])
        _set_model_rng_state(snapshot[2] if model_rng is None else model_rng)
        if self._replay_pos is not None:
            self.stop()
        elif self._kept is not None and snapshot[3] is not None:
            del self._kept[snapshot[3]:]

    @staticmethod
    def model_rng() -> Any:
        """The model's own randomness now (see :meth:`snapshot`)."""
        return _model_rng_state()
