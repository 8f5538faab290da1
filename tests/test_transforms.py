"""Loss transforms (ulr.transforms, spelled ulr.baselines and ulr.peers.shaping): exact values
of every member, their state, composition and checks."""

import pytest
import torch

import ulr
import ulr.peers
from ulr.transforms import Context


def test_leave_one_out_values():
    losses = torch.tensor([[1.0, 10.0], [2.0, 20.0], [6.0, 60.0]])
    out = ulr.baselines.leave_one_out()(losses, Context(torch.arange(3)))
    torch.testing.assert_close(out, torch.tensor([[-3.0, -30.0], [-1.5, -15.0], [4.5, 45.0]]))
    # antithetic partners (same group) are not each other's baseline
    losses = torch.tensor([[1.0], [2.0], [5.0], [8.0]])
    out = ulr.baselines.leave_one_out()(losses, Context(torch.tensor([0, 1, 0, 1])))
    torch.testing.assert_close(out, torch.tensor([[1 - 5.0], [2 - 3.0], [5 - 5.0], [8 - 3.0]]))


def test_clean_and_running_average_and_chain():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ctx = Context(torch.arange(2), clean_losses=torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(ulr.baselines.clean()(losses, ctx),
                               torch.tensor([[0.5, 1.0], [2.5, 3.0]]))
    ra = ulr.baselines.running_average(0.5)
    torch.testing.assert_close(ra(losses, ctx), losses)  # first step: nothing to subtract
    torch.testing.assert_close(ra(losses + 1, ctx), losses + 1 - 2.5)
    assert ra.state_dict() == {"values": {"all": 0.5 * 2.5 + 0.5 * 3.5}}
    fresh = ulr.baselines.running_average(0.5)
    fresh.load_state_dict(ra.state_dict())
    torch.testing.assert_close(fresh(losses, ctx), losses - 3.0)
    chained = ulr.baselines.chain(ulr.baselines.clean(), ulr.baselines.leave_one_out())
    assert chained.needs_clean
    with pytest.raises(ValueError):
        ulr.baselines.running_average(1.0)


def test_one_family_under_three_spellings():
    from ulr import transforms

    assert ulr.baselines.Baseline is transforms.Transform is ulr.peers.shaping.Shaping
    assert ulr.baselines.Context is Context
    assert ulr.peers.centered_ranks is transforms.centered_ranks
    assert ulr.peers.standardized is transforms.standardized
    for make in (ulr.baselines.none, ulr.baselines.leave_one_out, ulr.baselines.clean,
                 ulr.baselines.running_average, ulr.peers.centered_ranks,
                 ulr.peers.standardized):
        assert isinstance(make(), transforms.Transform)
    with pytest.raises(TypeError, match="chain\\(\\) takes loss transforms"):
        transforms.chain(transforms.none(), lambda losses: losses)


def test_centered_ranks_values():
    ranks = ulr.peers.centered_ranks()
    torch.testing.assert_close(ranks(torch.tensor([3.0, -1.0, 7.0])),
                               torch.tensor([0.0, -0.5, 0.5]))
    # ties in copy order; invariant to an increasing transform of the losses
    torch.testing.assert_close(ranks(torch.tensor([2.0, 2.0, 1.0])),
                               torch.tensor([0.0, 0.5, -0.5]))
    x = torch.randn(9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ranks(x), ranks(10 * x.exp() - 3))
    assert torch.equal(ranks(torch.tensor([5.0])), torch.zeros(1))
    assert ranks(torch.ones(3, dtype=torch.float64)).dtype == torch.float64
    assert ranks(torch.ones(3, dtype=torch.float16)).dtype == torch.float32


def test_standardized_values():
    std = ulr.peers.standardized()
    torch.testing.assert_close(std(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(std(torch.full((4,), 2.0)), torch.zeros(4))  # no spread: only centered
    assert torch.equal(std(torch.tensor([5.0])), torch.zeros(1))


def test_shapings_work_along_the_copies_of_each_example():
    # [K, B]: each column (example) is shaped on its own, as the LR estimator lays losses out
    losses = torch.tensor([[3.0, 1.0], [1.0, 1.0], [2.0, 7.0]])
    torch.testing.assert_close(ulr.peers.centered_ranks()(losses),
                               torch.tensor([[0.5, -0.5], [-0.5, 0.0], [0.0, 0.5]]))
    out = ulr.peers.standardized()(losses)
    for b in range(2):
        torch.testing.assert_close(out[:, b], ulr.peers.standardized()(losses[:, b]))


def test_baselines_without_a_context_treat_every_copy_as_independent():
    losses = torch.tensor([1.0, 2.0, 6.0])  # [P], as evolution strategies pass them
    torch.testing.assert_close(ulr.baselines.leave_one_out()(losses),
                               torch.tensor([-3.0, -1.5, 4.5]))
    ra = ulr.baselines.running_average(0.5)
    ra(losses)
    assert ra.state_dict() == {"values": {"all": 3.0}}
    with pytest.raises(RuntimeError, match="without clean losses"):
        ulr.baselines.clean()(losses)


def test_chain_state_and_flags():
    chained = ulr.baselines.chain(ulr.baselines.running_average(0.5), ulr.peers.standardized())
    assert not chained.needs_clean and not chained.row_local
    assert ulr.baselines.chain(ulr.baselines.none(), ulr.baselines.clean()).row_local
    ctx = Context(torch.arange(2))
    chained(torch.tensor([[1.0], [3.0]]), ctx)
    assert chained.state_dict() == {"0": {"values": {"all": 2.0}}, "1": {}}
    fresh = ulr.baselines.chain(ulr.baselines.running_average(0.5), ulr.peers.standardized())
    fresh.load_state_dict(chained.state_dict())
    assert fresh.parts[0].values == {"all": 2.0}
    assert repr(chained) == "chain(running_average(0.5), standardized())"
    with pytest.raises(ValueError, match="leave_one_out"):
        ulr.baselines.chain(ulr.baselines.leave_one_out()).check(2, torch.zeros(2).long())


def test_the_likelihood_ratio_estimator_takes_a_shaping(mlp):
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    est = ulr.LikelihoodRatio(mlp, num_copies=4, baseline=ulr.peers.centered_ranks(),
                              generator=torch.Generator().manual_seed(0))
    est.loss_and_grads(lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none"),
                       x, y)
    assert all(torch.isfinite(p.grad).all() for p in mlp.parameters())
