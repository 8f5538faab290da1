"""``ulr robust``: accuracy of trained models under adversarial attacks and natural corruptions.

**Attacks** (white box, computed with autograd on the evaluated model in ``eval()`` mode; they
attack the model, they do not train it):

* ``fgsm-linf`` / ``fgsm-l2``: one step of size ``eps`` along the sign of the input gradient of
  the cross-entropy (L∞), or along the gradient itself normalised to L2 length ``eps``;
* ``pgd-linf`` / ``pgd-l2``: projected gradient ascent (Madry et al. 2018): a random start
  uniform in the ball (optional), ``steps`` steps of size ``step_size · eps`` (default
  ``2.5 / steps``, so the walk can cross the ball), each followed by the projection onto the
  ball and the valid input range; per example the iterate that misclassifies (else the one with
  the largest loss) is kept, so more steps never weaken the attack. ``restarts`` repeats it.

**Budgets are relative to the data's value range** ``[lo, hi]`` (``[0, 1]`` for the image
datasets of :mod:`ulr.data`, which are not normalised; the observed training range otherwise):
an L∞ budget ``eps`` allows every input feature to move by ``eps · (hi - lo)``; an L2 budget
``eps`` allows a perturbation of Euclidean length ``eps · (hi - lo) · sqrt(d)`` for ``d`` input
features, i.e. an RMS change of ``eps · (hi - lo)`` per feature. (On 28×28 images in ``[0, 1]``,
L2 ``eps = 0.1`` is a radius of 2.8.) Adversarial inputs are always clipped to ``[lo, hi]``.

**Corruptions** (severities 1-5; the random ones draw from a generator seeded by ``seed`` and
the corruption's name only, so the same seed gives the same noise at every severity, and the
distortion grows with the severity for every example):

==================  ========================================================================
``gaussian-noise``   add ``N(0, s²)``, ``s = (0.04, 0.08, 0.12, 0.18, 0.26) · (hi - lo)``; clip
``impulse-noise``    salt and pepper: a share ``p = (0.01, 0.03, 0.06, 0.10, 0.17)`` of the
                     features is set to ``lo`` or ``hi`` (half each)
``blur``             Gaussian blur over the last two (images) or last one (signals) dimensions,
                     ``σ = (0.5, 0.75, 1, 1.5, 2)`` pixels, edge values repeated
``contrast``         ``x → m + c·(x - m)`` with ``m`` the example's mean and
                     ``c = (0.8, 0.6, 0.45, 0.3, 0.2)``
==================  ========================================================================

Models whose input gradient does not exist or is zero (sign/Heaviside units, spiking LIF
neurons without a surrogate, a numpy black box) cannot be attacked by gradient:
:func:`evaluate` raises :class:`NotDifferentiableError`. The documented fallback is a
**transfer attack**: pass a differentiable surrogate (``--transfer-from RUN``, e.g. the same
architecture trained by backprop); the adversarial inputs are computed on it and the target is
evaluated on them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ulr.evaluate.robust import evaluate
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    >>> x, y = torch.rand(50, 1, 8, 8), torch.randint(0, 10, (50,))
    >>> rows = evaluate(model, x, y, attacks=["pgd-linf"], eps=[0.1], corruptions=["blur"],
    ...                 severities=[1, 5])
    >>> [r["condition"] for r in rows]
    ['clean', 'pgd-linf eps=0.1', 'blur s=1', 'blur s=5']

The package, one job per module:

- :mod:`.conditions`: the attack and corruption names, budgets, severities, shared checks;
- :mod:`.attacks`: FGSM, PGD and the check that a model has an input gradient;
- :mod:`.corruptions`: the corruptions;
- :mod:`.evaluation`: :func:`evaluate`, the loop over conditions;
- :mod:`.loading`: :func:`load`, a trained model and its data from a run directory;
- :mod:`.report`: tables and the plot;
- :mod:`.cli`: the ``ulr robust`` command line (:func:`parser`, :func:`main`).
"""

from .attacks import NotDifferentiableError, fgsm, pgd, radius
from .cli import main, parser, run
from .conditions import ATTACKS, CORRUPTIONS, DEFAULT_EPS, SEVERITIES
from .corruptions import corrupt
from .evaluation import evaluate
from .loading import Loaded, load, value_range
from .report import condition_names, format_markdown, format_table, plot

__all__ = [
    "ATTACKS",
    "CORRUPTIONS",
    "DEFAULT_EPS",
    "SEVERITIES",
    "Loaded",
    "NotDifferentiableError",
    "condition_names",
    "corrupt",
    "evaluate",
    "fgsm",
    "format_markdown",
    "format_table",
    "load",
    "main",
    "parser",
    "pgd",
    "plot",
    "radius",
    "run",
    "value_range",
]

