"""Two hand-written models that the estimator tests share (not collected: no ``test_`` prefix;
import it like ``conftest``, ``from toy_models import Block, Cell``): a block with no closed form
anywhere, and an RNN cell whose pre-activation is a mark.
"""

import torch
from torch import nn

import ulr


class Block(nn.Module):
    """LayerNorm + attention-like mixing + an owned scale: no closed form anywhere."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.norm(self.emb(tokens))
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h * self.scale).mean(1))


class Cell(nn.Module):
    """A hand-written RNN: the Linear modules are used at every step; the pre-activation of
    each step is a mark, so no backward runs through time."""

    def __init__(self, n_in=3, n_h=8, n_out=2):
        super().__init__()
        self.wx, self.wh = nn.Linear(n_in, n_h), nn.Linear(n_h, n_h)
        self.out = nn.Linear(n_h, n_out)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.wh.in_features)
        for t in range(x.shape[1]):
            h = torch.tanh(ulr.perturb("pre", self.wx(x[:, t]) + self.wh(h)))
        return self.out(h)
