"""A zoo of small models of many families, for checking the estimator's defaults.

Not collected by pytest (no ``test_`` prefix); tests import it like ``conftest``
(``from zoo import ZOO``, the tests directory is on ``sys.path``) and
``benchmarks/defaults.py`` puts ``tests/`` on ``sys.path`` first.

``ZOO[name](seed)`` returns a :class:`Case`: a fresh model (torch's default initialisation
under ``torch.manual_seed(seed)``), a batch of inputs (a tensor, or a tuple of positional
arguments), its targets and a loss function returning one loss per row
(``reduction="none"``). Every model is deterministic (no dropout) and has no BatchNorm, so
train and eval mode give the same function.

:func:`cosines` runs one estimate and compares it, per parameter, with autograd's gradient of
the mean loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ulr


def defaults() -> dict[str, Any]:
    """Keyword arguments of ``ulr.LikelihoodRatio`` next to ``num_copies`` for "the defaults":
    none, since the library's defaults are the best measured configuration (iid copies, a
    leave-one-out baseline, a layer-wise plan, Gaussian σ = 0.1): every user of the zoo tests
    the bare ``LikelihoodRatio(model, num_copies=K)``."""
    return {}


def old_defaults() -> dict[str, Any]:
    """The library's defaults before issue 13, spelled out: one pass over all sites, no
    baseline (kept for the comparison column of benchmarks/defaults.py)."""
    return dict(sampler=ulr.iid(), baseline=ulr.baselines.none(), plan=ulr.plans.all_sites(),
                noise=ulr.Gaussian(0.1))


class Case(NamedTuple):
    model: nn.Module
    inputs: Any  # a batch-first tensor, or a tuple of positional arguments
    targets: Tensor
    loss_fn: Callable[[Any, Tensor], Tensor]


def ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out, y, reduction="none").mean(1)


B = 16  # examples per case


def _classify(model: nn.Module, inputs: Any, classes: int) -> Case:
    return Case(model, inputs, torch.randint(0, classes, (B,)), ce)


# -- families ---------------------------------------------------------------------------------

def mlp(seed: int) -> Case:
    """The conftest MLP: Linear/Tanh/Linear/ReLU/Linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 4))
    return _classify(model, torch.randn(B, 6), 4)


