"""Hybrid BP/LR training: noise sites at block boundaries only.

A site cuts the autograd graph (its value becomes ``v.detach() + z``) and its parameters get the
local vector-Jacobian product of their own segment with the LR signal ``g = w · score(z) / N``.
So when sites sit only at the **ends of blocks** of several layers, backpropagation runs inside
each block (from the block's end back to the previous block's end) and the likelihood-ratio
signal connects the blocks (docs/method.md §4, "localized module training without compromising the
global objective"):

* a site after every parameterised layer: pure ULR (each layer is its own block);
* sites at ``N`` block ends: backprop inside each block, LR between blocks;
* no sites: plain backprop.

:func:`blocks` builds the site spec for :class:`ulr.LikelihoodRatio`::

    spec = ulr.hybrid.blocks(model, 2)                 # 2 blocks of consecutive layers
    spec = ulr.hybrid.blocks(seq, ends=[3, 7])         # nn.Sequential: blocks end after [3], [7]
    spec = ulr.hybrid.blocks(model, ends=["layer2", "fc"])   # any model: by module name
    est = ulr.LikelihoodRatio(model, sites=spec, num_copies=32)

Example:
    >>> import torch, ulr
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
    ...                       nn.Linear(8, 3))
    >>> ulr.hybrid.layers(model)
    ['0', '2', '4']
    >>> ulr.hybrid.block_ends(model, 2)
    ['2', '4']
    >>> ulr.hybrid.blocks(model, ends=[1])      # the output is always the end of the last block
    by_name('1', '4')
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .noise import Noise
from .sites import SiteSpec, by_name, named_param_owners

__all__ = ["layers", "block_ends", "blocks"]


def layers(model: nn.Module) -> list[str]:
    """Qualified names of the modules that directly own a trainable parameter, in registration
    order (``model.named_modules()``; for the reference models and ``nn.Sequential`` that is
    the order of the forward pass). These are the sites of pure ULR."""
    return [name for name, _ in named_param_owners(model)]


def block_ends(model: nn.Module, num_blocks: int) -> list[str]:
    """The last layer of each of ``num_blocks`` blocks of consecutive parameterised layers.

    The ``L`` layers of :func:`layers` are split into ``num_blocks`` runs of equal length (the
    first ``L mod num_blocks`` blocks get one more layer); a block ends at the output of its
    last layer, so ``num_blocks = L`` gives exactly the sites of pure ULR and ``1`` a single
    site at the last layer (backprop through the whole network from an LR signal there).

    Raises:
        ValueError: ``num_blocks`` is below 1 or above the number of layers.
    """
    names = layers(model)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise TypeError(f"num_blocks must be an int, got {num_blocks!r}")
    if not names:
        raise ValueError(f"{type(model).__name__} has no module with a trainable parameter")
    if not 1 <= num_blocks <= len(names):
        raise ValueError(
            f"num_blocks must be between 1 and the number of parameterised layers "
            f"({len(names)}: {names}), got {num_blocks}; use {len(names)} for pure ULR"
        )
    size, extra = divmod(len(names), num_blocks)
    ends, last = [], -1
    for i in range(num_blocks):
        last += size + (1 if i < extra else 0)
        ends.append(names[last])
    return ends


def blocks(
    model: nn.Module,
    num_blocks: int | None = None,
    *,
    ends: Sequence[int | str] | None = None,
    noise: Noise | None = None,
) -> SiteSpec:
    """Site spec for hybrid BP/LR training: noise only at the ends of blocks.

    Give exactly one of:

    Args:
        model: the network.
        num_blocks: split the parameterised layers into this many equal blocks
            (:func:`block_ends`).
        ends: the block ends: child indices of an ``nn.Sequential`` (negative ones count from
            the end; the last child always ends the last block, so that every parameter lies
            inside a block) or qualified module names of any model (as in
            ``model.named_modules()``; include the module that produces the output, or the
            estimator reports the parameters after the last end as uncovered).
        noise: the noise of these sites (default: the estimator's ``noise``).

    Returns:
        A :func:`ulr.sites.by_name` spec of the block ends.

    Raises:
        ValueError: both or neither of ``num_blocks`` and ``ends``, an index out of range, or
            a name that is no module of ``model``.
    """
    if (num_blocks is None) == (ends is None):
        raise ValueError("blocks() takes either num_blocks (equal blocks of layers) or ends= "
                         "(indices or module names of the block ends), not both or neither")
    if num_blocks is not None:
        return by_name(*block_ends(model, num_blocks), noise=noise)
    if isinstance(ends, (str, int)):
        ends = [ends]
    ends = list(ends)
    if not ends:
        raise ValueError("ends= needs at least one block end")
    modules = dict(model.named_modules())
    names: list[str] = []
    for end in ends:
        if isinstance(end, bool) or not isinstance(end, (int, str)):
            raise TypeError(f"a block end is a child index or a module name, got {end!r}")
        if isinstance(end, int):
            if not isinstance(model, nn.Sequential):
                raise TypeError(
                    f"integer block ends index the children of an nn.Sequential, but the model "
                    f"is a {type(model).__name__}; name the modules instead (e.g. "
                    f"ends=['layer2', 'fc'])")
            n = len(model)
            if not -n <= end < n:
                raise ValueError(f"block end {end} is out of range for an nn.Sequential of {n} "
                                 f"children")
            end = str(end % n)
        elif end not in modules or end == "":
            raise ValueError(f"block end {end!r} is no module of {type(model).__name__}; its "
                             f"modules are {[k for k in modules if k]}")
        if end not in names:
            names.append(end)
    if isinstance(model, nn.Sequential) and all(isinstance(e, int) for e in ends):
        last = str(len(model) - 1)
        if last not in names:
            names.append(last)
        names.sort(key=int)
    return by_name(*names, noise=noise)
