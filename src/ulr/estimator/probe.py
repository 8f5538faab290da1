"""The parameter-use probe: which trainable parameters each site's value depends on, found by
walking autograd graphs of the first clean pass, so that the estimator can refuse a parameter
whose use no site sees and leave unused parts of nested site outputs without noise."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .trees import tensors

__all__ = ["Probe", "Uses", "UsesChangedError", "graph_params"]

#: per site name, what each of its calls depends on: ``(kind, {id: parameter})`` with kind
#: "value" (the site's value), "input" (a weight-noise site's input) or "closed-input"
Uses = dict[str, list[tuple[str, dict[int, Tensor]]]]


class UsesChangedError(Exception):
    """A noisy pass used a value the clean pass had found unused (a site output left without
    noise), or a parameter past the last site: probe again and start the step over."""


def graph_params(values: Iterable[Tensor]) -> dict[int, Tensor]:
    """The leaf tensors that require grad (parameters) reachable from ``values``' graphs."""
    found: dict[int, Tensor] = {}
    seen: set = set()
    stack = []
    for t in values:
        if not isinstance(t, Tensor) or not t.requires_grad:
            continue
        if t.grad_fn is None:
            found[id(t)] = t
        else:
            stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if isinstance(var, Tensor):
            found[id(var)] = var
        stack.extend(n for n, _ in node.next_functions)
    return found


@dataclass
class Probe:
    """What the first call's clean pass learnt about the model (kept in the estimator's
    state, so that a resumed run need not probe again).

    Attributes:
        sites: the sites the clean pass met (``None``: probe at the next call).
        unused: per site, the paths of output parts that nothing downstream uses.
        needs_grad: some pass needs autograd (a local VJP, or a closed-form site whose input
            depends on a parameter).
    """

    sites: set[str] | None = None
    unused: dict[str, set[tuple]] = field(default_factory=dict)
    needs_grad: bool = False

    def learn(self, uses: Uses, leaves: list[tuple[str, tuple, Tensor]], outputs: Any,
              trainable: dict[int, str], fired: Iterable[str]) -> None:
        """Check the uses of the clean pass and note what it found (see :meth:`check`)."""
        self.check(uses, outputs, trainable)
        self._learn_unused(leaves, uses, outputs)
        self.sites = set(fired)

    def check(self, uses: Uses, outputs: Any, trainable: dict[int, str]) -> None:
        """Every use of a trainable parameter must lie before a site that turns it into a
        gradient: refuse uses that reach the output past the last site, or the input of a
        weight-noise site (which passes no gradient back); a closed-form site whose input
        depends on a parameter needs autograd."""
        after = [trainable[i] for i in graph_params(tensors(outputs)) if i in trainable]
        lost: dict[str, list[str]] = {}
        for site, calls in uses.items():
            for kind, found in calls:
                hit = sorted({trainable[i] for i in found if i in trainable})
                if hit and kind == "input":
                    lost[site] = hit
                elif hit and kind == "closed-input":
                    self.needs_grad = True
        if after:
            raise ValueError(
                f"the trainable parameters {sorted(set(after))} are used after the last noise "
                f"site: that use reaches the model's output without passing a site, so the "
                f"estimate cannot see it and their gradient would be wrong. Put a site after "
                f"the use: make the output a site (sites=ulr.sites.param_owners() | "
                f"ulr.sites.by_name(''), '' naming the root module), or pass the value through "
                f"ulr.perturb(name, x) in forward and select it with ulr.sites.marked(name); "
                f"or leave them out with exclude=[...]. Nothing was written to .grad")
        if lost:
            site, names = next(iter(lost.items()))
            raise ValueError(
                f"the trainable parameters {names} feed the input of the weight-noise site "
                f"{site!r}, which passes no gradient to its input, so their gradient would be "
                f"missed. Put a site between them and {site!r} (e.g. output noise on the "
                f"module before it), or use output noise at {site!r}")

    def _learn_unused(self, leaves: list[tuple[str, tuple, Tensor]], uses: Uses,
                      outputs: Any) -> None:
        """Parts of nested site outputs (e.g. an LSTM's ``c_n``) that neither the output nor a
        later site depends on get no noise: it would add variance and nothing else."""
        found = set(graph_params(tensors(outputs)))
        for calls in uses.values():
            for _, hit in calls:
                found.update(hit)
        paths: dict[str, set[tuple]] = {}
        used: dict[str, set[tuple]] = {}
        for site, path, t in leaves:
            paths.setdefault(site, set()).add(path)
            if id(t) in found:
                used.setdefault(site, set()).add(path)
        self.unused = {site: ps - used.get(site, set()) for site, ps in paths.items()
                       if ps - used.get(site, set())}

    def state_dict(self) -> dict[str, Any] | None:
        if self.sites is None:
            return None
        return {"sites": sorted(self.sites), "needs_grad": self.needs_grad,
                "unused": {k: [list(p) for p in v] for k, v in self.unused.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; ``None`` (an older checkpoint) probes at the next
        call."""
        if state is None:
            self.sites, self.unused = None, {}
        else:
            self.sites = set(state["sites"])
            self.needs_grad = self.needs_grad or bool(state["needs_grad"])
            self.unused = {k: {tuple(p) for p in v} for k, v in state["unused"].items()}


def check_output(outputs: Any, watched: set[int]) -> None:
    """In a noisy pass every path to the output passes a site: the output depends on no
    ``watched`` tensor (trainable parameters, site outputs the clean pass found unused)."""
    found = graph_params(tensors(outputs))
    if found and watched.intersection(found):
        raise UsesChangedError