def cnn(seed: int) -> Case:
    """The conftest CNN: two Conv2d (one strided) and a Linear head."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
    )
    return _classify(model, torch.randn(B, 1, 6, 6), 3)


class Attention(nn.Module):
    """Linear embedding -> nn.MultiheadAttention (called with its defaults, so it also returns
    the attention weights) -> mean over the sequence -> Linear. With ``batch_first=False`` the
    module is fed the seq-first layout ``[L, B, E]`` it expects."""

    def __init__(self, batch_first: bool, n_in: int = 5, dim: int = 8, classes: int = 3):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(n_in, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=batch_first)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, L, n_in]
        h = torch.tanh(self.embed(x))
        if self.batch_first:
            a, _ = self.attn(h, h, h)
        else:
            s = h.transpose(0, 1)  # [L, B, E]
            a, _ = self.attn(s, s, s)
            a = a.transpose(0, 1)
        return self.head(a.mean(1))


def mha_batch_first(seed: int) -> Case:
    torch.manual_seed(seed)
    return _classify(Attention(batch_first=True), torch.randn(B, 5, 5), 3)


def mha_seq_first(seed: int) -> Case:
    torch.manual_seed(seed)
    return _classify(Attention(batch_first=False), torch.randn(B, 5, 5), 3)


class Encoder(nn.Module):
    def __init__(self, n_in: int = 5, dim: int = 16, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(n_in, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x)).mean(1))


def transformer_encoder(seed: int) -> Case:
    torch.manual_seed(seed)
    return _classify(Encoder(), torch.randn(B, 5, 5), 3)


class LSTMHead(nn.Module):
    """Fused 2-layer bidirectional nn.LSTM (batch-first); the head reads ``out`` averaged
    over time (the last step alone would leave the top reverse ``weight_hh`` without a
    gradient). The LSTM returns ``(out, (h_n, c_n))``: a nested tuple."""

    def __init__(self, n_in: int = 4, hidden: int = 8, classes: int = 3):
        super().__init__()
        self.rnn = nn.LSTM(n_in, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out.mean(1))


def lstm(seed: int) -> Case:
    torch.manual_seed(seed)
    return _classify(LSTMHead(), torch.randn(B, 6, 4), 3)


class GRUHead(nn.Module):
    """nn.GRU (batch_first=True); the head reads ``h_n``, which is ``[layers·dirs, B, H]``
    (not batch-first) whatever ``batch_first`` says."""

    def __init__(self, n_in: int = 4, hidden: int = 8, classes: int = 3):
        super().__init__()
        self.rnn = nn.GRU(n_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        _, h_n = self.rnn(x)
        return self.head(h_n[-1])


def gru_hn(seed: int) -> Case:
    torch.manual_seed(seed)
    return _classify(GRUHead(), torch.randn(B, 6, 4), 3)


class RNNSeqFirst(nn.Module):
    """nn.RNN with the default ``batch_first=False``: the model takes ``[B, T, F]`` and feeds
    the RNN ``[T, B, F]``; the head reads the last step of ``out`` (``[T, B, H]``)."""

    def __init__(self, n_in: int = 4, hidden: int = 8, classes: int = 3):
        super().__init__()
        self.rnn = nn.RNN(n_in, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.transpose(0, 1))
        return self.head(out[-1])


def rnn_seq_first(seed: int) -> Case:
    torch.manual_seed(seed)
    return _classify(RNNSeqFirst(), torch.randn(B, 6, 4), 3)


def depthwise_conv(seed: int) -> Case:
    """Depthwise (groups = channels) then pointwise convolution."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.ReLU(), nn.Conv2d(3, 6, 1), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 3),
    )
    return _classify(model, torch.randn(B, 3, 5, 5), 3)


def conv_transpose(seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.ConvTranspose2d(4, 2, 3, stride=2),
        nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3),
    )
    return _classify(model, torch.randn(B, 1, 5, 5), 3)


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear = nn.Bilinear(4, 5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bilinear(a, b)))


def bilinear(seed: int) -> Case:
    """nn.Bilinear of two inputs (passed as a tuple of positional arguments)."""
    torch.manual_seed(seed)
    return _classify(BilinearNet(), (torch.randn(B, 4), torch.randn(B, 5)), 3)


def prelu(seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.PReLU(16), nn.Linear(16, 4))
    return _classify(model, torch.randn(B, 6), 4)


class RootScales(nn.Module):
    """Bare nn.Parameters owned by the root module: a learned per-feature scale applied to the
    input before a Linear, and one applied to the output of the last Linear."""

    def __init__(self):
        super().__init__()
        self.in_scale = nn.Parameter(torch.rand(6) + 0.5)
        self.hidden = nn.Linear(6, 12)
        self.out = nn.Linear(12, 4)
        self.out_scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x * self.in_scale))) * self.out_scale


def root_parameter(seed: int) -> Case:
    torch.manual_seed(seed)
    return _classify(RootScales(), torch.randn(B, 6), 4)


def float64(seed: int) -> Case:
    """The conftest MLP in double precision, with double inputs."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 4)).double()
    return _classify(model, torch.randn(B, 6, dtype=torch.float64), 4)


class EmbedNorm(nn.Module):
    def __init__(self, vocab: int = 10, dim: int = 8, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.emb(tokens))).mean(1))


def embedding_layernorm(seed: int) -> Case:
    torch.manual_seed(seed)
    return _classify(EmbedNorm(), torch.randint(0, 10, (B, 5)), 3)


def groupnorm_conv(seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )
    return _classify(model, torch.randn(B, 2, 4, 4), 3)


def conv1d(seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(3, 6, 3), nn.ReLU(), nn.Conv1d(6, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(4 * 3, 3),
    )
    return _classify(model, torch.randn(B, 3, 10), 3)


def regression_mse(seed: int) -> Case:
    """Two regression outputs, the per-row mean squared error."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(B, 5)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], 1) + 0.1 * torch.randn(B, 2)
    return Case(model, x, y, mse)


