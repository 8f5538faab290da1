r"""Graph convolutional nets (Kipf & Welling 2017) for full-graph node classification by ULR.

The whole graph is one example whose **rows are its nodes**: the model takes
``(x [N, F], adjacency [N, N])`` and returns ``[N, num_classes]``. Two things differ from a
batch of independent examples, and both are handled here:

1. **Copies of a whole graph.** The estimator tiles the node features into ``K`` copies
   (``[K·N, F]``, copy-major); the adjacency must not be tiled along its first dimension. Pass
   ``replicate=tile_graph`` to :class:`ulr.LikelihoodRatio`: it tiles the features and keeps
   the one ``[N, N]`` adjacency, and :func:`propagate` applies it to every copy at once by
   viewing ``[K·N, H]`` as ``[N, K·H]`` (one sparse product with a K-times wider right-hand
   side). :func:`block_diagonal_graph` is the alternative (a ``[K·N, K·N]`` block-diagonal
   adjacency, the PyG batching idiom); ``benchmarks/architectures.py`` measures both.
2. **Which loss a node's noise sees.** Noise added at node ``n`` changes the outputs of every
   node within the remaining layers' reach, so the LR weight of row ``n`` must be the loss of
   its receptive field, not node ``n``'s own loss (that estimate misses the effect of ``n`` on
   its neighbours and is biased). :class:`NodeLoss` returns, for each row, the summed loss of
   the labelled nodes within ``hops`` of it (``hops = layers - 1`` when every layer is a
   site), scaled so that the estimate is the gradient of the mean loss over labelled nodes.
   Nodes outside the receptive field contribute only variance, so they are left out.

The site of a :class:`GraphConv` is its output ``Â X W + b`` (noise after aggregation, as in
the ULR paper); its gradient is the autograd VJP of that one layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import ULRConfig, as_widths, check_positive

__all__ = ["GraphConv", "GCN", "Shared", "propagate", "tile_graph", "block_diagonal_graph",
           "tile_edge_index", "receptive_field", "NodeLoss"]

_SIGMA = 0.1
_COPIES = 64


class Shared:
    """An adjacency that every graph copy shares, handed through the estimator untouched.

    :func:`tile_graph` wraps the adjacency in this holder: the estimator inspects the tensors of
    the replicated inputs (it looks for the tiled batch by storage pointer, which a sparse
    tensor does not have), and a holder that is not a tensor is passed to the model as it is.
    :func:`propagate` unwraps it; users never build one.
    """

    __slots__ = ("matrix",)

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix

    def __repr__(self) -> str:
        return f"Shared({tuple(self.matrix.shape)})"


def propagate(adj: Tensor | Shared, h: Tensor) -> Tensor:
    """``adj @ h`` for every graph copy stacked in ``h``.

    Shapes: ``adj [N, N]`` (sparse or dense) and ``h [K·N, H]`` (``K`` copies, copy-major) ->
    ``[K·N, H]``; or a block-diagonal ``adj [K·N, K·N]`` applied directly.
    """
    if isinstance(adj, Shared):
        adj = adj.matrix
    n, rows = adj.shape[0], h.shape[0]
    if rows == n:
        return adj @ h
    if rows % n:
        raise ValueError(f"{rows} node rows are not a whole number of copies of the "
                         f"{n}-node adjacency; replicate the graph with tile_graph")
    k, width = rows // n, h.shape[1]
    wide = h.view(k, n, width).transpose(0, 1).reshape(n, k * width)
    return (adj @ wide).view(n, k, width).transpose(0, 1).reshape(rows, width)


def tile_graph(inputs: Any, num_copies: int) -> tuple[Any, ...]:
    """``replicate=`` hook: tile the node features ``[N, F] -> [K·N, F]`` and keep the
    adjacency (and any further inputs) as they are; :func:`propagate` handles the copies."""
    x, adj, *rest = inputs
    return (x.repeat(num_copies, 1), Shared(adj), *rest)


def block_diagonal_graph(inputs: Any, num_copies: int) -> tuple[Tensor, Shared]:
    """``replicate=`` hook: features ``[K·N, F]`` and a sparse block-diagonal ``[K·N, K·N]``
    adjacency holding ``K`` copies of the graph."""
    x, adj = inputs
    n = adj.shape[0]
    adj = adj.coalesce() if adj.is_sparse else adj.to_sparse().coalesce()
    idx, val = adj.indices(), adj.values()
    offsets = (torch.arange(num_copies, device=idx.device) * n).repeat_interleave(idx.shape[1])
    big = torch.sparse_coo_tensor(idx.repeat(1, num_copies) + offsets, val.repeat(num_copies),
                                  (num_copies * n, num_copies * n), is_coalesced=True,
                                  check_invariants=False)
    return x.repeat(num_copies, 1), Shared(big)


def tile_edge_index(inputs: Any, num_copies: int) -> tuple[Tensor, Tensor]:
    """``replicate=`` hook for ``(x [N, F], edge_index [2, E])`` models (torch_geometric
    layers): ``K`` disjoint copies, node ids of copy ``k`` offset by ``k·N``."""
    x, edge_index = inputs
    n = x.shape[0]
    offsets = (torch.arange(num_copies, device=edge_index.device) * n).repeat_interleave(
        edge_index.shape[1])
    return x.repeat(num_copies, 1), edge_index.repeat(1, num_copies) + offsets


def receptive_field(adj: Tensor, hops: int) -> Tensor:
    """Sparse 0/1 matrix ``R [N, N]`` with ``R[m, n] = 1`` iff ``m`` is within ``hops`` edges
    of ``n`` (``hops = 0``: the identity). ``adj`` is any matrix whose sparsity pattern is the
    graph's (e.g. the normalised adjacency, which includes self-loops)."""
    if hops < 0:
        raise ValueError(f"hops must be >= 0, got {hops}")
    n = adj.shape[0]
    loops = torch.arange(n, device=adj.device).repeat(2, 1)
    idx = adj.coalesce().indices() if adj.is_sparse else adj.nonzero().T

    def binary(indices: Tensor) -> Tensor:
        return torch.sparse_coo_tensor(indices, torch.ones(indices.shape[1], device=adj.device),
                                       (n, n), check_invariants=False).coalesce()

    step = binary(torch.cat([idx, loops], dim=1))
    field = binary(loops)
    with warnings.catch_warnings():  # sparse @ sparse goes through CSR, which warns "beta"
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(hops):
            field = binary((step @ field).coalesce().indices())
    return field


