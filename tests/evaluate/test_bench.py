"""ulr.evaluate.bench: the report runs end to end (smoke size), and its pieces measure what they
say."""

import json
import math

import pytest
import torch

import ulr
from ulr.evaluate import bench


def _available():
    return [k for k, m in bench.METHODS.items() if m.unavailable() is None]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--smoke", "--out", str(out), "-q"]) == 0
    return out


def test_report_files_and_contents(smoke_report):
    out = smoke_report
    for name in ("peers-report.md", "peers-report.json", "peers-quality-mlp.png",
                 "peers-tta-digits-mlp.png"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "peers-report.json").read_text())
    assert {"machine", "settings", "quality", "quality_summary", "tta", "tta_summary", "cost",
            "floors", "wall_s"} <= set(result)
    assert result["machine"]["torch"] == torch.__version__
    methods = set(_available())
    assert set(result["skipped"]) == set(bench.METHODS) - methods
    assert {r["method"] for r in result["quality"]} == methods - {"bp"}
    assert {r["method"] for r in result["tta"]} == methods
    assert {r["method"] for r in result["cost"]} == methods
    assert {r["seed"] for r in result["tta"]} == {0, 1}  # robustness: every seed ran
    for r in result["quality"]:
        assert set(r["cosine"]) == {"hidden.0", "out"}
        assert all(-1 <= c <= 1 for c in r["cosine"].values())
    md = (out / "peers-report.md").read_text()
    for heading in ("## Gradient quality", "## Time to accuracy", "## Cost per step",
                    "## Floors", "Machine:"):
        assert heading in md
    assert "peers-quality-mlp.png" in md and "peers-tta-digits-mlp.png" in md


@pytest.mark.parametrize("level", [9, 33])
def test_estimators_are_sized_to_the_row_budget(level):
    ds = ulr.data.load("digits", seed=0)
    model = bench.initial_model("mlp", ds, 0)
    x, y = ds.train[0][:bench.BATCH], ds.train[1][:bench.BATCH]
    spent = {}
    for key in _available():
        est = bench.build_estimator(key, model, torch.Generator().manual_seed(0), level)
        est.loss_and_grads(bench.ce, x, y)  # the first call of ulr also probes the model
        est.loss_and_grads(bench.ce, x, y)  # the steady state
        spent[key] = est.last_forward_rows / bench.BATCH
    model.zero_grad(set_to_none=True)
    assert spent["bp"] == 1
    for key in {"ulr", "ulr-iid", "es", "spsa", "forward-gradient", "pgpe", "snes"} & set(spent):
        assert level - 1 <= spent[key] <= level, (key, spent[key])


def test_train_run_records_a_curve():
    r = bench.train_run("digits", "mlp", "spsa", 1e-3, 0, 0.05, (0.5, 1.0))
    assert [c["cpu_s"] for c in r["curve"]] == sorted(c["cpu_s"] for c in r["curve"])
    assert len(r["curve"]) == 3 and r["steps"] > 0
    # two forward rows per example (SPSA's ±); the last batch of an epoch may be partial
    partial = math.ceil(r["epochs"])
    assert r["rows"] % 2 == 0
    assert 2 * bench.BATCH * (r["steps"] - partial) < r["rows"] <= 2 * bench.BATCH * r["steps"]
    assert 0 <= r["final_test_acc"] <= 1 and not r["diverged"]


