"""The estimator contract's helpers (ulr.contract), each against exact expectations: argument
checks, parameter selection, input handling, the per-row loss check, generator state and
``.grad`` accumulation."""

import pytest
import torch
from torch import nn

import ulr
import ulr.peers
from ulr import contract


def test_every_estimator_is_a_gradient_estimator(mlp):
    assert isinstance(ulr.LikelihoodRatio(mlp), contract.GradientEstimator)
    assert contract.GradientEstimator is ulr.peers.GradientEstimator
    assert not isinstance(mlp, contract.GradientEstimator)


def test_argument_checks():
    assert contract.check_model(nn.Linear(1, 1)).in_features == 1
    with pytest.raises(TypeError, match="nn.Module"):
        contract.check_model(lambda x: x)
    assert contract.check_positive_int("k", 4, even=True) == 4
    for bad in (0, 1.0, True, "2"):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            contract.check_positive_int("k", bad)
    with pytest.raises(ValueError, match="got 5; use 6 or set antithetic=False"):
        contract.check_positive_int("k", 5, even=True)
    assert contract.check_positive_float("sigma", 2) == 2.0
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="sigma must be a finite float > 0"):
            contract.check_positive_float("sigma", bad)


def test_trainable_selects_by_requires_grad_and_exclude(mlp):
    mlp[0].bias.requires_grad_(False)
    names = [n for n, _ in contract.trainable(mlp, ["4.*"])]
    assert names == ["0.weight", "2.weight", "2.bias"]
    with pytest.raises(ValueError, match="'nope' matches no parameter"):
        contract.trainable(mlp, ["nope"])
    with pytest.raises(ValueError, match="no trainable parameter"):
        contract.trainable(mlp, ["*"])


def test_inputs_become_a_call_and_a_batch_size():
    x = torch.zeros(3, 2)
    assert contract.as_call(x) == ((x,), {})
    assert contract.as_call((x, 1.0)) == ((x, 1.0), {})
    assert contract.as_call([x]) == ((x,), {})
    assert contract.as_call({"u": x}) == ((), {"u": x})
    assert contract.batch_size({"scale": torch.tensor(2.0), "u": (x,)}, None) == 3
    assert contract.batch_size(torch.tensor(1.0), torch.zeros(5)) == 5  # targets when no input
    with pytest.raises(ValueError, match="batch-first"):
        contract.batch_size(2.0, None)


def test_call_loss_wants_one_finite_loss_per_row():
    out, t = torch.ones(4, 2), torch.zeros(4)
    losses = contract.call_loss(lambda o, tt: o.sum(1) + tt, out, t, 4)
    assert torch.equal(losses, torch.full((4,), 2.0))
    assert contract.call_loss(lambda o: o[:, 0], out, None, 4).shape == (4,)  # no targets
    with pytest.raises(ValueError, match="looks reduced; pass reduction='none'"):
        contract.call_loss(lambda o, tt: o.sum(), out, t, 4)
    with pytest.raises(ValueError, match=r"e\.g\. \.mean\(dim=1\)"):
        contract.call_loss(lambda o, tt: o, out, t, 4)
    with pytest.raises(TypeError, match="one loss per row"):
        contract.call_loss(lambda o, tt: 1.0, out, t, 4)
    contract.check_finite(losses, 4)
    with pytest.raises(ValueError, match="non-finite"):
        contract.check_finite(torch.tensor([1.0, float("inf")]), 2)


def test_generator_is_explicit_and_its_state_round_trips():
    torch.manual_seed(0)
    a = contract.make_generator(None)
    torch.manual_seed(0)
    b = contract.make_generator(None)
    assert contract.draw_seeds(a, 3) == contract.draw_seeds(b, 3)  # follows torch.manual_seed
    given = torch.Generator().manual_seed(1)
    assert contract.make_generator(given) is given
    with pytest.raises(TypeError, match="torch.Generator"):
        contract.make_generator(1)
    state = contract.generator_state(given)
    first = contract.draw_seeds(given, 2)
    assert all(0 <= s < 2**62 for s in first)
    restored = contract.load_generator_state(torch.Generator(), state, "X")
    assert contract.draw_seeds(restored, 2) == first
    with pytest.raises(ValueError, match=r"was it saved by X\.state_dict\(\)"):
        contract.load_generator_state(given, {}, "X")


def test_accumulate_adds_like_backward():
    layer = nn.Linear(2, 1).double()
    params = list(layer.named_parameters())
    contract.accumulate(params, [torch.ones(1, 2), torch.ones(1)])  # float32 in, cast to float64
    contract.accumulate(params, [torch.ones(1, 2), torch.ones(1)])
    assert layer.weight.grad.dtype == torch.float64
    assert torch.equal(layer.weight.grad, torch.full((1, 2), 2.0, dtype=torch.float64))
    assert torch.equal(layer.bias.grad, torch.full((1,), 2.0, dtype=torch.float64))
