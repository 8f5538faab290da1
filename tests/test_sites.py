"""Sites (ulr.sites): which module outputs and marks each spec selects and with which noise, how
specs combine, the modules that own a parameter, and the perturb / copy_layout primitives when
no estimator runs."""

import pytest
import torch
from torch import nn
from toy_models import Cell

import ulr
from ulr import sites


def _net():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    net.scale = nn.Parameter(torch.ones(1))  # the root owns a parameter too
    return net


def test_named_param_owners_lists_the_modules_that_own_a_trainable_parameter():
    net = _net()
    assert [n for n, _ in sites.named_param_owners(net)] == ["", "0", "2.0"]
    net[2][0].requires_grad_(False)
    assert [n for n, _ in sites.named_param_owners(net)] == ["", "0"]
    assert [n for n, _ in sites.named_param_owners(net, trainable=False)] == ["", "0", "2.0"]
    assert sites.named_param_owners(net)[1][1] is net[0]
    with pytest.raises(TypeError, match="nn.Module"):
        sites.named_param_owners(lambda x: x)


def test_param_owners_chooses_the_same_modules():
    net = _net()
    spec = sites.param_owners()
    chosen = [n for n, m in net.named_modules() if spec.choose(n, m)]
    assert chosen == [n for n, _ in sites.named_param_owners(net)]
    assert spec.choose("mark", None) is None and not spec.selects_marks


def test_specs_choose_by_type_name_predicate_and_mark():
    lin, relu = nn.Linear(1, 1), nn.ReLU()
    noise = ulr.Gaussian(0.3)
    by_type = sites.by_type(nn.Linear, noise=noise)
    assert by_type.choose("a", lin) is noise and by_type.choose("b", relu) is None
    by_name = sites.by_name("enc.*", "head")
    assert by_name.choose("enc.0", relu) is True and by_name.choose("head", None) is True
    assert by_name.choose("dec.0", lin) is None
    marked = sites.marked("rnn.*")
    assert marked.choose("rnn.pre", None) is True and marked.choose("rnn.pre", lin) is None
    assert sites.marked().choose("anything", None) is True
    where = sites.where(lambda name, m: name.startswith("x"))
    assert where.choose("x1", None) is True and where.choose("y", lin) is None
    per_name = sites.by_name({"0": ulr.Gaussian(0.1), "2": noise})
    assert per_name.choose("2", lin) is noise


def test_union_takes_the_first_noise_and_sees_marks():
    a, b = ulr.Gaussian(0.1), ulr.Gaussian(0.2)
    spec = sites.by_name("x") | sites.by_name("x", noise=a) | sites.by_name("x", noise=b)
    assert spec.choose("x", nn.ReLU()) is a
    assert (sites.by_type(nn.ReLU) | sites.by_name("y")).choose("y", None) is True
    assert (sites.by_type(nn.ReLU) | sites.marked()).selects_marks
    assert (["a"] | sites.by_type(nn.ReLU)).choose("a", None) is True  # a list on the left
    assert repr(sites.by_type(nn.Linear) | sites.marked("p")) == "by_type(Linear) | marked('p')"


def test_as_spec_normalises_the_sites_argument():
    assert repr(sites.as_spec(None)) == "param_owners()"
    assert sites.as_spec("a").choose("a", None) is True
    assert sites.as_spec(["a", "b"]).choose("b", None) is True
    spec = sites.by_type(nn.Linear)
    assert sites.as_spec(spec) is spec
    with pytest.raises(TypeError, match="sites must be a ulr.sites spec"):
        sites.as_spec(3)
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        sites.by_type(int)
    with pytest.raises(TypeError, match="noise must be a ulr noise"):
        sites.by_name("a", noise=0.1)
    with pytest.raises(ValueError, match="at least one name"):
        sites.by_name()


def test_copy_layout_is_none_when_idle():
    assert ulr.copy_layout() is None


def test_perturb_is_identity_when_idle():
    model = Cell()
    x = torch.randn(2, 3, 3)
    torch.testing.assert_close(model(x), model(x))
    assert ulr.perturb("anything", x) is x
