"""Seeded weight noise (ulr.peers._weights): regenerable from its seed, standard, swapped
into a module while it runs and never written."""

import pytest
import torch
from conftest import ce
from peer_cases import gen
from torch import nn

import ulr.peers
from ulr.peers import SPSA, seeded_noise


def test_seeded_noise_is_regenerable_and_standard():
    p = torch.empty(200, 50)
    a, b = seeded_noise(p, 11, 3), seeded_noise(p, 11, 3)
    assert torch.equal(a, b) and not torch.equal(a, seeded_noise(p, 11, 4))
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02  # 10^4 samples
    r = seeded_noise(p, 11, 3, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert seeded_noise(p.half(), 1, 0).dtype == torch.float16


def test_weights_are_swapped_not_rewritten():
    # During a module's forward it sees a perturbed copy of its own weights only; the original
    # storage is never written to and is put back afterwards.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    ptrs = [p.data_ptr() for p in model.parameters()]
    seen = []

    def spy(module, args, output):
        seen.append((model[0].weight.data_ptr(), model[1].weight.data_ptr()))

    model[1].register_forward_hook(spy)  # runs before the estimator's restoring hook
    SPSA(model, generator=gen()).loss_and_grads(ce, torch.randn(4, 3), torch.zeros(4).long())
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert len(seen) == 2
    assert all(a == ptrs[0] and b != ptrs[2] for a, b in seen)  # layer 0 restored, 1 perturbed


def test_the_old_name_weight_noise_warns_and_gives_seeded_noise():
    p = torch.empty(3, 4)
    with pytest.warns(DeprecationWarning, match="use ulr.peers.seeded_noise"):
        old = ulr.peers.weight_noise(p, 11, 3)
    assert torch.equal(old, seeded_noise(p, 11, 3))
