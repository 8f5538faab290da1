"""Local processes for ``ulr train --nproc N``: :func:`launch` starts ``N`` ranks that share a
process group (a file store, so no port is needed), and :func:`run_command` runs one ``ulr``
command that way, turning the ranks' failures into an exit code."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import DEFAULT_TIMEOUT_S, init_from_env

__all__ = ["launch", "run_command"]


def _entry(local_rank: int, fn: Callable, nprocs: int, store: str, backend: str,
           timeout_s: float, args: tuple, result_dir: str | None) -> None:
    # A process group of its own: a Ctrl-C at the terminal reaches the launcher only, which
    # passes it on once to every rank (see launch), as a kill of the launcher's pid does.
    with contextlib.suppress(OSError):
        os.setpgrp()
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                       "WORLD_SIZE": str(nprocs), "ULR_DIST_INIT": f"file://{store}",
                       "ULR_DIST_TIMEOUT": str(timeout_s)})
    init_from_env(backend, timeout_s=timeout_s)
    try:
        out = fn(local_rank, nprocs, *args)
        if result_dir is not None:
            torch.save(out, os.path.join(result_dir, f"rank{local_rank}.pt"))
        # No rank closes its connections while a peer may still be reading its last message.
        dist.barrier()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    # The work is done and saved: leave without the interpreter's teardown, during which the
    # communication library's background threads have been seen to abort a finished process
    # ("terminate called without an active exception"), failing a run that succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, backend: str | None = None,
           timeout_s: float = DEFAULT_TIMEOUT_S, deadline_s: float | None = None,
           results: bool = True) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh local processes that share a
    process group (a file store, so no port is needed), and return their results by rank.

    ``fn`` must be importable (a module-level function); its results are passed back through
    ``torch.save`` (``results=False`` skips that). A collective fails after ``timeout_s``
    instead of hanging; with ``deadline_s`` the launcher terminates every process and raises
    ``TimeoutError`` once that much time has passed. On Ctrl-C the launcher passes the signal
    to every process once (they run in process groups of their own, so a terminal's Ctrl-C and
    a ``kill -INT`` of the launcher act alike); they have 30 s to save and exit before they are
    terminated.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (its traceback is in the
            message); the other ranks are terminated.
        torch.multiprocessing.ProcessExitedException: a rank exited with a non-zero code.
    """
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run one process")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    tmp = tempfile.mkdtemp(prefix="ulr-dist-")
    try:
        result_dir = tmp if results else None
        ctx = mp.start_processes(
            _entry, args=(fn, nprocs, os.path.join(tmp, "store"), backend, timeout_s, args,
                          result_dir),
            nprocs=nprocs, join=False, start_method="spawn")
        deadline = time.monotonic() + (deadline_s if deadline_s is not None else float("inf"))
        try:
            while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the {nprocs} processes did not finish within "
                                       f"{deadline_s:.0f} s; they were terminated")
        except KeyboardInterrupt:
            for p in ctx.processes:  # each rank saves its checkpoint and exits
                if p.is_alive():
                    with contextlib.suppress(OSError):
                        os.kill(p.pid, signal.SIGINT)
            grace = time.monotonic() + 30
            for p in ctx.processes:
                p.join(max(0.0, grace - time.monotonic()))
            raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
                    if p.is_alive():
                        p.kill()
        if not results:
            return [None] * nprocs
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                for r in range(nprocs)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_command(target: Callable[[int, int, list[str]], None], nproc: int,
                argv: list[str]) -> int:
    """Run ``target(rank, world_size, argv)`` (a module-level function that runs the command
    ``argv``) on ``nproc`` local processes; returns the exit code (1 when a process failed or
    ran past ``ULR_DIST_DEADLINE`` seconds)."""
    import torch.multiprocessing as mp

    deadline = os.environ.get("ULR_DIST_DEADLINE")  # seconds; for tests and batch jobs
    try:
        launch(target, nproc, argv, results=False,
               deadline_s=float(deadline) if deadline else None)
    except TimeoutError as e:
        print(f"ulr train: error: {e}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        print(f"ulr train: a process failed:\n{e}", file=sys.stderr)
        return 1
    return 0
