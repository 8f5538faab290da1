"""Plans (ulr.plans): the passes each plan runs for given sites (groups, copy counts, keys,
errors), and how the estimator learns the sites a layer-wise plan needs."""

import pytest
import torch
from torch import nn

import ulr
from ulr.plans import Pass, all_sites, layerwise

SITES = ["0", "2", "4"]


def test_all_sites_is_one_pass_over_every_site():
    assert all_sites().passes(SITES, 8) == [Pass(None, 8, "all", None)]
    assert all_sites(cache_prefix=False).passes(SITES, 8)[0].cache_prefix is False
    assert not all_sites().needs_site_names


def test_layerwise_is_one_pass_per_site_or_group():
    plan = layerwise()
    assert plan.needs_site_names
    assert plan.passes(SITES, 8) == [Pass(frozenset({s}), 8, s, None) for s in SITES]
    grouped = layerwise([["0", "2"], "4"], num_copies=[4, 2]).passes(SITES, 8)
    assert [(p.sites, p.num_copies, p.key) for p in grouped] == [
        (frozenset({"0", "2"}), 4, "0+2"), (frozenset({"4"}), 2, "4")]
    # patterns match sites; a mapping gives per-site counts, the default fills the others
    by_site = layerwise(["[02]", "4"], num_copies={"4": 16}).passes(SITES, 8)
    assert [(p.key, p.num_copies) for p in by_site] == [("0+2", 8), ("4", 16)]
    assert [p.num_copies for p in layerwise(num_copies=3).passes(SITES, 8)] == [3, 3, 3]


def test_layerwise_errors_name_the_problem():
    with pytest.raises(ValueError, match="non-empty groups"):
        layerwise([[]])
    with pytest.raises(ValueError, match="num_copies must be >= 1"):
        layerwise(num_copies=0)
    with pytest.raises(ValueError, match="'9', which matches no site"):
        layerwise(["9"]).passes(SITES, 8)
    with pytest.raises(ValueError, match="in layerwise groups 0 and 1"):
        layerwise(["*", "4"]).passes(SITES, 8)
    with pytest.raises(ValueError, match="2 entries but there are 3 site groups"):
        layerwise(num_copies=[1, 2]).passes(SITES, 8)
    with pytest.raises(ValueError, match="different num_copies"):
        layerwise([["0", "2"]], num_copies={"0": 2, "2": 4}).passes(SITES, 8)


def test_layerwise_learns_the_sites_once_and_follows_control_flow():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            if x.sum() > 0:  # input-dependent: site "b" fires only for some batches
                h = self.b(h)
            return self.c(h)

    model = Branchy()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    # tiled inputs, so that every pass shows as 8 rows at the model's input
    est = ulr.LikelihoodRatio(model, num_copies=2, plan=ulr.plans.layerwise(cache_prefix=False),
                              exclude=["b.*"])
    neg, pos = -torch.ones(4, 3), torch.ones(4, 3)
    est.loss_and_grads(lambda o: o.sum(1), neg)
    assert calls == [4, 8, 8]  # discovery, then one pass per site (a, c)
    calls.clear()
    est.loss_and_grads(lambda o: o.sum(1), neg)
    assert calls == [8, 8]  # names known: no discovery pass
    calls.clear()
    model.zero_grad(set_to_none=True)
    est.loss_and_grads(lambda o: o.sum(1), pos)  # "b" appears: relearn and start over
    assert calls == [8, 8, 4, 8, 8, 8]
    assert est.state_dict()["site_names"] == ["a", "b", "c"]
