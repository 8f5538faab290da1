"""WordNet noun glosses labelled with their supersense: a real text classification task offline.

Every noun synset of WordNet 3.0 has a gloss (a short definition) and belongs to one of 26
*lexicographer files* -- its supersense: ``noun.animal``, ``noun.artifact``, ``noun.person``,
... (file ids 03-28 in ``data.noun``). The task is to predict the supersense from the gloss::

    "a plant or animal that is atypically small"   -> noun.Tops
    "an organism that depends on complex organic substances for nutrition" -> noun.Tops

The file is the Debian/Ubuntu package ``wordnet-base``
(``apt-get install wordnet-base`` puts it at ``/usr/share/wordnet/data.noun``; 82,115 synsets).
``$ULR_WORDNET_DIR`` or the ``root`` argument point elsewhere (a directory holding
``data.noun``, e.g. the ``dict/`` folder of a WordNet 3.0 download).

Example:
    >>> from ulr.data.wordnet import load_wordnet
    >>> ds = load_wordnet(max_examples=1000, seed=0)   # doctest: +SKIP
    >>> texts, labels = ds.train                       # doctest: +SKIP
    >>> len(ds.classes)                                # doctest: +SKIP
    26
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._dataset import stratified_split

__all__ = [
    "APT_PACKAGE",
    "ENV_VAR",
    "SUPERSENSES",
    "SYSTEM_DIR",
    "TextDataset",
    "find_data_noun",
    "load_wordnet",
    "parse_data_noun",
]

APT_PACKAGE = "wordnet-base"
ENV_VAR = "ULR_WORDNET_DIR"
SYSTEM_DIR = Path("/usr/share/wordnet")

#: Supersense names in label order: label ``i`` is lexicographer file ``i + 3``.
SUPERSENSES: tuple[str, ...] = (
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
    "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food",
    "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity",
    "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
)
_FIRST_LEX_FILE = 3

TextSplit = tuple[list[str], Tensor]


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with integer labels and fixed train/val/test splits.

    Every split is ``(texts, labels)``: a list of ``N`` strings and an ``int64`` tensor of shape
    ``[N]`` with values in ``[0, len(classes))``.
    """

    name: str
    train: TextSplit
    val: TextSplit
    test: TextSplit
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(s[0])}" for k, s in
                          (("train", self.train), ("val", self.val), ("test", self.test)))
        return f"TextDataset(name={self.name!r}, {sizes}, num_classes={self.num_classes})"


def find_data_noun(root: str | os.PathLike | None = None) -> Path:
    """Where ``data.noun`` is: ``root`` if given, else ``$ULR_WORDNET_DIR``, else
    ``/usr/share/wordnet``. Raises ``FileNotFoundError`` saying how to install it."""
    if root is not None:
        candidates = [Path(root)]
    else:
        candidates = ([Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []) + [SYSTEM_DIR]
    for d in candidates:
        f = d if d.name == "data.noun" else d / "data.noun"
        if f.is_file():
            return f
    where = ", ".join(str(d) for d in candidates)
    raise FileNotFoundError(
        f"WordNet noun data (data.noun) not found in {where}. Install the Debian/Ubuntu package "
        f"with `sudo apt-get install {APT_PACKAGE}` (it puts the file under {SYSTEM_DIR}), or "
        f"pass root= / set ${ENV_VAR} to a directory holding a WordNet 3.0 data.noun"
    )


def parse_data_noun(path: str | os.PathLike, *, examples: bool = False
                    ) -> tuple[list[str], np.ndarray]:
    """Parse a WordNet ``data.noun`` file into ``(glosses, labels)``.

    A synset line is ``offset lex_filenum n w_cnt word lex_id ... | gloss``; the license header
    lines start with spaces. The label is ``lex_filenum - 3`` (see :data:`SUPERSENSES`).
    With ``examples=False`` the quoted usage examples after the definition are dropped
    (``'a light meal; "we had a snack"'`` -> ``'a light meal'``).
    """
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith(" ") or not line.strip():
                continue
            head, sep, gloss = line.partition("|")
            fields = head.split()
            if not sep or len(fields) < 3 or fields[2] != "n":
                raise ValueError(f"{path}:{lineno}: not a WordNet noun synset line: "
                                 f"{line[:60]!r}; is this WordNet 3.0's data.noun?")
            label = int(fields[1]) - _FIRST_LEX_FILE
            if not 0 <= label < len(SUPERSENSES):
                raise ValueError(f"{path}:{lineno}: lexicographer file {fields[1]} is not a "
                                 f"noun supersense (03-28)")
            gloss = gloss.strip()
            if not examples:
                gloss = gloss.split('; "')[0].strip()
            texts.append(gloss)
            labels.append(label)
    if not texts:
        raise ValueError(f"{path} holds no noun synsets")
    return texts, np.asarray(labels, dtype=np.int64)


def load_wordnet(*, root: str | os.PathLike | None = None, max_examples: int | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                 examples: bool = False) -> TextDataset:
    """WordNet noun glosses -> supersense (26 classes), split by a fixed seed.

    Args:
        root: a directory holding ``data.noun`` (default: see :func:`find_data_noun`).
        max_examples: keep a random subset of this many synsets (drawn with ``seed``) before
            splitting; ``None`` keeps all 82,115.
        val_fraction, test_fraction: share of each class held out for validation / test
            (stratified; the rest is the training split).
        seed: seed of the subset and of the splits.
        examples: keep the quoted usage examples in the glosses.

    Returns:
        a :class:`TextDataset` whose splits are ``(list of glosses, int64 labels [N])``.
    """
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1
            and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be "
                         f"in [0, 1) and sum to less than 1")
    texts, labels = parse_data_noun(find_data_noun(root), examples=examples)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(texts))
    if max_examples is not None and max_examples < len(texts):
        idx = np.sort(rng.permutation(len(texts))[:max_examples])
    y = labels[idx]
    rest, test = stratified_split(y, test_fraction, rng)
    train, val = stratified_split(y[rest], val_fraction / (1 - test_fraction), rng)
    train, val = rest[train], rest[val]

    def split(sel: np.ndarray) -> TextSplit:
        return [texts[i] for i in idx[sel]], torch.as_tensor(y[sel], dtype=torch.int64)

    return TextDataset("wordnet", split(train), split(val), split(test), SUPERSENSES)
