"""The conditions of ``ulr robust``: attack and corruption names, default budgets and severity
parameters, and the rules every condition shares (valid names, the value range, clipping)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import Tensor

ATTACKS = ("fgsm-linf", "fgsm-l2", "pgd-linf", "pgd-l2")
CORRUPTIONS = ("gaussian-noise", "impulse-noise", "blur", "contrast")
#: Default budgets, as fractions of the value range (see the module docstring).
DEFAULT_EPS = (0.02, 0.05, 0.1, 0.2)
#: The parameter of each corruption at severities 1..5.
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian-noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "impulse-noise": (0.01, 0.03, 0.06, 0.10, 0.17),
    "blur": (0.5, 0.75, 1.0, 1.5, 2.0),
    "contrast": (0.8, 0.6, 0.45, 0.3, 0.2),
}


def choose(names: Sequence[str], valid: Sequence[str], what: str, flag: str) -> list[str]:
    """``names`` normalised (lower case, ``-`` for ``_``) and deduplicated, in order.

    Raises:
        ValueError: a name not in ``valid``, with the closest valid one and ``flag none``.
    """
    out = []
    for raw in names:
        name = str(raw).strip().lower().replace("_", "-")
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {what} {raw!r}{hint}; valid {what}s: "
                             f"{', '.join(valid)} (or '{flag} none')")
        if name not in out:
            out.append(name)
    return out


def check_range(value_range: tuple[float, float]) -> None:
    """Raise ``ValueError`` unless ``value_range`` is ``(lo, hi)`` with ``hi > lo``."""
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")


def clip(x: Tensor, value_range: tuple[float, float]) -> Tensor:
    """``x`` clamped to the valid input range."""
    return x.clamp(value_range[0], value_range[1])
