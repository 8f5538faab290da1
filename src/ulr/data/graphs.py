"""Graphs for full-graph semi-supervised node classification.

A :class:`GraphDataset` is one graph: node features ``x [N, F]``, an undirected edge list
``edge_index [2, E]`` (both directions, no self-loops), labels ``y [N]`` and boolean
train/val/test node masks. The whole graph is one "batch" whose rows are the nodes; a split is
the same graph with a different mask (see :attr:`GraphDataset.train`).

* ``"karate"``: Zachary's karate club (34 members, 78 friendships; the two factions after the
  split are the labels). The edge list is public-domain data and is embedded here, so networkx is
  not needed (where it is installed, the tests check the list against
  ``networkx.karate_club_graph()``). Features are one-hot node ids (Kipf & Welling 2017).
* ``"sbm"``: a contextual stochastic block model generated from a seed: ``num_blocks`` equal
  communities, edge probability ``p_in`` inside a block and ``p_out`` between blocks, and
  Gaussian node features whose class mean is weakly informative (``feature_signal``), so that
  aggregating over neighbours helps. Planetoid-style splits: ``train_per_class`` labelled nodes
  per class, ``num_val`` validation and ``num_test`` test nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["GraphDataset", "normalized_adjacency", "KARATE_EDGES", "KARATE_FACTION"]

# Zachary (1977), as in networkx.karate_club_graph(): 0-based member ids, each edge once.
KARATE_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (0, 10), (0, 11), (0, 12),
    (0, 13), (0, 17), (0, 19), (0, 21), (0, 31), (1, 2), (1, 3), (1, 7), (1, 13), (1, 17),
    (1, 19), (1, 21), (1, 30), (2, 3), (2, 7), (2, 8), (2, 9), (2, 13), (2, 27), (2, 28),
    (2, 32), (3, 7), (3, 12), (3, 13), (4, 6), (4, 10), (5, 6), (5, 10), (5, 16), (6, 16),
    (8, 30), (8, 32), (8, 33), (9, 33), (13, 33), (14, 32), (14, 33), (15, 32), (15, 33),
    (18, 32), (18, 33), (19, 33), (20, 32), (20, 33), (22, 32), (22, 33), (23, 25), (23, 27),
    (23, 29), (23, 32), (23, 33), (24, 25), (24, 27), (24, 31), (25, 31), (26, 29), (26, 33),
    (27, 33), (28, 31), (28, 33), (29, 32), (29, 33), (30, 32), (30, 33), (31, 32), (31, 33),
    (32, 33),
)
#: Faction of each member after the split: 0 = "Mr. Hi", 1 = "Officer" (networkx's ``club``).
KARATE_FACTION: tuple[int, ...] = (
    0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1,
)


def normalized_adjacency(edge_index: Tensor, num_nodes: int, *, self_loops: bool = True
                         ) -> Tensor:
    r"""The GCN propagation matrix :math:`\hat A = D^{-1/2} (A + I) D^{-1/2}` as a coalesced
    sparse COO tensor ``[N, N]`` (Kipf & Welling 2017); ``D`` is the degree of ``A + I``.

    ``edge_index [2, E]`` lists directed edges; give both directions of an undirected graph.
    """
    src, dst = edge_index[0].long(), edge_index[1].long()
    if self_loops:
        loop = torch.arange(num_nodes)
        src, dst = torch.cat([src, loop]), torch.cat([dst, loop])
    deg = torch.zeros(num_nodes).index_add_(0, dst, torch.ones(dst.shape[0]))
    inv_sqrt = deg.clamp(min=1).rsqrt()
    values = inv_sqrt[dst] * inv_sqrt[src]
    adj = torch.sparse_coo_tensor(torch.stack([dst, src]), values, (num_nodes, num_nodes),
                                  check_invariants=True)
    return adj.coalesce()


@dataclass(frozen=True, eq=False)
class GraphDataset:
    """One graph for full-graph node classification.

    Attributes:
        name: registry name.
        x: node features ``float32 [N, F]``.
        edge_index: ``int64 [2, E]``, both directions of every undirected edge, no self-loops.
        y: labels ``int64 [N]``.
        train_mask, val_mask, test_mask: ``bool [N]``, disjoint.
        num_classes: number of classes.
        task: ``"node-classification"``.
    """

    name: str
    x: Tensor
    edge_index: Tensor
    y: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int
    task: str = "node-classification"

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Features per node, ``(F,)`` (what :func:`ulr.models.build` takes as ``in_shape``)."""
        return (int(self.x.shape[1]),)

    def adjacency(self) -> Tensor:
        """The normalised sparse adjacency ``D^-1/2 (A+I) D^-1/2`` (see
        :func:`normalized_adjacency`), cached."""
        cached = self.__dict__.get("_adj")
        if cached is None:
            cached = normalized_adjacency(self.edge_index, self.num_nodes)
            object.__setattr__(self, "_adj", cached)
        return cached

    def _split(self, mask: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        return (self.x, self.adjacency()), (self.y, mask)

    @property
    def train(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((x, adjacency), (y, train_mask))``: model inputs and loss targets of the whole
        graph, with the training nodes selected."""
        return self._split(self.train_mask)

    @property
    def val(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((x, adjacency), (y, val_mask))``."""
        return self._split(self.val_mask)

    @property
    def test(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((x, adjacency), (y, test_mask))``."""
        return self._split(self.test_mask)

    def __repr__(self) -> str:
        return (f"GraphDataset(name={self.name!r}, nodes={self.num_nodes}, "
                f"edges={self.edge_index.shape[1] // 2}, features={self.x.shape[1]}, "
                f"classes={self.num_classes}, train/val/test="
                f"{int(self.train_mask.sum())}/{int(self.val_mask.sum())}/"
                f"{int(self.test_mask.sum())})")


def _undirected(pairs: np.ndarray) -> Tensor:
    both = np.concatenate([pairs, pairs[:, ::-1]], axis=0).T.copy()
    return torch.from_numpy(both).long()


def _masks(y: np.ndarray, train_per_class: int, num_val: int, num_test: int | None,
           rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor]:
    n = len(y)
    train = np.zeros(n, bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) <= train_per_class:
            raise ValueError(f"class {c} has {len(idx)} nodes; train_per_class="
                             f"{train_per_class} leaves none for val/test")
        train[idx[:train_per_class]] = True
    rest = rng.permutation(np.flatnonzero(~train))
    val = np.zeros(n, bool)
    val[rest[:num_val]] = True
    test = np.zeros(n, bool)
    test[rest[num_val:] if num_test is None else rest[num_val:num_val + num_test]] = True
    return torch.from_numpy(train), torch.from_numpy(val), torch.from_numpy(test)


def load_karate(*, seed: int = 0, train_per_class: int = 4, num_val: int = 4) -> GraphDataset:
    """Zachary's karate club: 34 nodes, one-hot features, 2 factions; ``train_per_class``
    labelled members per faction (drawn with ``seed``), ``num_val`` validation members, the
    rest test."""
    rng = np.random.default_rng([7, seed])
    y = np.asarray(KARATE_FACTION, dtype=np.int64)
    train, val, test = _masks(y, train_per_class, num_val, None, rng)
    return GraphDataset(
        name="karate", x=torch.eye(34), edge_index=_undirected(np.asarray(KARATE_EDGES)),
        y=torch.from_numpy(y), train_mask=train, val_mask=val, test_mask=test, num_classes=2,
    )


def _sbm_edges(blocks: np.ndarray, p_in: float, p_out: float, rng: np.random.Generator
               ) -> np.ndarray:
    n = len(blocks)
    pairs = []
    for start in range(0, n, 512):  # row chunks of the upper triangle bound the memory
        rows = np.arange(start, min(start + 512, n))
        prob = np.where(blocks[rows, None] == blocks[None, :], p_in, p_out)
        hit = rng.random((len(rows), n)) < prob
        hit &= np.arange(n)[None, :] > rows[:, None]
        r, c = np.nonzero(hit)
        pairs.append(np.stack([rows[r], c], axis=1))
    return np.concatenate(pairs, axis=0)


def load_sbm(*, seed: int = 0, num_nodes: int = 3000, num_blocks: int = 5,
             average_degree: float = 10.0, homophily: float = 0.8, num_features: int = 32,
             feature_signal: float = 0.4, train_per_class: int = 20, num_val: int = 500,
             num_test: int = 1000, generation_seed: int = 0) -> GraphDataset:
    """A seeded contextual stochastic block model.

    ``num_blocks`` equal communities; expected degree ``average_degree`` of which a share
    ``homophily`` lies inside the node's own block. Features: ``N(μ_c, I)`` in ``num_features``
    dimensions with class means ``μ_c`` of norm ``feature_signal · sqrt(num_features)``
    (random directions), so features alone classify poorly and neighbours help. The graph
    depends only on ``generation_seed``; the labelled/val/test nodes on ``seed``.
    """
    if num_nodes < num_blocks * (train_per_class + 1):
        raise ValueError(f"num_nodes={num_nodes} is too small for {num_blocks} blocks of "
                         f"{train_per_class} labelled nodes")
    gen = np.random.default_rng([11, generation_seed])
    blocks = np.arange(num_nodes) % num_blocks
    gen.shuffle(blocks)
    size = num_nodes / num_blocks
    p_in = average_degree * homophily / (size - 1)
    p_out = average_degree * (1 - homophily) / (num_nodes - size)
    if p_in > 1:
        raise ValueError(f"average_degree={average_degree} needs p_in={p_in:.2f} > 1")
    pairs = _sbm_edges(blocks, p_in, p_out, gen)
    means = gen.standard_normal((num_blocks, num_features))
    means *= feature_signal * np.sqrt(num_features) / np.linalg.norm(means, axis=1,
                                                                     keepdims=True)
    x = (means[blocks] + gen.standard_normal((num_nodes, num_features))).astype(np.float32)
    y = blocks.astype(np.int64)
    train, val, test = _masks(y, train_per_class, num_val, num_test,
                              np.random.default_rng([13, seed]))
    return GraphDataset(
        name="sbm", x=torch.from_numpy(x), edge_index=_undirected(pairs),
        y=torch.from_numpy(y), train_mask=train, val_mask=val, test_mask=test,
        num_classes=num_blocks,
    )
