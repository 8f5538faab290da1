"""The training product behind ``ulr train``: a :class:`RunConfig` in, a trained run out.

Modules, one job each:

- :mod:`~ulr.train.config`: :class:`RunConfig`, its validation and its TOML files;
- :mod:`~ulr.train.recipes`: the one place where names become objects (estimators, backprop
  included, model, data, optimizer, schedule, loss, noise);
- :mod:`~ulr.train.bp_noise`: ``method="bp-noise"``, the training noise on the same sites;
- :mod:`~ulr.train.loop`: :func:`fit`, the one training loop;
- :mod:`~ulr.train.metrics`: evaluation, gradient diagnostics, memory, environment;
- :mod:`~ulr.train.rundir` and :mod:`~ulr.train.checkpoints`: the run directory's files;
- :mod:`~ulr.train.progress`: callbacks, console progress and comparison tables;
- :mod:`~ulr.train.runs`: the runs of one ``ulr train`` / ``ulr compare`` command;
- :mod:`~ulr.train.launch`: local processes for ``ulr train --nproc N``.

Example:
    >>> from ulr.train import RunConfig, fit
    >>> summary = fit(RunConfig(epochs=1, max_steps=2, threads=1))   # no run directory
    >>> summary["steps"]
    2
"""

from .bp_noise import NoiseInjection
from .checkpoints import RESUMABLE
from .config import ConfigError, RunConfig, keys
from .loop import TrainingInterrupted, fit
from .metrics import environment
from .progress import Callback, ConsoleProgress, format_table
from .recipes import build_estimator, build_model
from .rundir import CheckpointError, resume_config

__all__ = [
    "Callback",
    "CheckpointError",
    "ConfigError",
    "ConsoleProgress",
    "NoiseInjection",
    "RESUMABLE",
    "RunConfig",
    "TrainingInterrupted",
    "build_estimator",
    "build_model",
    "environment",
    "fit",
    "format_table",
    "keys",
    "resume_config",
]
