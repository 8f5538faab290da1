"""The training loop: smoke runs, exact reproducibility and resumption, diagnostics, errors."""

import json

import pytest
import torch

from ulr.train import (
    Callback,
    CheckpointError,
    RunConfig,
    TrainingInterrupted,
    fit,
    format_table,
    resume_config,
)

# 1295 digits training images / 128 = 11 steps per epoch; K = 8 keeps each step tiny.
TINY = dict(batch_size=128, num_copies=8, threads=1, device="cpu", epochs=2)
TIMING = {"wall_time_s", "train_time_s", "samples_per_s", "peak_rss_mb",
          "step_peak_mb"}


def tiny(**changes):
    return RunConfig(**{**TINY, **changes})


def rows(run_dir, kinds=("step", "epoch", "diag")):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] in kinds:
            out.append({k: v for k, v in row.items() if k not in TIMING})
    return out


def weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, row):
        if row["step"] == self.step:
            raise KeyboardInterrupt


def snapshot(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.parametrize("method", ["ulr", "bp"])
def test_fit_without_directory(method):
    summary = fit(tiny(method=method, max_steps=3))
    assert summary["steps"] == 3 and summary["status"].startswith("stopped at max_steps")
    assert 0 <= summary["final"]["test_acc"] <= 1
    assert summary["run_dir"] is None
    # ulr: 2 layer-wise passes of K·B rows per step, plus one clean pass on the first step that
    # learns the site names
    if method == "ulr":
        assert summary["forward_rows"] == 3 * 8 * 128 * 2 + 128
        assert summary["forward_passes"] == 3 * 2 + 1
    else:
        assert summary["forward_rows"] == 3 * 128
        assert summary["forward_passes"] == 3
    assert summary["environment"]["torch"] == torch.__version__


def test_run_directory_contents(tmp_path):
    summary = fit(tiny(epochs=1), tmp_path / "run")
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {
        "config.toml", "config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt",
        "best.pt", "summary.json"}
    stored = json.loads((run / "config.json").read_text())
    assert stored["lr"] == 3e-3 and stored["device"] == "cpu"  # resolved, not "auto"/unset
    assert json.loads((run / "summary.json").read_text())["steps"] == summary["steps"] == 11
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds[0] == "start" and kinds.count("step") == 11 and kinds[-1] == "epoch"
    epoch = rows(run, ("epoch",))[0]
    for key in ("train_loss", "val_acc", "test_acc", "forward_rows", "lr"):
        assert epoch[key] is not None
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["peak_rss_mb"] > 0


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path):
    fit(tiny(), tmp_path / "a")
    fit(tiny(), tmp_path / "b")
    fit(tiny(seed=1), tmp_path / "c")
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert rows(tmp_path / "a") != rows(tmp_path / "c")


def test_global_rng_and_threads_are_left_alone():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(tiny(max_steps=2, threads=1 if threads > 1 else 2))
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_ulr_and_bp_start_from_the_same_weights(tmp_path):
    # Interrupted at step 1, each directory still holds its step-0 checkpoint.
    for method in ("ulr", "bp"):
        with pytest.raises(TrainingInterrupted):
            fit(tiny(method=method), tmp_path / method, callbacks=[_StopAt(1)])
    assert_same_weights(weights(tmp_path / "ulr"), weights(tmp_path / "bp"))


@pytest.mark.parametrize("method", ["ulr", "bp", "bp-noise", "es", "spsa", "forward-gradient"])
def test_resume_one_plus_one_epochs_equals_two(tmp_path, method):
    fit(tiny(method=method, schedule="step", step_size=1, gamma=0.5), tmp_path / "straight")
    fit(tiny(method=method, schedule="step", step_size=1, gamma=0.5, epochs=1),
        tmp_path / "resumed")
    config = resume_config(tmp_path / "resumed", {"epochs": 2})
    fit(config, tmp_path / "resumed", resume=True)
    assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["status"] == "complete"


def test_resume_inside_an_epoch_is_exact(tmp_path):
    fit(tiny(epochs=1, baseline="running-average"), tmp_path / "straight")
    fit(tiny(epochs=1, baseline="running-average", max_steps=4), tmp_path / "resumed")
    assert rows(tmp_path / "resumed", ("epoch",))[-1]["partial"] is True
    fit(resume_config(tmp_path / "resumed", {"max_steps": None}), tmp_path / "resumed",
        resume=True)
    assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def test_interrupt_leaves_a_resumable_directory(tmp_path):
    fit(tiny(), tmp_path / "straight")
    with pytest.raises(TrainingInterrupted) as err:
        fit(tiny(), tmp_path / "cut", callbacks=[_StopAt(15)])  # inside epoch 2
    assert (err.value.epoch, err.value.step) == (1, 11)
    assert "ulr train --resume" in str(err.value)
    fit(resume_config(tmp_path / "cut"), tmp_path / "cut", resume=True)
    assert rows(tmp_path / "straight") == rows(tmp_path / "cut")


