"""The user's own model and data (ulr.train.custom): specs, the data contract, clear errors."""

import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from ulr.data import Dataset
from ulr.train import ConfigError, RunConfig
from ulr.train.custom import (
    as_dataset,
    build_model,
    display_name,
    load_data,
    normalise_spec,
    resolve,
)

USER_CODE = '''
import torch
from torch import nn

def make_net(in_shape, num_outputs, hidden=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0], hidden), nn.Tanh(),
                         nn.Linear(hidden, num_outputs))

def only_args(width):
    return nn.Linear(4, width)

def not_a_module():
    return 42

class Factory:
    @staticmethod
    def build(in_shape, num_outputs):
        return nn.Linear(in_shape[0], num_outputs)

def load(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 4, generator=g)
    return {"train": (x, (x[:, 0] > 0).long()), "test": (x[:10], (x[:10, 0] > 0).long())}

THING = 3
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_code.py"
    path.write_text(textwrap.dedent(USER_CODE))
    return path


def test_specs_are_config_values_and_files_become_absolute(user_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = RunConfig(model="user_code.py:make_net", data="my_pkg.data:load")
    assert config.model == f"{user_file}:make_net"
    assert config.data == "my_pkg.data:load"  # a module spec is kept as given
    assert display_name(config.model) == "make_net"
    with pytest.raises(ConfigError, match="must name a callable"):
        RunConfig(model="user_code.py:")
    with pytest.raises(ConfigError, match="not a module name"):
        RunConfig(model="my pkg:make")
    with pytest.raises(ConfigError, match="did you mean 'mlp'"):  # registry names still checked
        RunConfig(model="mpl")


def test_model_callable_gets_the_shapes_it_names_and_the_model_args(user_file):
    net = build_model(f"{user_file}:make_net", {"hidden": 5}, (4,), 3)
    assert net(torch.zeros(2, 4)).shape == (2, 3) and net[1].out_features == 5
    assert build_model(f"{user_file}:only_args", {"width": 6}, (4,), 3).out_features == 6
    assert build_model(f"{user_file}:Factory.build", {}, (4,), 2).out_features == 2


def test_model_errors_say_what_is_wrong(user_file, tmp_path):
    with pytest.raises(TypeError, match=r"signature is \(width\)"):
        build_model(f"{user_file}:only_args", {}, (4,), 3)
    with pytest.raises(TypeError, match="returned a int, not a torch.nn.Module"):
        build_model(f"{user_file}:not_a_module", {}, (4,), 3)
    with pytest.raises(ImportError, match="has no attribute 'make_nett'.*did you mean 'make_net'"):
        resolve(f"{user_file}:make_nett", "model")
    with pytest.raises(TypeError, match="not a callable"):
        resolve(f"{user_file}:THING", "model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(f"{tmp_path / 'gone.py'}:make_net", "model")
    with pytest.raises(ImportError, match=r"no module named 'no_such_pkg' on sys.path \["):
        resolve("no_such_pkg.models:make_net", "model")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ImportError, match="raised RuntimeError: boom"):
        resolve(f"{broken}:f", "model")


def test_module_specs_import_from_the_working_directory(tmp_path, monkeypatch):
    pkg = tmp_path / "my_pkg_e16"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    net = build_model("my_pkg_e16.models:make_net", {}, (4,), 2)
    assert isinstance(net, nn.Module)


def test_data_callable_contract(user_file):
    ds = load_data(f"{user_file}:load", seed=1, val_fraction=0.25, data_dir=None)
    assert isinstance(ds, Dataset) and ds.task == "classification" and ds.num_classes == 2
    assert (len(ds.train[0]), len(ds.val[0]), len(ds.test[0])) == (45, 15, 10)
    assert ds.input_shape == (4,) and ds.name == "load"
    again = load_data(f"{user_file}:load", seed=1, val_fraction=0.25, data_dir=None)
    assert torch.equal(again.val[0], ds.val[0])  # the held-out split is seeded


def test_as_dataset_accepts_the_documented_forms():
    x = np.random.default_rng(0).normal(size=(40, 3))  # float64 numpy -> float32 tensors
    y = np.arange(40) % 4
    ds = as_dataset({"train": (x, y), "val": torch.utils.data.TensorDataset(
        torch.randn(8, 3), torch.arange(8) % 4)})
    assert ds.train[0].dtype == torch.float32 and ds.num_classes == 4 and len(ds.test[0]) == 0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.randn(20, 2), torch.randn(20, 1)), batch_size=4)
    reg = as_dataset(loader, val_fraction=0.2)  # a bare training split; float y: regression
    assert reg.task == "regression" and reg.train[1].shape == (16,) and len(reg.val[0]) == 4

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.full((2,), float(i)), i % 2

    assert as_dataset({"train": Pairs(), "task": "classification"}).train[0].shape[1:] == (2,)


@pytest.mark.parametrize("data, match", [
    (42, "must be a ulr.data.Dataset or a mapping"),
    ({"train": (torch.zeros(4, 2), torch.zeros(5))}, "same N"),
    ({"train": (torch.zeros(4, 2), torch.zeros(4)), "task": "classification"}, "int64 class"),
    ({"train": (torch.zeros(4, 2), torch.zeros(4)), "task": "ranking"}, "task must be one of"),
    ({"train": (torch.zeros(4, 2), torch.zeros(4)), "test": (torch.zeros(4, 3), torch.zeros(4))},
     "test examples have shape"),
])
def test_as_dataset_refuses_what_does_not_fit(data, match):
    with pytest.raises((TypeError, ValueError), match=match):
        as_dataset(data)


def test_normalise_spec_keeps_objects():
    assert normalise_spec("object:pkg.Net", "model") == "object:pkg.Net"
    assert display_name("object:pkg.Net") == "Net"