class NodeLoss:
    r"""Per-row loss for full-graph node classification with ``K`` graph copies.

    For copy ``k`` and node ``n`` the weight is

    .. math:: w_{kn} = \frac{N}{|T|} \sum_{m \in T,\ R_{mn} = 1} \ell(\text{out}_{km}, y_m)

    where ``T`` is the set of nodes selected by the mask and ``R = receptive_field(adj, hops)``.
    With ``hops`` at least the number of graph layers after the earliest site, the LR estimate
    is unbiased for the gradient of the mean loss over ``T``; the estimator's averaging over the
    ``K·N`` rows supplies the ``1/(K·N)``.

    Called as ``loss(outputs [K·N, C], (y [K·N], mask [K·N]))`` (targets replicated by the
    estimator), returns ``[K·N]``. Note that the mean of these weights (what
    ``loss_and_grads`` returns) is not the mean node loss; use :meth:`node_losses` for that.
    """

    def __init__(self, adj: Tensor, hops: int,
                 row_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        self.num_nodes = adj.shape[0]
        self.hops = hops
        self.field = receptive_field(adj, hops)
        self.row_loss = row_loss or (lambda out, y: F.cross_entropy(out, y, reduction="none"))

    def node_losses(self, out: Tensor, targets: tuple[Tensor, Tensor]) -> Tensor:
        """Per-node losses, zero outside the mask, ``[K·N]``."""
        y, mask = targets
        return self.row_loss(out, y) * mask.to(out.dtype)

    def __call__(self, out: Tensor, targets: tuple[Tensor, Tensor]) -> Tensor:
        n = self.num_nodes
        losses = self.node_losses(out, targets)
        k = losses.shape[0] // n
        labelled = targets[1][:n].sum().clamp(min=1).to(losses.dtype)
        field = self.field.to(losses.device, losses.dtype)
        weights = torch.sparse.mm(field.t(), losses.view(k, n).T).T  # [K, N]
        return (weights * (n / labelled)).reshape(-1)


class GraphConv(nn.Module):
    r"""GCN layer ``Â X W + b`` (Kipf & Welling 2017); ``Â`` given at call time.

    Shapes: ``x [K·N, in_features]`` and ``adj [N, N]`` (or block-diagonal ``[K·N, K·N]``),
    see :func:`propagate` -> ``[K·N, out_features]``. Weight ``[in, out]`` Glorot-uniform,
    bias zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        check_positive(in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        bound = math.sqrt(6.0 / (in_features + out_features))
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor, adj: Tensor | Shared) -> Tensor:
        out = propagate(adj, x @ self.weight)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class GCN(nn.Module):
    """Two (or more) GCN layers with ReLU in between, for node classification.

    Shapes: ``(x [N, in_features], adj [N, N])`` -> logits ``[N, num_classes]``; with ``K``
    copies from :func:`tile_graph`, ``[K·N, ...]`` rows. Sites: ``convs.0`` ... (one per layer).
    Train with ``replicate=tile_graph`` and ``NodeLoss(adj, hops=model.loss_hops)``.

    Args:
        in_features: features per node.
        num_classes: classes.
        hidden: widths of the hidden layers (default one of 16, as Kipf & Welling).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (16,)
                 ) -> None:
        super().__init__()
        hidden = as_widths(hidden)
        check_positive(in_features=in_features, num_classes=num_classes)
        self.in_features, self.num_classes = in_features, num_classes
        widths = (in_features, *hidden, num_classes)
        self.convs = nn.ModuleList(GraphConv(a, b) for a, b in zip(widths, widths[1:]))

    @property
    def loss_hops(self) -> int:
        """Receptive-field radius for :class:`NodeLoss` when every layer is a site."""
        return len(self.convs) - 1

    def forward(self, x: Tensor, adj: Tensor | Shared) -> Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, adj)
            if i < len(self.convs) - 1:
                x = torch.relu(x)
        return x

    def ulr_config(self) -> ULRConfig:
        """``sigma`` 0.1 and ``num_copies`` 64 for every layer (starting points)."""
        names = [f"convs.{i}" for i in range(len(self.convs))]
        return {"sigma": dict.fromkeys(names, _SIGMA), "num_copies": dict.fromkeys(names, _COPIES)}