def test_corrupt_checkpoint_is_refused_and_nothing_changes(tmp_path):
    run = tmp_path / "run"
    fit(tiny(epochs=1), run)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="corrupt or unreadable.*nothing was changed"):
        fit(resume_config(run, {"epochs": 2}), run, resume=True)
    assert snapshot(run) == before


def test_mismatched_checkpoint_is_refused_and_nothing_changes(tmp_path):
    fit(tiny(epochs=1), tmp_path / "run")
    fit(tiny(epochs=1, sigma=0.05), tmp_path / "other")
    (tmp_path / "run" / "checkpoint.pt").write_bytes(
        (tmp_path / "other" / "checkpoint.pt").read_bytes())
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"sigma: 0\.05 -> 0\.1"):
        fit(resume_config(tmp_path / "run", {"epochs": 2}), tmp_path / "run", resume=True)
    assert snapshot(tmp_path / "run") == before


def test_resume_refuses_config_changes(tmp_path):
    run = tmp_path / "run"
    fit(tiny(epochs=1, schedule="cosine"), run)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="lr: 0.003 -> 0.1.*Only epochs"):
        fit(resume_config(run, {"lr": 0.1}), run, resume=True)
    with pytest.raises(CheckpointError, match="cosine schedule"):
        fit(resume_config(run, {"epochs": 3}), run, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        fit(tiny(), tmp_path / "empty", resume=True)
    assert snapshot(run) == before


def test_existing_directory_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    fit(tiny(max_steps=1), run)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="already exists.*--resume"):
        fit(tiny(max_steps=1), run)
    assert snapshot(run) == before


def test_diagnostics_rows_and_training_is_undisturbed(tmp_path):
    fit(tiny(epochs=1, diag_every=3), tmp_path / "diag")
    fit(tiny(epochs=1), tmp_path / "plain")
    diags = rows(tmp_path / "diag", ("diag",))
    assert [d["step"] for d in diags] == [3, 6, 9]
    for d in diags:
        assert set(d["cosine"]) == {"hidden.0", "out"} == set(d["norm_ratio"])
        assert all(-1 <= c <= 1 for c in [*d["cosine"].values(), d["cosine_all"]])
        assert all(r > 0 for r in d["norm_ratio"].values())
    # The output layer's estimate points the right way.
    assert sum(d["cosine"]["out"] for d in diags) > 0
    assert rows(tmp_path / "diag", ("step", "epoch")) == rows(tmp_path / "plain")


def test_regression_dataset_reports_loss():
    summary = fit(tiny(data="adding", max_steps=2, epochs=1, eval_batch_size=500))
    assert summary["task"] == "regression"
    assert summary["final"]["test_acc"] is None and summary["final"]["test_loss"] > 0
    assert summary["best"]["val_loss"] > 0
    assert "test MSE" in format_table([summary])


def test_model_that_does_not_fit_the_data():
    with pytest.raises(ValueError, match="cannot build model 'lenet5' for dataset 'adding'"):
        fit(tiny(model="lenet5", data="adding", max_steps=1))


def test_recommended_config_is_used():
    summary = fit(tiny(recommended=True, max_steps=1, epochs=1))
    # MLP recommends 64 copies for hidden.0 and 32 for out (antithetic, layerwise).
    assert summary["forward_rows"] == 128 + 64 * 128 + 32 * 128



def test_unsupported_dataset_kind_is_refused(monkeypatch):
    import ulr.train.recipes

    class GraphLike:
        task = "link-prediction"

    monkeypatch.setattr(ulr.train.recipes, "dataset", lambda *args: GraphLike())
    with pytest.raises(ValueError, match="GraphLike.*ulr train handles.*digits"):
        fit(tiny(max_steps=1))



@pytest.mark.parametrize("method, args, rows_per_example", [
    ("es", {"population": 6}, 6),
    ("spsa", {"num_directions": 2}, 4),
    ("forward-gradient", {"num_tangents": 3}, 3),
])
def test_peer_methods_train_under_the_same_loop(method, args, rows_per_example):
    summary = fit(tiny(method=method, method_args=args, max_steps=3))
    assert summary["forward_rows"] == 3 * rows_per_example * 128


