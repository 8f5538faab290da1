"""Parallel gradient assembly for :class:`ulr.LikelihoodRatio` (``workers=N``).

Once a pass's per-row losses are known, every site's gradient depends only on that site's
record (its input or local graph and its noise) and the loss weights (docs/method.md §4: no backward
locking). With ``workers > 0`` the estimator hands each pass's records to a pool of threads:

* one task per closed-form / weight-noise record (the weight product of one layer), and one
  task for all records that need a local autograd VJP (one ``torch.autograd.grad`` call, as in
  the sequential path);
* the pass's tasks run while the main thread already runs the **next pass's forward**
  (layer-wise plans and chunked memory have several passes per step), so forward and gradient
  work overlap inside one step. At most two passes' records are alive at once (the one being
  assembled and the one just recorded);
* the results are added into the gradients in exactly the order of the sequential path, so
  the gradients are bitwise identical to ``workers=0`` (the same operations on the same values;
  on CPU with the same number of intra-op threads).

On CUDA each worker thread issues its kernels on its own stream, which waits for the main
stream's forward (an event recorded when the pass is handed over) and is synchronised by the
worker before the task returns; result tensors are marked as used by the main stream.

The optimizer step still waits for the whole step's gradients: starting the next *batch's*
forward before the step would run it with weights one update old (delayed gradients, a
different algorithm), which this module does not do.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

__all__ = ["Assembler"]

Terms = list[tuple[Tensor, Tensor]]
#: What one task returns: per-record terms by record index, and the trailing VJP terms.
Parts = tuple[dict[int, Terms], Terms]


class Assembler:
    """A thread pool that runs gradient tasks and merges their terms in submission order.

    Args:
        workers: number of threads (>= 1).
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: list[tuple[int, list[Future]]] = []
        self._local = threading.local()

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ulr-assembly")
        return self._pool

    def submit(self, num_records: int, tasks: list[Callable[[], Parts]],
               device: torch.device) -> None:
        """Start the tasks of one pass (``num_records`` records) and return at once."""
        run = self._cuda_task(device) if device.type == "cuda" else _plain_task
        pool = self._executor()
        # A thread's intra-op thread count is its own (OpenMP's is per thread): run the tasks
        # with the caller's, so that their kernels reduce in the same order as workers=0.
        threads = torch.get_num_threads()
        self._jobs.append((num_records, [pool.submit(_with_threads, threads, run, t)
                                         for t in tasks]))

    def pending(self) -> int:
        """Passes submitted and not merged yet."""
        return len(self._jobs)

    def merge_oldest(self, add: Callable[[Tensor, Tensor], None]) -> None:
        """Wait for the oldest pass and add its terms with ``add(p, g)`` in sequential order."""
        num_records, futures = self._jobs.pop(0)
        per_record: dict[int, Terms] = {}
        tail: Terms = []
        try:
            for f in futures:
                recs, t = f.result()
                per_record.update(recs)
                tail += t
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        for i in range(num_records):
            for p, g in per_record.get(i, ()):
                add(p, g)
        for p, g in tail:
            add(p, g)

    def merge_all(self, add: Callable[[Tensor, Tensor], None]) -> None:
        """Merge every submitted pass, oldest first."""
        while self._jobs:
            self.merge_oldest(add)

    def discard(self) -> None:
        """Wait for the running tasks (they hold the records) and drop their results."""
        jobs, self._jobs = self._jobs, []
        for _, futures in jobs:
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    # the caller is already failing (or merged): only wait for the task
                    with contextlib.suppress(BaseException):
                        f.result()

    def _cuda_task(self, device: torch.device) -> Callable[[Callable[[], Parts]], Parts]:
        main = torch.cuda.current_stream(device)
        ready = main.record_event()

        def run(task: Callable[[], Parts]) -> Parts:
            streams = getattr(self._local, "streams", None)
            if streams is None:
                streams = self._local.streams = {}
            stream = streams.get(device)
            if stream is None:
                stream = streams[device] = torch.cuda.Stream(device)
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                recs, tail = task()
            for terms in (*recs.values(), tail):
                for _, g in terms:
                    g.record_stream(main)
            # The records' tensors are freed when this task returns: finish their kernels
            # first, or the allocator could hand their memory to the main stream too early.
            stream.synchronize()
            return recs, tail

        return run

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:  # a pool cannot be copied; a copy makes its own
        return {"workers": self.workers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["workers"])


def _plain_task(task: Callable[[], Parts]) -> Parts:
    return task()


def _with_threads(threads: int, run: Callable[[Callable[[], Parts]], Parts],
                  task: Callable[[], Parts]) -> Parts:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return run(task)
