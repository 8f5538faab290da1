"""Reporting a run: the :class:`Callback` hooks of :func:`~ulr.train.fit`, the console
progress (:class:`ConsoleProgress`) and the comparison table of run summaries
(:func:`format_table`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from .custom import display_name

__all__ = ["Callback", "ConsoleProgress", "format_table"]


class Callback:
    """Hooks called by :func:`fit`; override the ones you need. Rows are the dicts written to
    ``metrics.jsonl`` (see the module docstring)."""

    def on_train_start(self, info: dict[str, Any]) -> None:
        """Before the first step. ``info``: config, label, steps_per_epoch, total_steps,
        start_step, start_epoch, num_params, environment, run_dir."""

    def on_epoch_start(self, epoch: int, num_steps: int) -> None:
        """Before epoch ``epoch`` (1-based) of ``num_steps`` steps (fewer after a resume)."""

    def on_step(self, row: dict[str, Any]) -> None:
        """After each optimizer step."""

    def on_diag(self, row: dict[str, Any]) -> None:
        """After each gradient diagnostic."""

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        """After each evaluation (``row["partial"]`` when ``max_steps`` ended an epoch)."""

    def on_train_end(self, summary: dict[str, Any]) -> None:
        """After the run, with the summary that :func:`fit` returns."""



def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A plain-text table comparing run summaries (as :func:`fit` returns), one row per run.

    Classification runs show test accuracy after the last epoch, the best validation accuracy
    (and its epoch) with the test accuracy at that epoch; regression runs the same for the
    loss (MSE). Then wall time (whole run), training time (optimizer steps only), steps,
    forward passes and rows (examples x copies), the peak allocation of a training step
    (*step alloc MB*: the estimator's working memory, measured on two steps, ``GPU`` for CUDA
    runs; ``-`` for runs recorded before it was measured) and the process's peak (*process
    MB*: resident memory on the CPU, allocated GPU memory marked ``GPU`` for CUDA runs).
    """
    regression = bool(summaries) and all(s.get("task") == "regression" for s in summaries)
    head = (["run", "test MSE", "best val MSE (ep)", "test MSE @best"] if regression else
            ["run", "test acc", "best val acc (ep)", "test acc @best"])
    head += ["wall s", "train s", "steps", "fwd passes", "fwd rows", "step alloc MB",
             "process MB"]
    lines = []
    for s in summaries:
        final, best = s.get("final") or {}, s.get("best") or {}
        if regression:
            cells = [_num(final.get("test_loss")),
                     f"{_num(best.get('val_loss'))} ({best.get('epoch', '-')})" if best else "-",
                     _num(best.get("test_loss"))]
        else:
            cells = [_pct(final.get("test_acc")),
                     f"{_pct(best.get('val_acc'))} ({best.get('epoch', '-')})" if best else "-",
                     _pct(best.get("test_acc"))]
        gpu = s.get("peak_cuda_mb")
        peak = f"{gpu:.0f} GPU" if gpu is not None else _num(s.get("peak_rss_mb"), ".0f")
        step = _num(s.get("step_peak_mb"), ".2f")
        if gpu is not None and step != "-":
            step += " GPU"
        lines.append([str(s.get("label", s.get("method", "?"))), *cells,
                      _num(s.get("wall_time_s"), ".1f"), _num(s.get("train_time_s"), ".1f"),
                      str(s.get("steps", "-")), _count(s.get("forward_passes")),
                      _count(s.get("forward_rows")), step, peak])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *map(fmt, lines)])


#: Peers that need far more epochs than ULR, and what they reached on the digits MLP (batch 32,
#: ``ulr train --method M --epochs E --lr LR``): at the defaults (30 epochs, lr 1e-3) 61-62%,
#: 5 epochs 13-14%; 60 epochs at 3e-3 84-85%; 120 epochs at 3e-3 91% (1e-2 is worse). ULR:
#: 98% in 30 epochs. Each epoch of these costs ~0.05 s, so 120 epochs take ~5 s.
SLOW_PEERS = {"spsa": "SPSA", "forward-gradient": "forward gradient"}
SLOW_PEER_EPOCHS, SLOW_PEER_LR = 120, 3e-3


def slow_peer_hint(config: Any) -> str | None:
    """A one-line hint for a peer run that will look broken at its settings (``None`` when
    the run already has the epochs and learning rate it needs)."""
    name = SLOW_PEERS.get(config.method)
    lr = config.lr if config.lr is not None else config.resolved_lr
    if name is None or (config.epochs >= SLOW_PEER_EPOCHS and lr >= SLOW_PEER_LR):
        return None
    return (f"hint: {name} takes one random direction per step and needs many more epochs "
            f"than ULR: on the digits MLP 5 epochs reach 13%, 30 at lr 1e-3 62%, "
            f"{SLOW_PEER_EPOCHS} at --lr {SLOW_PEER_LR:g} 91% (ULR: 98% in 30); try "
            f"--epochs {SLOW_PEER_EPOCHS} --lr {SLOW_PEER_LR:g}")