def test_same_initial_weights_for_every_method():
    ds = ulr.data.load("digits", seed=0)
    a, b = bench.initial_model("mlp", ds, 1), bench.initial_model("mlp", ds, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    state = torch.get_rng_state()
    bench.initial_model("mlp", ds, 2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_peak_memory_sees_an_allocation():
    def step():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # another 4 MiB while a is alive
        del a, b

    assert 7.5 * 2**20 <= bench.peak_step_memory(step) <= 9 * 2**20


def test_quality_floor_ratios():
    def summary(method, cos):
        return {"model": "mlp", "state": "init", "method": method, "level": 9,
                "rows_per_example": 9, "layers": {"a": (cos, 0.0)}}

    rows = bench.quality_floor([summary("ulr", 0.4), summary("es", 0.1), summary("spsa", -0.1)])
    ratio = {r["peer"]: r["ratio"] for r in rows}
    assert ratio["es"] == pytest.approx(4.0) and ratio["spsa"] == math.inf


def test_cli_errors():
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--smoke"])
    with pytest.raises(SystemExit):
        bench.main(["--methods", "adam"])


def test_ulr_bench_subcommand_delegates(tmp_path, capsys):
    from ulr import cli

    assert cli.main(["bench", "--smoke", "--parts", "cost", "--methods", "bp", "spsa",
                     "--no-plots", "-q", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "peers-report.json").read_text())
    assert result["command"].startswith("ulr bench --smoke")
    assert [r["method"] for r in result["cost"]] == ["bp", "spsa"]
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "usage: ulr bench" in capsys.readouterr().out


def test_choose_lr_extends_the_grid_only_from_an_edge():
    assert bench.choose_lr({1e-3: 0.9, 3e-3: 0.8, 1e-2: 0.7}) == (1e-3, 3e-4)
    assert bench.choose_lr({1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.9}) == (1e-2, 3e-2)
    assert bench.choose_lr({1e-3: 0.9, 3e-3: 0.95, 1e-2: 0.7}) == (3e-3, None)
    assert bench.choose_lr({1e-3: 1.0, 3e-3: 1.0, 1e-2: 1.0}) == (3e-3, None)  # ties: inside
    assert bench.choose_lr({1e-3: 0.9, 3e-3: 0.9, 1e-2: 0.7}) == (3e-3, None)
    assert bench.choose_lr({1e-5: 0.9, 3e-5: 0.5}) == (1e-5, None)  # end of the ladder
    assert bench.choose_lr({3e-3: 0.5}) == (3e-3, None)


def test_time_to_accuracy_tunes_then_reruns_the_chosen_rate():
    s = bench.Settings.smoke()
    s.methods, s.lr_grid, s.lr_extend = ("spsa",), (1e-3, 3e-3), 1
    s.tta = (("digits", "mlp", 0.05),)
    runs = bench.time_to_accuracy(s)
    tuning = [r for r in runs if r["tuning"]]
    assert {r["lr"] for r in tuning} >= {1e-3, 3e-3} and len(tuning) <= 3
    chosen = [r for r in tuning if r["selected"]]
    assert len(chosen) == 1
    rerun = [r for r in runs if not r["tuning"]]
    assert [r["seed"] for r in rerun] == [1] and rerun[0]["lr"] == chosen[0]["lr"]
    (summary,) = bench.summarize_tta(runs)
    assert summary["lr"] == chosen[0]["lr"] and len(summary["final_test_acc"]) == 2


def test_report_can_be_rewritten_from_its_json(smoke_report, tmp_path):
    assert bench.main(["--from-json", str(smoke_report / "peers-report.json"), "--no-plots",
                       "-q", "--out", str(tmp_path)]) == 0
    def text(path):  # without the plots' image links (not redrawn here)
        return [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("![")]

    assert text(tmp_path / "peers-report.md") == text(smoke_report / "peers-report.md")


def test_evotorch_peers_run_in_the_smoke_bench(tmp_path):
    pytest.importorskip("evotorch")
    assert bench.main(["--smoke", "--methods", "pgpe", "snes", "--no-plots", "-q",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "peers-report.json").read_text())
    assert result["skipped"] == {}
    for part in ("quality", "tta", "cost"):
        assert {r["method"] for r in result[part]} == {"pgpe", "snes"}, part
    assert all(0 <= r["final_test_acc"] <= 1 for r in result["tta"])
    assert "EvoTorch PGPE" in (tmp_path / "peers-report.md").read_text()


def test_unavailable_peers_are_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    from ulr.evaluate.bench import evotorch_peers

    monkeypatch.setattr(evotorch_peers, "missing", lambda: "evotorch is not installed (test)")
    assert bench.main(["--smoke", "--parts", "cost", "--methods", "bp", "pgpe", "--no-plots",
                       "--out", str(tmp_path)]) == 0
    assert "skipping pgpe: evotorch is not installed (test)" in capsys.readouterr().err
    result = json.loads((tmp_path / "peers-report.json").read_text())
    assert result["skipped"] == {"pgpe": "evotorch is not installed (test)"}
    assert [r["method"] for r in result["cost"]] == ["bp"]
    assert "`pgpe`: skipped: evotorch is not installed" in (
        tmp_path / "peers-report.md").read_text()


def test_forward_gradient_is_named_as_in_ulr_train_and_fg_still_accepted(tmp_path, capsys):
    assert "fg" not in bench.METHODS and "forward-gradient" in bench.METHODS
    assert bench.main(["--smoke", "--parts", "cost", "--methods", "fg", "--no-plots", "-q",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "peers-report.json").read_text())
    assert [r["method"] for r in result["cost"]] == ["forward-gradient"]
    # a report written with the old name is rewritten with the new one
    result["settings"]["methods"] = ["fg"]
    result["cost"][0]["method"] = "fg"
    result["configs"] = {"mlp/fg": "1 tangent(s)"}
    old = tmp_path / "old.json"
    old.write_text(json.dumps(result))
    assert bench.main(["--from-json", str(old), "--no-plots", "-q",
                       "--out", str(tmp_path / "re")]) == 0
    assert "| forward-gradient |" in (tmp_path / "re" / "peers-report.md").read_text()


def test_bench_and_robust_flags_get_a_did_you_mean(capsys):
    from ulr import cli

    for argv, hint in ((["bench", "--quik"], "--quick"), (["robust", "r", "--atacks", "x"],
                                                          "--attacks")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert f"(did you mean {hint}?)" in capsys.readouterr().err
