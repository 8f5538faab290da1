"""Gradient records and their assembly: what a site call leaves behind in a noisy pass, and
how records become gradient terms once the pass's loss weights are known (in the calling
thread, or handed to :class:`ulr.parallel.Assembler`'s threads)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ..functional import module_grads
from ..parallel import Assembler
from .probe import UsesChangedError
from .site_table import Site

__all__ = ["GradSink", "Record", "Rows", "add", "assemble", "record_grads", "record_parts"]

Kind = Literal["closed", "vjp", "weight", "noise-only"]
Emit = Callable[[int | None, Tensor, Tensor], None]


@dataclass
class Record:
    """What one site call leaves for the gradient once the losses are known.

    ``kind``: "closed" (Linear/Conv input kept), "vjp" (value kept with its local graph),
    "weight" (per-example weight noise: only the noise is needed) or "noise-only" (a site
    whose value depends on no parameter; only a learnable noise scale needs it). ``shared``:
    the input/value holds the ``B`` rows shared by all copies (see
    :class:`ulr.estimator.forward.PassRun`), so the signal is summed over copies first.
    """

    site: Site
    kind: Kind
    noise: Tensor
    inputs: Tensor | None = None
    value: Tensor | None = None
    bias_noise: Tensor | None = None
    shared: bool = False


class Rows(NamedTuple):
    """The row counts of (a block of) a pass that turning records into gradients needs, and
    the pass's tripwires (site outputs that must stay unused, see :mod:`.probe`)."""

    rows_total: int
    num_copies: int
    batch: int
    tripwires: Sequence[Tensor] = ()


class GradSink(NamedTuple):
    """Where gradient terms go: ``grads`` (parameter -> sum), for the parameters ``params``
    (``wanted``: their ids)."""

    grads: dict[Tensor, Tensor]
    wanted: set[int]
    params: list[nn.Parameter]

    @classmethod
    def of(cls, params: list[nn.Parameter], grads: dict[Tensor, Tensor] | None = None
           ) -> GradSink:
        return cls({} if grads is None else grads, {id(p) for p in params}, params)


def add(grads: dict[Tensor, Tensor], p: Tensor, g: Tensor) -> None:
    grads[p] = grads[p] + g if p in grads else g


def record_parts(records: list[tuple[int, Record]], rows: Rows, weights: Tensor,
                 sink: GradSink, emit: Emit) -> None:
    """Compute the gradient terms of ``(index, record)`` pairs and hand each to
    ``emit(index, parameter, gradient)`` in the order they are to be added; the terms of
    the one autograd VJP of all ``"vjp"`` records among them come last, with index None.
    ``weights`` are the loss weights of ``rows``' rows, normalised by all rows of the pass."""
    total = rows.rows_total
    outs, signals = [], []
    for i, rec in records:
        noise, module = rec.site.noise, rec.site.module
        if noise.learnable:
            emit(i, noise.log_scale, noise.log_scale_grad(rec.noise, weights, total))
            if rec.bias_noise is not None:
                emit(i, noise.log_scale, noise.log_scale_grad(rec.bias_noise, weights, total))
        if rec.kind == "noise-only":
            continue
        # the record's noise is not needed after this: the signal takes its storage
        signal = noise.signal_(rec.noise, weights, total)
        if rec.kind == "weight":
            if id(module.weight) in sink.wanted:
                emit(i, module.weight, signal.sum(0))
            if rec.bias_noise is not None and id(module.bias) in sink.wanted:
                emit(i, module.bias, noise.signal_(rec.bias_noise, weights, total).sum(0))
            continue
        if rec.shared:
            signal = signal.view(rows.num_copies, rows.batch, *signal.shape[1:]).sum(0)
        if rec.kind == "closed":
            for pname, g in module_grads(module, rec.inputs, signal).items():
                p = getattr(module, pname)
                if id(p) in sink.wanted:
                    emit(i, p, g)
        else:
            outs.append(rec.value)
            signals.append(signal.to(rec.value.dtype))
    if outs and sink.params:
        wires = list(rows.tripwires)
        found = torch.autograd.grad(outs, [*sink.params, *wires], signals, allow_unused=True)
        if any(g is not None for g in found[len(sink.params):]):
            raise UsesChangedError
        for p, g in zip(sink.params, found[:len(sink.params)], strict=True):
            if g is not None:
                emit(None, p, g)


def record_grads(records: list[Record], rows: Rows, weights: Tensor, sink: GradSink) -> None:
    """Turn records into gradients added to ``sink.grads`` (in the calling thread)."""
    record_parts(list(enumerate(records)), rows, weights, sink,
                 lambda i, p, g: add(sink.grads, p, g))


def _collect_parts(records: list[tuple[int, Record]], rows: Rows, weights: Tensor,
                   sink: GradSink) -> tuple[dict[int, list[tuple[Tensor, Tensor]]], list]:
    """:func:`record_parts` into lists: terms per record index, and the VJP's terms."""
    per_record: dict[int, list[tuple[Tensor, Tensor]]] = {}
    tail: list[tuple[Tensor, Tensor]] = []

    def emit(i: int | None, p: Tensor, g: Tensor) -> None:
        (tail if i is None else per_record.setdefault(i, [])).append((p, g))

    record_parts(records, rows, weights, sink, emit)
    return per_record, tail


def assemble(assembler: Assembler | None, records: list[Record], rows: Rows, weights: Tensor,
             sink: GradSink) -> None:
    """:func:`record_grads`, or with an ``assembler`` hand the records to its threads and
    return at once (the next pass's forward overlaps with this assembly)."""
    if assembler is None:
        record_grads(records, rows, weights, sink)
        return
    # The records of at most two passes are alive: the one in the pool and this one.
    while assembler.pending() >= 1:
        assembler.merge_oldest(functools.partial(add, sink.grads))
    vjp = [(i, r) for i, r in enumerate(records) if r.kind == "vjp"]
    tasks = [functools.partial(_collect_parts, [(i, r)], rows, weights, sink)
             for i, r in enumerate(records) if r.kind != "vjp"]
    if vjp:
        tasks.append(functools.partial(_collect_parts, vjp, rows, weights, sink))
    assembler.submit(len(records), tasks, weights.device)
