"""A user's model and data in one file, as `ulr train --model file.py:make_net --data
file.py:load` reads them (issue 16 §1); shared by the tests of the CLI and of ulr.fit."""

import textwrap
from pathlib import Path

TEXT = textwrap.dedent('''
    import torch
    from torch import nn

    def make_net(in_shape, num_outputs, hidden=8):
        return nn.Sequential(nn.Linear(in_shape[0], hidden), nn.Tanh(),
                             nn.Linear(hidden, num_outputs))

    def load(seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(90, 4, generator=g)
        return {"train": (x, (x[:, 0] > 0.5).long()),
                "test": (x[:30], (x[:30, 0] > 0.5).long())}
''')


def write(directory: Path, name: str = "own.py") -> Path:
    """Write the file into ``directory``; returns its path."""
    path = directory / name
    path.write_text(TEXT)
    return path
