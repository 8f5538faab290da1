"""Closed-form weight gradients against autograd's vector-Jacobian product of the module."""

import copy

import pytest
import torch
from torch import nn

from ulr.functional import has_closed_form, lr_signal, module_grads


def _vjp(module, x, g):
    out = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    grads = torch.autograd.grad(out, params, g)
    return dict(zip(["weight", "bias"], grads))


CONVS = [
    nn.Conv1d(3, 4, 3),
    nn.Conv1d(4, 6, 5, stride=2, padding=2, dilation=1, groups=2, bias=False),
    nn.Conv2d(2, 4, 3, padding=1),
    nn.Conv2d(4, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=4),
    nn.Conv2d(3, 5, 3, padding="same", dilation=2),
    nn.Conv2d(3, 5, 4, padding="same"),  # asymmetric "same" padding
    nn.Conv2d(3, 5, 3, padding="valid", bias=False),
    nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"),
    nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode="replicate", stride=2),
    nn.Conv3d(2, 3, 3, padding=1, stride=(1, 2, 2)),
]


@pytest.mark.parametrize("conv", CONVS, ids=repr)
def test_conv_weight_grad_matches_autograd(conv):
    torch.manual_seed(0)
    nd = len(conv.kernel_size)
    x = torch.randn(5, conv.in_channels, *([9] * nd), dtype=torch.float64)
    conv = conv.double()
    g = torch.randn_like(conv(x))
    want = _vjp(conv, x, g)
    got = module_grads(conv, x, g)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_weight_grad_matches_autograd(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(5, 6, bias=bias).double()
    x = torch.randn(*shape, dtype=torch.float64)
    g = torch.randn(*shape[:-1], 6, dtype=torch.float64)
    want, got = _vjp(lin, x, g), module_grads(lin, x, g)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_frozen_parameters_get_no_closed_form_grad():
    lin = nn.Linear(3, 2)
    lin.weight.requires_grad_(False)
    assert set(module_grads(lin, torch.randn(4, 3), torch.randn(4, 2))) == {"bias"}


def test_has_closed_form():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    assert has_closed_form(nn.Linear(2, 2)) and has_closed_form(nn.Conv2d(1, 1, 1))
    assert not has_closed_form(MyLinear(2, 2))
    assert not has_closed_form(nn.LayerNorm(3))
    assert not has_closed_form(nn.ConvTranspose2d(1, 1, 1))
    p = nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))
    assert not has_closed_form(p)


def test_lr_signal_normalises_by_rows():
    w = torch.tensor([1.0, 2.0])
    score = torch.ones(2, 3)
    torch.testing.assert_close(lr_signal(w, score), torch.tensor([[0.5] * 3, [1.0] * 3]))
    torch.testing.assert_close(lr_signal(w, score, 4), torch.tensor([[0.25] * 3, [0.5] * 3]))


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), CONVS[1], CONVS[3], CONVS[5], CONVS[8],
                                   CONVS[10]], ids=repr)
def test_per_example_weight_output_matches_a_loop(layer):
    from ulr.functional import per_example_weight_output

    torch.manual_seed(0)
    layer = layer.double()
    rows = 4
    if isinstance(layer, nn.Linear):
        x = torch.randn(rows, 2, 5, dtype=torch.float64)
    else:
        x = torch.randn(rows, layer.in_channels, *([9] * len(layer.kernel_size)),
                        dtype=torch.float64)
    e = torch.randn(rows, *layer.weight.shape, dtype=torch.float64)
    has_bias = layer.bias is not None
    eb = torch.randn(rows, layer.weight.shape[0], dtype=torch.float64) if has_bias else None
    got = per_example_weight_output(layer, x, e, eb)
    for r in range(rows):
        perturbed = copy.deepcopy(layer)
        with torch.no_grad():
            perturbed.weight += e[r]
            if has_bias:
                perturbed.bias += eb[r]
            want = perturbed(x[r : r + 1]) - layer(x[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], want)


def test_conv_weight_grad_in_row_blocks_equals_one_block(monkeypatch):
    import ulr.functional as fn

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    whole = fn.conv_weight_grad(x, g, conv)
    monkeypatch.setattr(fn, "_CONV_BLOCK_BYTES", 1)  # one row per block
    torch.testing.assert_close(fn.conv_weight_grad(x, g, conv), whole)
