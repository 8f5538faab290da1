"""The estimator core never imports the training product or the evaluation tools (issue 15's
import direction), so `import ulr` stays light and the core can change on its own."""

import subprocess
import sys

CORE = ["ulr", "ulr.estimator", "ulr.noise", "ulr.samplers", "ulr.sites", "ulr.plans",
        "ulr.baselines", "ulr.functional", "ulr.parallel", "ulr.allocator", "ulr.hybrid",
        "ulr.schedules"]
ABOVE = ["ulr.train", "ulr.config", "ulr.cli", "ulr.plots", "ulr.bench", "ulr.robust",
         "ulr.finetune", "ulr.data", "ulr.models", "ulr.peers", "ulr.distributed"]


def test_the_core_imports_nothing_above_it():
    code = (f"import importlib, sys\nfor m in {CORE!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {ABOVE!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"the core pulled in {out}"