def test_peer_method_learns_digits():
    """ES (the cheapest peer per step here) learns digits far above chance in 3 epochs."""
    summary = fit(tiny(method="es", method_args={"population": 16}, epochs=3, batch_size=32))
    assert summary["final"]["test_acc"] > 0.5


GRAPH = dict(data="karate", model="gcn", threads=1, device="cpu", lr=0.01)


@pytest.mark.parametrize("method", ["ulr", "bp", "es"])
def test_graph_node_classification_trains(method):
    """A graph is one example: one full-graph step per epoch; ULR uses whole-graph copies
    (tile_graph) and the receptive-field node loss; the logged loss is the labelled nodes'."""
    summary = fit(RunConfig(**GRAPH, method=method, epochs=60))
    assert summary["steps"] == 60 and summary["task"] == "node-classification"
    assert summary["final"]["test_acc"] >= 0.8  # 26 test nodes, 2 factions: chance is ~0.5
    assert summary["best"]["val_acc"] is not None
    assert summary["final"]["train_loss"] < 0.6  # labelled nodes' mean loss (ln 2 at start)
    assert summary["samples"] == 60 * 34


def test_graph_resume_is_exact(tmp_path):
    fit(RunConfig(**GRAPH, epochs=6), tmp_path / "straight")
    fit(RunConfig(**GRAPH, epochs=3), tmp_path / "resumed")
    fit(resume_config(tmp_path / "resumed", {"epochs": 6}), tmp_path / "resumed", resume=True)
    assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def test_graph_needs_a_graph_model():
    with pytest.raises(ValueError, match="does not take a graph.*--model gcn"):
        fit(RunConfig(**{**GRAPH, "model": "mlp"}, max_steps=1))


def test_after_step_hook_runs_after_every_update(tmp_path):
    """binary-mlp keeps its latent weights in [-1, 1] through its after_step(): with a large
    SGD step some weights hit the bound exactly, none passes it."""
    fit(tiny(model="binary-mlp", method="ulr", lr=50.0, optimizer="sgd", momentum=0.0,
             max_steps=3), tmp_path / "run")
    hidden = [w for k, w in weights(tmp_path / "run").items()
              if k.startswith("hidden.") and k.endswith("weight")]
    assert hidden and all(float(w.abs().max()) <= 1.0 for w in hidden)
    assert any(bool((w.abs() == 1.0).any()) for w in hidden)


def test_zero_one_loss_trains_a_sign_network(tmp_path):
    """Binary weights, sign units and the classification error as the loss: nothing here has a
    useful gradient. 4 epochs of ULR reach 84% on digits (chance 10%); the logged training loss
    is the error rate of the noisy copies."""
    config = tiny(model="binary-mlp", loss="zero-one", site_sigma={"out": 2.0, "hidden.*": 0.5},
                  batch_size=64, num_copies=16, epochs=4)
    summary = fit(config, tmp_path / "run")
    assert summary["final"]["test_acc"] > 0.6
    steps = rows(tmp_path / "run", ("step",))
    assert all(0 <= r["loss"] <= 1 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_zero_one_loss_needs_a_classifier():
    with pytest.raises(ValueError, match="'zero-one' is the error of a classifier.*'adding'"):
        fit(tiny(data="adding", loss="zero-one", max_steps=1))
    with pytest.raises(ValueError, match="'zero-one'.*'karate' is a node-classification"):
        fit(tiny(data="karate", model="gcn", loss="zero-one", max_steps=1))



def test_checkpoints_inside_an_epoch_make_an_interrupt_lose_little(tmp_path):
    """checkpoint_every=4: a Ctrl-C at step 15 (inside epoch 2) keeps step 12, and --resume
    from there reproduces the uninterrupted run exactly."""
    fit(tiny(), tmp_path / "straight")
    with pytest.raises(TrainingInterrupted) as err:
        fit(tiny(checkpoint_every=4), tmp_path / "cut", callbacks=[_StopAt(15)])
    assert (err.value.epoch, err.value.step) == (1, 12)
    fit(resume_config(tmp_path / "cut"), tmp_path / "cut", resume=True)
    assert rows(tmp_path / "straight") == rows(tmp_path / "cut")
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "cut"))



def test_the_best_validation_weights_are_kept_beside_the_latest(tmp_path):
    """best.pt holds the weights of the epoch of best validation accuracy; ulr robust (and
    its load) picks them with weights="best", the latest with "last"."""
    from ulr.evaluate import robust

    run = tmp_path / "run"
    summary = fit(tiny(epochs=4, lr=0.05), run)  # a large lr: validation accuracy moves
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["best"]["epoch"] == summary["best"]["epoch"] == 3  # not the last epoch
    last = torch.load(run / "checkpoint.pt", weights_only=True)
    for which, ckpt in (("best", best), ("last", last)):
        loaded = robust.load(run, weights=which, limit=10)
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, ckpt["model"][k]), (which, k)
    with pytest.raises(ValueError, match="weights must be one of"):
        robust.load(run, weights="worst")


