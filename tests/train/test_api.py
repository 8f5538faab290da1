"""ulr.fit (any nn.Module on data in the contract) and ulr.load_run (a run's trained model)."""

import json
import shutil
import subprocess
import sys

import own_model_file
import pytest
import torch
from torch import nn

import ulr
from ulr.cli import main
from ulr.train import ConfigError, RunConfig
from ulr.train import fit as train_fit


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    return {"train": (x, torch.randint(0, 3, (96,), generator=g)),
            "test": (x[:30], x[:30, 0].gt(0).long())}


def test_fit_and_load_run_are_lazy_attributes():
    code = ("import sys, ulr; a = 'ulr.train' in sys.modules; ulr.fit, ulr.load_run; "
            "print(a, 'ulr.train.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True"]


def test_fit_trains_the_model_in_place_and_returns_the_summary(tmp_path):
    net, data = _net(), _data()
    before = net[0].weight.detach().clone()
    summary = ulr.fit(net, data, epochs=2, num_copies=8, out_dir=tmp_path / "run")
    assert summary["steps"] == 2 * 3 and summary["epochs_completed"] == 2
    assert not torch.equal(net[0].weight.detach(), before)
    assert summary["model"].startswith("object:") and summary["final"]["test_acc"] is not None
    # the same model (weights given back) loads from the run directory
    run = ulr.load_run(tmp_path / "run", "last", model=_net())
    assert torch.equal(run.model[0].weight, net[0].weight.detach())
    with pytest.raises(ValueError, match="passed to ulr.fit as a Python object"):
        ulr.load_run(tmp_path / "run")


def test_fit_equals_the_cli_loop_for_a_spec_model(tmp_path):
    """ulr.fit with spec strings is train.fit with the same config: one loop."""
    path = own_model_file.write(tmp_path, "net.py")
    a = ulr.fit(f"{path}:make_net", f"{path}:load", epochs=1, num_copies=4)
    b = train_fit(RunConfig(model=f"{path}:make_net", data=f"{path}:load", epochs=1,
                            num_copies=4))
    assert a["final"] == b["final"] and a["model"] == f"{path}:make_net"


def test_fit_config_forms_overrides_and_loader_batch_size(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("epochs = 1\nnum_copies = 4\n")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.randn(40, 4), torch.arange(40) % 2), batch_size=12)
    summary = ulr.fit(nn.Linear(4, 2), loader, toml, val_fraction=0.0)
    assert summary["config"]["batch_size"] == 12 and summary["steps"] == 4
    assert ulr.fit(nn.Linear(4, 2), loader, {"epochs": 1}, method="bp")["method"] == "bp"
    with pytest.raises(ConfigError, match="did you mean 'num_copies'"):
        ulr.fit(nn.Linear(4, 2), loader, num_copy=3)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        ulr.fit(42, loader)


def test_fit_resumes_bit_exactly(tmp_path):
    straight = _net()
    ulr.fit(straight, _data(), epochs=2, num_copies=4, out_dir=tmp_path / "a")
    resumed = _net()
    ulr.fit(resumed, _data(), epochs=1, num_copies=4, out_dir=tmp_path / "b")
    ulr.fit(_net(), _data(), epochs=2, num_copies=4, out_dir=tmp_path / "b", resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_run_rebuilds_built_in_and_file_models(tmp_path, capsys):
    assert main(["train", "--method", "bp", "--epochs", "2", "--quiet", "--no-plots",
                 "--out", str(tmp_path / "mlp")]) == 0
    run = ulr.load_run(tmp_path / "mlp")
    assert run.weights.name == "best.pt" and run.epoch in (1, 2) and not run.model.training
    assert run.config.model == "mlp" and run.summary["steps"] > 0
    path = own_model_file.write(tmp_path, "net.py")
    assert main(["train", "--model", f"{path}:make_net", "--data", f"{path}:load",
                 "--model-arg", "hidden=5", "--method", "ulr", "--epochs", "1", "--quiet",
                 "--no-plots", "--out", str(tmp_path / "own")]) == 0
    last = ulr.load_run(tmp_path / "own", weights="last")
    assert last.model[0].out_features == 5 and last.epoch == 1
    saved = torch.load(tmp_path / "own" / "checkpoint.pt", weights_only=True)
    assert saved["model_source"]["file"] == str(path)
    assert json.loads((tmp_path / "own" / "summary.json").read_text())["model_source"][
        "in_shape"] == [4]
    # a changed file still builds, with a warning; a moved one says so
    path.write_text(own_model_file.TEXT + "\n# edited\n")
    with pytest.warns(UserWarning, match="has changed since the run"):
        ulr.load_run(tmp_path / "own")
    shutil.move(path, tmp_path / "moved.py")
    with pytest.raises(FileNotFoundError, match="does not exist.*moved"):
        ulr.load_run(tmp_path / "own")


def test_load_run_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ulr.load_run(tmp_path / "nothing")
    with pytest.raises(ValueError, match="weights must be one of"):
        ulr.load_run(tmp_path, weights="first")
    assert main(["train", "--method", "ulr", "bp", "--epochs", "1", "--max-steps", "2",
                 "--quiet", "--no-plots", "--out", str(tmp_path / "group")]) == 0
    with pytest.raises(FileNotFoundError, match="comparison directory.*ulr, bp"):
        ulr.load_run(tmp_path / "group")
    with pytest.raises(FileNotFoundError, match="no best.pt.*weights='last'"):
        ulr.load_run(tmp_path / "group" / "ulr")  # stopped inside its first epoch
    assert ulr.load_run(tmp_path / "group" / "ulr", "last").model is not None
