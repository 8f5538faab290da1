"""Keep glibc's malloc from returning and re-faulting large buffers on every step.

A ULR step on a CNN allocates activations of ``K·B`` rows, tens of MB each. glibc serves every
allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` when freed, so each step faults every page of those buffers in again: on LeNet-5 with
Fashion-MNIST 18-24% of the CPU time of a short training run is the kernel zeroing pages
(``docs/results/allocator-cpu.md``). :func:`tune_allocator` serves them from the heap instead
and keeps freed memory for the next step; the peak memory is unchanged (the same buffers are
reused), the numbers are bit for bit the same.

``ulr train`` (and every ``ulr`` command) calls it at start; a library user calls it once at the
start of their own script::

    import ulr
    ulr.tune_allocator()

Set the environment variable ``ULR_TUNE_ALLOCATOR=0`` to keep the allocator's defaults in the
``ulr`` commands. On other C libraries (macOS, musl) it does nothing and returns ``False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["tune_allocator"]

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_TOP_PAD = 256 << 20  # heap grows in steps of 256 MiB of address space (pages fault in on use)
_TRIM_THRESHOLD = 2**31 - 1  # free memory at the top of the heap is kept, not returned


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def tune_allocator() -> bool:
    """Serve large allocations from the heap and keep freed memory (glibc only).

    Sets ``M_MMAP_MAX = 0`` (no ``mmap`` per allocation), ``M_TRIM_THRESHOLD`` to 2 GiB (freed
    memory stays with the process) and ``M_TOP_PAD`` to 256 MiB, for the whole process, from now
    on. Returns whether it did (False on a C library without ``mallopt``).
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))
    return bool(ok)


def tune_allocator_for_cli() -> bool:
    """:func:`tune_allocator` unless ``ULR_TUNE_ALLOCATOR=0`` (the ``ulr`` commands); the same
    settings go into the environment, where glibc reads them at the start of the processes
    that ``ulr train --nproc N`` spawns."""
    if os.environ.get("ULR_TUNE_ALLOCATOR", "1").strip() == "0":
        return False
    if not tune_allocator():
        return False
    for name, value in (("MALLOC_MMAP_MAX_", 0), ("MALLOC_TRIM_THRESHOLD_", _TRIM_THRESHOLD),
                        ("MALLOC_TOP_PAD_", _TOP_PAD)):
        os.environ.setdefault(name, str(value))
    return True
