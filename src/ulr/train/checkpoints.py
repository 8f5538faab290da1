"""Checkpoints of a run: what ``checkpoint.pt`` and ``best.pt`` hold, and the checks before a
run resumes from one.

``checkpoint.pt`` is replaced atomically after every epoch (and at ``max_steps``, and inside an
epoch every ``checkpoint_every`` steps or 10 minutes): model, optimizer, scheduler, estimator
state, data-order generator, global RNG, counters and the epoch history, so that a resumed run
continues bit-identically on the same device and thread count. ``best.pt`` keeps the model and
config of the epoch of best validation score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import STEP_SCHEDULES, RunConfig
from .rundir import CHECKPOINT, CheckpointError

__all__ = ["RESUMABLE", "load", "restore", "state"]

FORMAT = "ulr-run-checkpoint"
FORMAT_VERSION = 1

#: Config fields that ``--resume`` may change; any other change makes a different run.
RESUMABLE = ("epochs", "max_steps", "threads", "diag_every", "eval_batch_size", "workers",
             "log_every", "checkpoint_every", "early_stop", "tensorboard")


def state(config: RunConfig, model: nn.Module, **parts: Any) -> dict[str, Any]:
    """A checkpoint: the format, the config, the model's weights and ``parts`` (for
    ``checkpoint.pt``: optimizer, scheduler, estimator, noise_injection, data_generator,
    global_rng, cuda_rng, progress; for ``best.pt``: kind and best; for both: model_source,
    how to rebuild the model without its data, see :func:`ulr.train.recipes.model_record`)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **parts.pop("head", {}),
            "config": config.to_dict(), "model": model.state_dict(), **parts}


def read_weights(file: Path) -> tuple[RunConfig, dict[str, Any], dict[str, Any]]:
    """``(config, model state, the whole checkpoint)`` of a ``checkpoint.pt`` / ``best.pt``, for
    the readers that rebuild a trained model (:func:`ulr.load_run`, ``ulr robust``).

    Raises:
        ValueError: a file that is not a readable ``ulr train`` checkpoint.
    """
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
        config = RunConfig.from_dict(ckpt["config"], source=f"{file} config")
        return config, ckpt["model"], ckpt
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"{file} is not a readable ulr train checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} -> {db[k]!r}" for k in da if k not in RESUMABLE and da[k] != db[k]]


def load(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    """The checkpoint of ``run_dir``, checked against ``config`` (which may differ from the
    stored one only in :data:`RESUMABLE` fields).

    Raises:
        CheckpointError: no checkpoint, a damaged or foreign one, or a different config.
    """
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: it has no {CHECKPOINT}; start a new run "
                              f"(without --resume) or pass the directory of an earlier run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"cannot resume {run_dir}: {path} is corrupt or unreadable ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); nothing was changed. Start a new run "
            f"with another --out"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"cannot resume {run_dir}: {path} is not a ulr train checkpoint; "
                              f"nothing was changed")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"cannot resume {run_dir}: checkpoint format version "
                              f"{ckpt.get('format_version')} is not {FORMAT_VERSION}")
    try:
        saved = RunConfig.from_dict(ckpt["config"], source=f"{path} config")
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot resume {run_dir}: the checkpoint's config is invalid "
                              f"({e}); nothing was changed") from None
    diff = _config_diff(saved, config)
    if diff:
        raise CheckpointError(
            f"cannot resume {run_dir}: the checkpoint was made with a different config "
            f"({'; '.join(diff)}). Only {', '.join(RESUMABLE)} may change on resume; nothing "
            f"was changed. Start a new run with another --out for a different config"
        )
    if config.schedule in ("cosine", *STEP_SCHEDULES) and config.epochs != saved.epochs:
        raise CheckpointError(
            f"cannot resume {run_dir} with epochs={config.epochs}: its {config.schedule} "
            f"schedule anneals "
            f"over epochs={saved.epochs}, so changing it would change the schedule of the epochs "
            f"already trained; nothing was changed. Start a new run"
        )
    return ckpt


def restore(ckpt: dict[str, Any], run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
            sched: Any, est: Any) -> None:
    """Load the model, optimizer, scheduler and estimator states of ``ckpt``.

    Raises:
        CheckpointError: the checkpoint does not fit them.
    """
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        if ckpt["estimator"] is not None:  # None: backprop, which has no state
            est.load_state_dict(ckpt["estimator"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"cannot resume {run_dir}: the checkpoint does not fit this model/optimizer "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); nothing was changed"
        ) from None
