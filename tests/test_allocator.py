"""ulr.tune_allocator(): glibc's mallopt settings for training without per-step page faults."""

import ctypes
import os
import platform

import pytest

import ulr
from ulr import allocator

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_tune_allocator_sets_mallopt_on_glibc():
    assert ulr.tune_allocator() is True
    buf = ctypes.create_string_buffer(64 << 20)  # a 64 MiB allocation still works
    assert len(buf) == 64 << 20


@glibc
def test_the_cli_variant_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ULR_TUNE_ALLOCATOR", "0")
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(name, raising=False)
    assert allocator.tune_allocator_for_cli() is False
    assert "MALLOC_MMAP_MAX_" not in os.environ
    monkeypatch.setenv("ULR_TUNE_ALLOCATOR", "1")
    assert allocator.tune_allocator_for_cli() is True
    assert os.environ["MALLOC_MMAP_MAX_"] == "0"  # inherited by --nproc's processes


def test_without_glibc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert ulr.tune_allocator() is False
