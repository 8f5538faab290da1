"""Every example runs (with --smoke), and every example is listed here."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["quickstart.py --smoke", "zero_one_loss.py --smoke"]
EXAMPLES += ["rnn.py --smoke", "gnn.py --smoke", "snn.py --smoke", "transformer.py --smoke",
             "batchnorm.py --smoke", "binary.py --smoke"]
EXAMPLES += ["model_parallel.py --smoke"]
EXAMPLES += ["hybrid.py --smoke", "domain_adaptation.py --smoke"]
EXAMPLES += ["robustness.py --smoke"]


def test_coverage():
    listed = {e.split()[0] for e in EXAMPLES}
    present = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert present == listed, f"list these examples in tests/test_examples.py: {present - listed}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs(example):
    script, *args = example.split()
    subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], check=True,
                   cwd=ROOT, timeout=300)
