"""``ulr bench``: ULR side by side with backprop, ES, SPSA/MeZO, forward gradient and, when
``evotorch`` is installed, EvoTorch's PGPE and SNES (:mod:`.evotorch_peers`; skipped with the
reason otherwise).

One run measures, on one machine and in one process, and writes one report
(``peers-report.md``, ``peers-report.json`` and ``peers-*.png`` under ``--out``):

* **gradient quality** — per-layer cosine between each estimate and the exact minibatch gradient
  (backprop) against the forward rows spent, on an MLP (digits) and LeNet-5 (MNIST subset), at
  initialisation and after a short backprop warm-up;
* **time-to-accuracy** — test accuracy against training time and against forward rows, with the
  same model, initial weights, data order and time budget for every method, each method's Adam
  learning rate tuned on a small grid (chosen on validation accuracy of seed 0);
* **cost** — time per step, forward rows per step and peak memory per step;
* **robustness** — every number over 3 seeds (mean ± sample standard deviation).

Forward rows count as in :class:`ulr.LikelihoodRatio`: examples × forward evaluations (the clean
discovery pass, every perturbed copy, every ES member, both SPSA points, every JVP).

Training time is the **CPU time** of this process spent in ``loss_and_grads`` + ``step`` with
one torch thread: it equals wall time on an idle core and, unlike wall time, does not depend on
what else runs on a shared machine. Evaluation is not counted.

Run ``ulr bench --out docs/results`` (or ``python -m ulr.evaluate.bench``), ``--quick`` for a
reduced version, ``--smoke`` for a seconds-long check. ``benchmarks/peers_quality.py`` and
``benchmarks/peers_training.py`` run one part each.

The package, one job per module: :mod:`.methods` (the estimators and their sizes),
:mod:`.settings` (what a run depends on), :mod:`.harness` (the shared run machinery: data,
initial weights, generators, statistics), one module per part (:mod:`.quality`, :mod:`.tta`,
:mod:`.cost`), :mod:`.report` (markdown, JSON, figures) and :mod:`.cli` (running the parts,
the command line).
"""

from .cli import PARTS, main, parser, run, settings_from
from .cost import cost, peak_step_memory
from .harness import BATCH, ce, initial_model
from .methods import METHODS, Method, build_estimator, describe
from .quality import gradient_quality, quality_floor, summarize_quality
from .report import floors, machine, write_report
from .settings import Settings
from .tta import LR_LADDER, choose_lr, summarize_tta, time_to_accuracy, train_run, train_step

__all__ = [
    "BATCH",
    "LR_LADDER",
    "METHODS",
    "PARTS",
    "Method",
    "Settings",
    "build_estimator",
    "ce",
    "choose_lr",
    "cost",
    "describe",
    "floors",
    "gradient_quality",
    "initial_model",
    "machine",
    "main",
    "parser",
    "peak_step_memory",
    "quality_floor",
    "run",
    "settings_from",
    "summarize_quality",
    "summarize_tta",
    "time_to_accuracy",
    "train_run",
    "train_step",
    "write_report",
]
