"""Bad input gets a clear error that names the problem and the fix; nothing is corrupted."""

import pytest
import torch
from conftest import ce
from torch import nn

import ulr


@pytest.fixture
def data():
    return torch.randn(4, 6), torch.randint(0, 4, (4,))


def test_scalar_loss_is_rejected(mlp, data):
    est = ulr.LikelihoodRatio(mlp, num_copies=2)
    with pytest.raises(ValueError, match=r"one loss per row.*reduction='none'"):
        est.loss_and_grads(lambda o, t: ce(o, t).mean(), *data)


def test_wrong_number_of_rows_is_rejected(mlp, data):
    est = ulr.LikelihoodRatio(mlp, num_copies=2)
    with pytest.raises(ValueError, match=r"shape \(8,\), but returned shape \(4,\)"):
        est.loss_and_grads(lambda o, t: ce(o, t)[:4], *data)
    with pytest.raises(ValueError, match=r"per row, e.g. .mean\(dim=1\)"):
        est.loss_and_grads(lambda o, t: o, *data)
    with pytest.raises(TypeError, match="must return a tensor"):
        est.loss_and_grads(lambda o, t: 1.0, *data)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_losses_leave_grads_untouched(mlp, data, bad):
    est = ulr.LikelihoodRatio(mlp, num_copies=2)
    est.loss_and_grads(ce, *data)
    before = [p.grad.clone() for p in mlp.parameters()]

    def loss(o, t):
        out = ce(o, t)
        out[3] = bad
        return out

    with pytest.raises(ValueError, match="1 non-finite losses out of 8"):
        est.loss_and_grads(loss, *data)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, mlp.parameters()))


def test_odd_num_copies_with_antithetic(mlp):
    with pytest.raises(ValueError, match="even num_copies.*use num_copies=6"):
        ulr.LikelihoodRatio(mlp, num_copies=5, sampler=ulr.antithetic())
    with pytest.raises(ValueError, match="even num_copies"):
        ulr.LikelihoodRatio(mlp, num_copies=4, sampler=ulr.antithetic(),
                            plan=ulr.plans.layerwise(num_copies=3)
                            ).loss_and_grads(ce, torch.randn(2, 6), torch.tensor([0, 1]))


def test_leave_one_out_needs_independent_copies(mlp):
    with pytest.raises(ValueError, match="leave_one_out.*num_copies >= 2"):
        ulr.LikelihoodRatio(mlp, num_copies=1, baseline=ulr.baselines.leave_one_out())
    with pytest.raises(ValueError, match=">= 4 with antithetic"):
        ulr.LikelihoodRatio(mlp, num_copies=2, sampler=ulr.antithetic(),
                            baseline=ulr.baselines.leave_one_out())


def test_no_site_found(mlp):
    with pytest.raises(ValueError, match="no site found.*named_modules"):
        ulr.LikelihoodRatio(mlp, sites=ulr.sites.by_type(nn.Conv2d))
    est = ulr.LikelihoodRatio(mlp, sites=ulr.sites.marked("nothing"))
    with pytest.raises(ValueError, match="no site fired"):
        est.loss_and_grads(ce, torch.randn(2, 6), torch.tensor([0, 1]))


def test_uncovered_parameters_are_named_and_grads_untouched(mlp, data):
    est = ulr.LikelihoodRatio(mlp, sites=["0", "2"], num_copies=2)
    with pytest.raises(ValueError, match=r"\['4.bias', '4.weight'\] are used after the last "
                                         r"noise site(.|\n)*exclude="):
        est.loss_and_grads(ce, *data)
    assert all(p.grad is None for p in mlp.parameters())
    est = ulr.LikelihoodRatio(mlp, sites=["0", "2"], num_copies=2, exclude=["4.*"])
    est.loss_and_grads(ce, *data)
    assert mlp[4].weight.grad is None and mlp[0].weight.grad is not None
    mlp[4].requires_grad_(False)
    mlp.zero_grad(set_to_none=True)
    ulr.LikelihoodRatio(mlp, sites=["0", "2"], num_copies=2).loss_and_grads(ce, *data)
    assert mlp[4].weight.grad is None


def test_exclude_pattern_must_match(mlp):
    with pytest.raises(ValueError, match="'nope' matches no parameter"):
        ulr.LikelihoodRatio(mlp, exclude=["nope"])


def test_batchnorm_needs_no_warning_in_either_mode():
    """Train-mode BatchNorm is handled (test_no_silent_bias.py), eval mode is plain."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    import warnings

    for mode in (model.train, model.eval):
        mode()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ulr.LikelihoodRatio(model, num_copies=2).loss_and_grads(ce, x, y)


def test_site_that_is_not_batch_first():
    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x.transpose(0, 1)).mean(0)

    est = ulr.LikelihoodRatio(TimeFirst(), num_copies=2)
    with pytest.raises(ValueError, match="must be batch-first"):
        est.loss_and_grads(lambda o: o.sum(1), torch.randn(4, 5, 3))


def test_bad_arguments_have_clear_types(mlp):
    with pytest.raises(TypeError, match="nn.Module"):
        ulr.LikelihoodRatio(lambda x: x)
    with pytest.raises(ValueError, match="num_copies must be an int >= 1"):
        ulr.LikelihoodRatio(mlp, num_copies=0)
    with pytest.raises(TypeError, match="Sampler"):
        ulr.LikelihoodRatio(mlp, sampler="antithetic")
    with pytest.raises(TypeError, match="Baseline"):
        ulr.LikelihoodRatio(mlp, baseline="leave_one_out")
    with pytest.raises(TypeError, match="sites must be"):
        ulr.LikelihoodRatio(mlp, sites=3)
    with pytest.raises(TypeError, match="noise must be"):
        ulr.LikelihoodRatio(mlp, noise=0.1)
    with pytest.raises(ValueError, match="matches no pattern of the noise mapping"):
        ulr.LikelihoodRatio(mlp, noise={"0": ulr.Gaussian(0.1)})
    with pytest.raises(ValueError, match="does not broadcast"):
        ulr.LikelihoodRatio(mlp, noise=ulr.Gaussian(torch.ones(5))).loss_and_grads(
            ce, torch.randn(2, 6), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not the batch size"):
        ulr.LikelihoodRatio(mlp).loss_and_grads(ce, torch.randn(2, 6), torch.tensor([0, 1, 2]))


def test_layerwise_group_errors(mlp, data):
    with pytest.raises(ValueError, match="matches no site; the sites are"):
        ulr.LikelihoodRatio(mlp, plan=ulr.plans.layerwise([["0"], ["9"]])).loss_and_grads(
            ce, *data)
    with pytest.raises(ValueError, match="one group only"):
        ulr.LikelihoodRatio(mlp, plan=ulr.plans.layerwise([["0", "2"], ["2", "4"]])
                            ).loss_and_grads(ce, *data)
    with pytest.raises(ValueError, match="2 entries but there are 3"):
        ulr.LikelihoodRatio(mlp, plan=ulr.plans.layerwise(num_copies=[2, 2])).loss_and_grads(
            ce, *data)
