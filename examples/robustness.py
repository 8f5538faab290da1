"""Attack and corrupt two digits MLPs, one trained by ULR and one by backprop.

Trains both with `ulr.train.fit` (the code behind `ulr train`) from the same seed into run
directories, reads them back with `ulr.evaluate.robust.load`, and measures their test accuracy under
FGSM and PGD (L-inf and L2) and the four corruptions with `ulr.evaluate.robust.evaluate` (the
code behind `ulr robust`). Budgets `eps` are fractions of the input range [0, 1]
(docs/robustness.md).
On the command line the same is `ulr train --method ulr bp --out runs/demo` followed by
`ulr robust runs/demo`.

    python examples/robustness.py            # ~10 s of CPU (one thread)
    python examples/robustness.py --smoke    # a few steps, for CI
"""

import argparse
import tempfile

import torch

from ulr.evaluate import robust
from ulr.train import RunConfig, fit

parser = argparse.ArgumentParser()
parser.add_argument("--smoke", action="store_true", help="a few training steps only")
args = parser.parse_args()
torch.set_num_threads(1)

budget = dict(epochs=1, max_steps=5) if args.smoke else dict(epochs=30)
table = []
with tempfile.TemporaryDirectory() as tmp:
    for method in ("ulr", "bp"):
        fit(RunConfig(method=method, threads=1, device="cpu", **budget), f"{tmp}/{method}")
        run = robust.load(f"{tmp}/{method}")  # model (eval mode), test split, value range
        rows = robust.evaluate(
            run.model, run.x, run.y, value_range=run.value_range,
            attacks=["fgsm-linf", "pgd-linf", "pgd-l2"], eps=[0.05, 0.1],
            steps=2 if args.smoke else 10,
            corruptions=robust.CORRUPTIONS, severities=[1, 3, 5],
        )
        table.append({"label": method, "rows": rows})
print("test accuracy (%) of the digits MLP; eps is a fraction of the input range")
print(robust.format_table(table))
