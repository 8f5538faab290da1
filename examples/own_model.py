"""Train your own model on your own data with ``ulr train``: this file is both.

``make_net`` builds the network, ``load_data`` returns the data; the command line names them as
``path/to/file.py:callable`` (or ``my_pkg.module:callable`` for an importable module)::

    ulr train --model examples/own_model.py:make_net --data examples/own_model.py:load_data \\
        --model-arg hidden=64 --method ulr bp --epochs 20

Every option of ``ulr train`` applies (estimator, resume, plots, ``ulr compare``, ``ulr robust``,
``--nproc``), and the run records how to rebuild the model, so that afterwards::

    import ulr
    run = ulr.load_run("runs/<the run directory>", weights="best")
    run.model(x)                       # the trained network, no rebuilding by hand

The contracts (docs/own-models.md): ``load_data`` is called with those of ``seed``,
``val_fraction`` and ``data_dir`` that it names, and returns a ``ulr.data.Dataset`` or a mapping
of ``train`` / ``val`` / ``test`` splits (``(x, y)`` pairs, TensorDatasets or DataLoaders) and an
optional ``task``; ``make_net`` gets the ``--model-arg`` values and, if it names them,
``in_shape`` (one example's shape) and ``num_outputs``.

Run ``python examples/own_model.py`` to train it with the CLI and load the result (~92% test
accuracy in a few seconds)
(``--smoke``: a few steps).
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


def make_net(in_shape: tuple[int, ...], num_outputs: int, hidden: int = 32) -> nn.Module:
    """A small MLP for examples of shape ``in_shape``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), hidden), nn.Tanh(),
                         nn.Linear(hidden, num_outputs))


def load_data(seed: int = 0) -> dict:
    """Three interleaved spirals in 2-D: 3 classes, 900 train / 300 test points. The test
    split does not depend on ``seed``; validation is held out of train by ulr
    (``--val-fraction``)."""

    def spirals(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        r = torch.rand(n, generator=gen)
        angle = 2.0 * r + y * (2 * math.pi / 3) + 0.2 * torch.randn(n, generator=gen)
        x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
        return x, y

    return {"train": spirals(900, torch.Generator().manual_seed(seed + 1)),
            "test": spirals(300, torch.Generator().manual_seed(12345)),
            "task": "classification"}


def main() -> None:
    smoke = "--smoke" in sys.argv
    here = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "ulr", "train", "--model", f"{here}:make_net",
               "--data", f"{here}:load_data", "--model-arg", "hidden=64", "--method", "ulr",
               "--epochs", "1" if smoke else "20", "--out", str(out), "--no-plots"]
        if smoke:
            cmd += ["--max-steps", "5", "--quiet"]
        subprocess.run(cmd, check=True)

        import ulr

        run = ulr.load_run(out, weights="last")
        x, y = load_data()["test"]
        acc = (run.model(x).argmax(1) == y).double().mean().item()
        print(f"reloaded {type(run.model).__name__} from {out}: test accuracy {acc:.1%}")


if __name__ == "__main__":
    main()