ZOO: dict[str, Callable[[int], Case]] = {
    "mlp": mlp,
    "cnn": cnn,
    "mha-batch-first": mha_batch_first,
    "mha-seq-first": mha_seq_first,
    "transformer-encoder": transformer_encoder,
    "lstm-bidir-2layer": lstm,
    "gru-h_n": gru_hn,
    "rnn-seq-first": rnn_seq_first,
    "depthwise-conv": depthwise_conv,
    "conv-transpose": conv_transpose,
    "bilinear": bilinear,
    "prelu": prelu,
    "root-parameter": root_parameter,
    "float64": float64,
    "embedding-layernorm": embedding_layernorm,
    "groupnorm-conv": groupnorm_conv,
    "conv1d": conv1d,
    "regression-mse": regression_mse,
}


def digits_mlp(seed: int = 0, batch: int = 32) -> Case:
    """The model ``ulr train`` trains by default: ``ulr.models.build("mlp")`` (one hidden layer
    of 128 ReLU units) on the embedded digits data, here on the first ``batch`` (32, ulr
    train's default batch size) training examples."""
    ds = ulr.data.load("digits", seed=0)
    torch.manual_seed(seed)
    model = ulr.models.build("mlp", in_shape=ds.input_shape, num_classes=ds.num_classes)
    x, y = ds.train
    return Case(model, x[:batch], y[:batch], ce)


# -- measuring --------------------------------------------------------------------------------

def _args(inputs: Any) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def autograd_grads(case: Case) -> dict[str, Tensor]:
    """Autograd's gradient of the mean loss, per trainable parameter."""
    model = case.model
    model.zero_grad(set_to_none=True)
    case.loss_fn(model(*_args(case.inputs)), case.targets).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


class Measured(NamedTuple):
    cosine: dict[str, float]  # per parameter
    norm_ratio: dict[str, float]  # ||estimate|| / ||autograd||, per parameter
    missing: list[str]  # trainable parameters left without a gradient
    layer_cosine: dict[str, float]  # per module, its parameters concatenated (as ulr train's
    #                                 --diag-every groups them)
    forward_rows: int  # perturbed and clean rows the estimate ran, over all passes


def cosines(case: Case, num_copies: int, seed: int = 0, **kwargs: Any) -> Measured:
    """One estimate by ``ulr.LikelihoodRatio(model, num_copies=num_copies, **kwargs)`` (its
    generator seeded by ``torch.manual_seed(seed)``), compared per parameter with autograd's
    gradient of the mean loss."""
    truth = autograd_grads(case)
    model = case.model
    torch.manual_seed(seed)
    est = ulr.LikelihoodRatio(model, num_copies=num_copies, **kwargs)
    est.loss_and_grads(case.loss_fn, case.inputs, case.targets)
    cos, ratio, missing = {}, {}, []
    layers: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    for n, p in model.named_parameters():
        if n not in truth:
            continue
        if p.grad is None:
            missing.append(n)
            continue
        g, t = p.grad.flatten().double(), truth[n].flatten().double()
        cos[n] = F.cosine_similarity(g, t, dim=0).item()
        ratio[n] = (g.norm() / t.norm()).item()
        pair = layers.setdefault(n.rpartition(".")[0] or n, ([], []))
        pair[0].append(g)
        pair[1].append(t)
    model.zero_grad(set_to_none=True)
    layer_cos = {k: F.cosine_similarity(torch.cat(g), torch.cat(t), dim=0).item()
                 for k, (g, t) in layers.items()}
    return Measured(cos, ratio, missing, layer_cos, est.last_forward_rows)
