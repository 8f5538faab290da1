"""A small Transformer encoder classifier whose every parametrised piece is a ULR site.

Pre-LayerNorm encoder blocks (Xiong et al. 2020) with hand-written multi-head attention, so that
the query/key/value/output projections are plain ``nn.Linear`` modules (closed-form sites). The
softmax attention, GELU and residual additions hold no parameters and are never differentiated.
The LayerNorms and the embedding's positional table own parameters: their sites are their own
outputs, and their gradients are the autograd VJP of that one module (its input is detached by
the upstream sites), so no backward pass crosses a layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sites import named_param_owners
from ._common import ULRConfig, check_positive

_SIGMA = 0.05
_COPIES = 64


class TokenEmbedding(nn.Module):
    """``x_t W + b + p_t``: a Linear embedding of continuous tokens plus a learned position
    table. Shapes ``[N, T, F] -> [N, T, d_model]``. Sites: ``proj`` and this module (whose own
    parameter is the position table ``pos [max_len, d_model]``)."""

    def __init__(self, in_features: int, d_model: int, max_len: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.pos.shape[0]:
            raise ValueError(f"sequence of {t} tokens is longer than max_len={self.pos.shape[0]}")
        return self.proj(x) + self.pos[:t]


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with separate ``q``, ``k`` (no bias),
    ``v``, ``out`` Linear projections (each a site). Shapes ``[N, T, d] -> [N, T, d]``."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q, self.v = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        # No key bias: it adds q·b to every score of a query, which the softmax cancels, so its
        # gradient is exactly zero (an ULR estimate of it would be pure noise).
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        h = self.num_heads

        def heads(u: Tensor) -> Tensor:
            return u.view(n, t, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    """``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` with a GELU MLP of width ``mlp_ratio·d``."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TransformerClassifier(nn.Module):
    """Encoder-only Transformer over a sequence of continuous tokens, mean-pooled.

    Shapes: ``(B, T, F)`` (e.g. the 8 rows of a digit as 8 tokens of 8 features) ->
    ``(B, num_classes)``.

    Sites (param owners): ``embed``, ``embed.proj``, per block ``blocks.i.norm1``,
    ``blocks.i.attn.{q,k,v,out}``, ``blocks.i.norm2``, ``blocks.i.fc1``, ``blocks.i.fc2``;
    then ``norm`` and ``head``.

    Args:
        in_features: features per token.
        num_classes: output units.
        max_len: longest sequence.
        d_model: width.
        num_heads: attention heads.
        num_layers: encoder blocks.
        mlp_ratio: MLP width / ``d_model``.

    Example:
        >>> TransformerClassifier(8, 10, max_len=8, d_model=16)(torch.zeros(2, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_features: int, num_classes: int, max_len: int = 64,
                 d_model: int = 32, num_heads: int = 4, num_layers: int = 1,
                 mlp_ratio: int = 2) -> None:
        super().__init__()
        check_positive(in_features=in_features, num_classes=num_classes, max_len=max_len,
                       d_model=d_model, num_heads=num_heads, num_layers=num_layers)
        self.in_features, self.num_classes = in_features, num_classes
        self.embed = TokenEmbedding(in_features, d_model, max_len)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, num_heads, mlp_ratio)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, T, F)`` to ``(B, num_classes)``."""
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))

    def ulr_config(self) -> ULRConfig:
        """``sigma`` 0.05 and ``num_copies`` 64 for every site (starting points)."""
        owners = [n for n, _ in named_param_owners(self, trainable=False)]
        return {"sigma": dict.fromkeys(owners, _SIGMA),
                "num_copies": dict.fromkeys(owners, _COPIES)}