#: seconds between step lines when no progress bar shows and log_every is not set
LOG_SECONDS = 60.0


class ConsoleProgress(Callback):
    """A tqdm progress bar over the run (loss, accuracy, samples/s) and one line per epoch.

    Args:
        label: prefix of every line, e.g. the method.
        quiet: print nothing at all.
        bar: ``None`` shows the bar only when stderr is a terminal; ``False`` never.
        file: where epoch lines go (default ``sys.stdout``).
        log_every: a step line (loss, accuracy, samples/s, ETA) every N steps; 0 never;
            ``None``: every :data:`LOG_SECONDS` of wall time while no bar shows.
    """

    def __init__(self, label: str = "", *, quiet: bool = False, bar: bool | None = None,
                 file: Any = None, log_every: int | None = None) -> None:
        self.label, self.quiet, self.show_bar, self.file = label, quiet, bar, file
        self.log_every = log_every
        self.total = self.start_step = 0
        self.started = self.logged = time.perf_counter()
        self.bar: Any = None
        self.epochs = 0
        self.speed: float | None = None
        self.cosine: float | None = None

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        out = self.file or sys.stdout
        if self.bar is not None:
            self.bar.write(text, file=out)
        else:
            print(text, file=out, flush=True)

    def on_train_start(self, info: dict[str, Any]) -> None:
        config = info["config"]
        self.epochs = config.epochs
        self.label = self.label or info["label"]
        start = f" (resumed at step {info['start_step']})" if info["start_step"] else ""
        threads = info["environment"]["threads"]
        self.total, self.start_step = info["total_steps"], info["start_step"]
        self.started = self.logged = time.perf_counter()
        self._print(f"[{self.label}] {display_name(config.model)} on "
                    f"{display_name(config.data)}, {info['num_params']:,} "
                    f"parameters, {info['steps_per_epoch']} steps/epoch, device "
                    f"{info['environment']['device']}, {threads} "
                    f"thread{'s' if threads != 1 else ''}{start}")
        hint = slow_peer_hint(config)
        if hint is not None and not info["start_step"]:
            self._print(f"[{self.label}] {hint}")
        if self.quiet or self.show_bar is False:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=info["total_steps"], initial=info["start_step"],
                        desc=self.label, unit="step", dynamic_ncols=True, leave=True,
                        disable=None if self.show_bar is None else not self.show_bar)

    def on_step(self, row: dict[str, Any]) -> None:
        if row["samples_per_s"] is not None:
            s = row["samples_per_s"]
            self.speed = s if self.speed is None else 0.9 * self.speed + 0.1 * s
        if self._log_due(row["step"]):
            self._print(self._step_line(row))
        if self.bar is None:
            return
        post = {"loss": f"{row['loss']:.3f}"}
        if row["acc"] is not None:
            post["acc"] = f"{100 * row['acc']:.1f}%"
        if self.speed is not None:
            post["samples/s"] = f"{self.speed:,.0f}"
        if self.cosine is not None:
            post["cos"] = f"{self.cosine:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def _log_due(self, step: int) -> bool:
        if self.quiet:
            return False
        if self.log_every is not None:
            return self.log_every > 0 and step % self.log_every == 0
        hidden = self.bar is None or getattr(self.bar, "disable", False)
        return hidden and time.perf_counter() - self.logged >= LOG_SECONDS

    def _step_line(self, row: dict[str, Any]) -> str:
        now = time.perf_counter()
        self.logged = now
        step, done = row["step"], row["step"] - self.start_step
        parts = [f"[{self.label}] step {step}/{self.total}", f"loss {row['loss']:.4f}"]
        if row["acc"] is not None:
            parts.append(f"acc {100 * row['acc']:.1f}%")
        if self.speed is not None:
            parts.append(f"{self.speed:,.0f} samples/s")
        if done > 0 and self.total > step:
            eta = (now - self.started) / done * (self.total - step)
            parts.append(f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:"
                         f"{int(eta % 60):02d}")
        return "  ".join(parts)

    def on_diag(self, row: dict[str, Any]) -> None:
        self.cosine = row["cosine_all"]

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        ep = f"epoch {row['epoch']:>{len(str(self.epochs))}}/{self.epochs}"
        if row.get("partial"):
            ep += " (partial)"
        parts = [f"[{self.label}] {ep}", f"loss {_num(row['train_loss'])}"]
        if row["train_acc"] is not None:
            parts.append(f"train acc {_pct(row['train_acc'])}")
        if row["val_acc"] is not None or row["test_acc"] is not None:
            parts += [f"val acc {_pct(row['val_acc'])}", f"test acc {_pct(row['test_acc'])}"]
        else:
            parts += [f"val MSE {_num(row['val_loss'])}", f"test MSE {_num(row['test_loss'])}"]
        speed = row["samples"] / row["train_time_s"] if row["train_time_s"] else 0.0
        parts += [f"lr {row['lr']:.2g}", f"{row['wall_time_s']:.1f} s", f"{speed:,.0f} samples/s"]
        self._print("  ".join(parts))

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
