"""Recipes: names become objects once, for every method (backprop included) and for bp-noise."""

import pytest
import torch

import ulr
from ulr.noise import WeightNoise
from ulr.train import ConfigError, NoiseInjection, RunConfig, build_estimator
from ulr.train.recipes import noise_for

CPU = torch.device("cpu")


def tiny(**changes):
    return RunConfig(**{**dict(batch_size=128, num_copies=8, threads=1, device="cpu",
                               epochs=2), **changes})


def mlp():
    return ulr.models.build("mlp", in_shape=(64,), num_classes=10)


def sigmas(noise, names):
    """The scale of each site as the estimator resolves it: the first matching pattern."""
    import fnmatch

    return {n: next(z for p, z in noise.items() if fnmatch.fnmatchcase(n, p)).sigma
            for n in names}


def test_recommended_weight_noise_reaches_the_estimator():
    """ResNet-5's recommended config puts weight noise on conv1/conv2 and output noise after."""
    model = ulr.models.build("resnet5", in_shape=(1, 8, 8), num_classes=10)
    config = tiny(model="resnet5", recommended=True)
    est = build_estimator(config, model, CPU)
    noise, _ = noise_for(config, model)
    assert est.noise.keys() == noise.keys()
    kinds = {n: isinstance(noise[n], WeightNoise) for n in ("conv1", "conv2", "conv3", "conv4",
                                                             "fc")}
    assert kinds == {"conv1": True, "conv2": True, "conv3": False, "conv4": False, "fc": False}
    assert noise["conv1"].noise.sigma == 1e-3
    # hybrid blocks take output noise at their ends
    blocks, _ = noise_for(tiny(model="resnet5", recommended=True, blocks=2), model,
                          weights=False)
    assert not any(isinstance(z, WeightNoise) for z in blocks.values())


def test_site_sigma_beats_recommended_beats_sigma_for_ulr_and_bp_noise():
    """--site-sigma beats --recommended, which beats --sigma; bp-noise draws the same scales."""
    model = mlp()
    noise, _ = noise_for(tiny(sigma=0.3, site_sigma={"out": 2.0}), model)
    assert sigmas(noise, ["hidden.0", "out"]) == {"hidden.0": 0.3, "out": 2.0}
    rec = ulr.models.recommended_config(model)["sigma"]
    noise, _ = noise_for(tiny(recommended=True, site_sigma={"out": 2.0}), model)
    assert sigmas(noise, ["hidden.0", "out"]) == {"hidden.0": rec["hidden.0"], "out": 2.0}
    injection = NoiseInjection(tiny(method="bp-noise", sigma=0.3, site_sigma={"h*": 0.7}),
                               model, CPU)
    assert {n: z.sigma for n, z in injection.noises.items()} == {"hidden.0": 0.7, "out": 0.3}
    with pytest.raises(ValueError, match=r"patterns \['outt'\] match no module of mlp"):
        build_estimator(tiny(site_sigma={"outt": 2.0}), model, CPU)


def test_bp_noise_sites_are_the_estimators_sites():
    """By name (wildcards) or, by default, every module that owns a trainable parameter."""
    model = mlp()
    assert list(NoiseInjection(tiny(method="bp-noise"), model, CPU).noises) == [
        "hidden.0", "out"]
    assert list(NoiseInjection(tiny(method="bp-noise", sites=["o*"]), model, CPU).noises) == [
        "out"]


@pytest.mark.parametrize("changes", [dict(method="bp"), dict(method="bp-noise"),
                                     dict(method="ulr", blocks=0)])
def test_backprop_is_an_estimator_like_the_others(changes):
    est = build_estimator(tiny(**changes), mlp(), CPU)
    assert isinstance(est, ulr.peers.Backprop)


@pytest.mark.parametrize("changes, keys, words", [
    (dict(memory="chunked"), "memory='chunked', chunk_size=None", "needs chunk_size"),
    (dict(workers=2, memory="replay"), "workers=2", "workers > 0 needs memory"),
    (dict(sampler="sobol"), "baseline='leave-one-out', sampler='sobol'", "leave_one_out()"),
    (dict(sampler="antithetic", num_copies=7), "num_copies=7", "use num_copies=8"),
])
def test_config_is_judged_by_the_library_with_the_keys_named(changes, keys, words):
    with pytest.raises(ConfigError) as err:
        tiny(**changes)
    assert keys in str(err.value) and words in str(err.value)
    tiny(**changes, method="bp")  # options of the estimator only: bp ignores them


def test_config_checks_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    tiny(sampler="antithetic-sobol", baseline="clean", memory="chunked", chunk_size=2)
    assert torch.equal(state, torch.get_rng_state())


def test_per_step_schedules_warm_up_and_decay_every_step():
    import math

    import torch

    from ulr.train import RunConfig
    from ulr.train.recipes import per_step, scheduler

    def lrs(**kw):
        config = RunConfig(lr=1.0, epochs=2, **kw)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = scheduler(config, opt, steps_per_epoch=5), []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, per_step(config)

    warm, every = lrs(warmup_steps=4)
    assert every and warm[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos, _ = lrs(schedule="cosine-steps", warmup_steps=2)
    assert cos[:3] == [0.5, 1.0, 1.0] and cos[2] > cos[5] > cos[9] > 0
    assert math.isclose(cos[6], 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    lin, _ = lrs(schedule="linear-steps")
    assert [round(v, 3) for v in lin[:3]] == [1.0, 0.9, 0.8]
    assert not per_step(RunConfig(schedule="cosine"))  # the per-epoch schedules stay as they were