def test_early_stopping_on_validation(tmp_path):
    """early_stop=P ends the run once P epochs have passed without a better validation
    accuracy; best.pt holds that best epoch, and a resume does not train past the stop."""
    run = tmp_path / "run"
    summary = fit(tiny(epochs=12, lr=0.05, early_stop=1), run)
    best = summary["best"]["epoch"]
    assert summary["status"] == f"stopped early after epoch {best + 1} (patience 1)"
    assert summary["epochs_completed"] == best + 1 < 12
    assert torch.load(run / "best.pt", weights_only=True)["best"]["epoch"] == best
    again = fit(resume_config(run), run, resume=True)
    assert again["epochs_completed"] == summary["epochs_completed"]
    assert fit(tiny(epochs=3, early_stop=0), tmp_path / "off")["status"] == "complete"


def test_metrics_csv_follows_the_epochs_through_a_resume(tmp_path):
    import csv

    run = tmp_path / "run"
    fit(tiny(epochs=1), run)
    fit(resume_config(run, {"epochs": 2}), run, resume=True)
    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    epochs = rows(run, ("epoch",))
    assert [int(r["epoch"]) for r in table] == [1, 2] == [r["epoch"] for r in epochs]
    assert [float(r["test_acc"]) for r in table] == [r["test_acc"] for r in epochs]


def test_warmup_with_cosine_steps_resumes_bit_exactly(tmp_path):
    import torch

    from ulr.train import RunConfig, fit

    config = RunConfig(method="ulr", epochs=2, num_copies=4, schedule="cosine-steps",
                       warmup_steps=20, threads=1)
    fit(config, tmp_path / "a")
    fit(config.replace(max_steps=30), tmp_path / "b")  # stops inside epoch 1
    fit(config, tmp_path / "b", resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"] == b["scheduler"]


def test_tensorboard_scalars_beside_metrics(tmp_path, monkeypatch):
    import builtins

    import pytest

    from ulr.train import RunConfig, fit

    pytest.importorskip("tensorboard", reason="tensorboard not installed (ulr[integrations])")
    config = RunConfig(method="bp", epochs=1, max_steps=3, tensorboard=True)
    fit(config, tmp_path / "tb")
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    assert {"step/loss", "step/lr", "epoch/val_acc"} <= set(acc.Tags()["scalars"])
    real = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        fit(config, tmp_path / "none")
    assert not (tmp_path / "none").exists()  # refused before anything was written


def test_step_memory_is_measured_on_a_few_steps_and_shows_the_estimators_overhead(tmp_path):
    # Two steps after the first are profiled; their peak allocation is the summary's, and
    # ULR's (K = 8 copies of 128 rows) is far above backprop's (one batch of activations).
    peaks = {}
    for method in ("ulr", "bp"):
        summary = fit(tiny(method=method, epochs=1), tmp_path / method)
        measured = [json.loads(line) for line in
                    (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        measured = [r for r in measured if "step_peak_mb" in r]
        assert [r["step"] for r in measured] == [2, 3]
        assert summary["step_peak_mb"] == max(r["step_peak_mb"] for r in measured) > 0
        assert json.loads((tmp_path / method / "summary.json").read_text())[
            "step_peak_mb"] == summary["step_peak_mb"]
        peaks[method] = summary["step_peak_mb"]
    assert peaks["ulr"] > 5 * peaks["bp"]
    table = format_table([fit(tiny(max_steps=3))])
    assert "step alloc MB" in table and "process MB" in table


def test_step_memory_skips_diagnostic_steps_and_survives_a_resume(tmp_path):
    summary = fit(tiny(epochs=1, diag_every=2, max_steps=6), tmp_path / "r")
    measured = [json.loads(line)["step"] for line in
                (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
                if "step_peak_mb" in line]
    assert measured == [3, 5]  # steps 2, 4, 6 run diagnostics
    resumed = fit(resume_config(tmp_path / "r", {"max_steps": 8}), tmp_path / "r",
                  resume=True)
    assert resumed["step_peak_mb"] >= summary["step_peak_mb"] > 0


def test_step_memory_is_left_out_under_a_running_profiler():
    from torch.profiler import profile

    with profile():
        summary = fit(tiny(max_steps=3))
    assert summary["step_peak_mb"] is None and summary["steps"] == 3
