"""Run configs: TOML parsing, validation of keys and values, method lists, round trips."""

import pytest

from ulr.train.config import ConfigError, RunConfig, check_values, configs_from_values, keys
from ulr.train.config_file import load_toml, parse_value, to_toml


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_file_is_normalised(tmp_path):
    path = write(tmp_path, """
model = "MLP"
data = "digits"
method = ["ulr", "bp"]
num-copies = 16
sigma = 1            # an int where a float is expected
baseline = "Leave_One_Out"
plan = "all_sites"
epochs = 3

[model_args]
hidden = [32, 16]
activation = "tanh"
""")
    values = load_toml(path)
    assert values["model"] == "mlp"
    assert values["num_copies"] == 16
    assert values["sigma"] == 1.0 and isinstance(values["sigma"], float)
    assert values["baseline"] == "leave-one-out"
    assert values["plan"] == "all-sites"
    assert values["model_args"] == {"hidden": [32, 16], "activation": "tanh"}
    configs = configs_from_values(values, str(path))
    assert [c.method for c in configs] == ["ulr", "bp"]
    assert all(c.epochs == 3 and c.num_copies == 16 for c in configs)


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    path = write(tmp_path, 'model = "mlp"\nnum_copy = 8\n')
    with pytest.raises(ConfigError) as err:
        load_toml(path)
    msg = str(err.value)
    assert "'num_copy'" in msg and "did you mean 'num_copies'" in msg
    assert str(path) in msg
    for key in ("num_copies", "sigma", "sampler", "diag_every"):
        assert key in msg


@pytest.mark.parametrize("text, words", [
    ('num_copies = "many"', ["num_copies", "must be an int", "'many'"]),
    ("num_copies = true", ["num_copies", "must be an int"]),
    ("sigma = -0.1", ["sigma", "> 0", "-0.1"]),
    ('noise = "cauchy"', ["noise", "'cauchy'", "gaussian, laplace, logistic"]),
    ('model = "resnet50"', ["model", "lenet5", "mlp", "resnet5", "vgg8"]),
    ('data = "cifar"', ["data", "digits", "adding"]),
    ('method = ["ulr", "ulr"]', ["more than once"]),
    ("val_fraction = 1.0", ["val_fraction", "in [0, 1)"]),
    ("[optim]\nlr = 0.1", ["[optim]", "flat"]),
    ("sigma = ", ["not valid TOML"]),
])
def test_bad_values_are_named(tmp_path, text, words):
    with pytest.raises(ConfigError) as err:
        load_toml(write(tmp_path, text))
    for word in words:
        assert word in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_toml(tmp_path / "nope.toml")


def test_cross_field_check_antithetic_needs_even_copies():
    with pytest.raises(ConfigError, match="use num_copies=8"):
        RunConfig(num_copies=7, sampler="antithetic")
    assert RunConfig(num_copies=7).num_copies == 7  # iid, the default
    assert RunConfig(num_copies=7, sampler="antithetic", method="bp").num_copies == 7


def test_defaults_are_the_verified_setting():
    c = RunConfig()
    assert (c.model, c.data, c.num_copies, c.noise, c.sigma, c.sampler, c.baseline, c.plan,
            c.optimizer, c.batch_size, c.epochs) == (
        "mlp", "digits", 32, "gaussian", 0.1, "iid", "leave-one-out", "layerwise",
        "adam", 32, 30)
    assert c.resolved_lr == 3e-3 and c.replace(method="bp").resolved_lr == 1e-3
    assert c.threads == 1 and c.replace(threads=0).threads == 0  # 0: torch's default
    assert c.replace(lr=0.5).resolved_lr == 0.5


def test_toml_round_trip(tmp_path):
    config = RunConfig(model_args={"hidden": [8]}, sites=["hidden.*", "out"], lr=0.01,
                       max_steps=5, recommended=True, method="ulr")
    path = write(tmp_path, to_toml(config, "a header\nof two lines"))
    [again] = configs_from_values(load_toml(path))
    assert again == config
    assert RunConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_and_lists():
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        RunConfig.from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match="one method"):
        RunConfig.from_dict({"method": ["ulr", "bp"]})


def test_check_values_accepts_dashes_and_keys_cover_fields():
    assert check_values({"diag-every": 5}, "x") == {"diag_every": 5}
    assert set(keys()) == set(RunConfig().to_dict())


def test_parse_value():
    assert parse_value("[256, 128]") == [256, 128]
    assert parse_value("3e-3") == 3e-3
    assert parse_value('"tanh"') == "tanh"
    assert parse_value("tanh") == "tanh"
    assert parse_value("true") is True


def test_method_args_go_to_their_peer():
    values = check_values({"method": ["ulr", "es", "spsa"],
                           "method_args": {"ES": {"population": 8}, "num_directions": 2,
                                           "spsa": {"eps": 0.01}}}, "test")
    with pytest.raises(ConfigError, match="es takes no argument \\['num_directions'\\]"):
        configs_from_values(values)  # flat keys go to every peer of the list
    del values["method_args"]["num_directions"]
    ulr, es, spsa = configs_from_values(values)
    assert ulr.method_args == {}
    assert es.method_args == {"population": 8}
    assert spsa.method_args == {"eps": 0.01}
    [es] = configs_from_values({"method": "es", "method_args": {"population": 4}})
    assert es.method_args == {"population": 4} and es.resolved_lr == 3e-3


@pytest.mark.parametrize("values, words", [
    ({"method": "ulr", "method_args": {"population": 4}}, "configure the peer estimators"),
    ({"method": "bp", "method_args": {"bp": {"x": 1}}}, "not a peer estimator"),
    ({"method": ["es"], "method_args": {"spsa": {"eps": 1.0}}}, "table for ['spsa']"),
    ({"method": "forward-gradient", "method_args": {"tangents": 2}},
     "takes no argument ['tangents']; it takes num_tangents"),
    ({"method": "es", "method_args": {"es": {"a": {"b": 1}}}}, "nest one level only"),
    ({"method": "es", "method_args": {"pop size": 3}}, "keys must be argument names"),
])
def test_bad_method_args_are_named(values, words):
    with pytest.raises(ConfigError) as err:
        configs_from_values(values)
    assert words in str(err.value)


def test_method_args_round_trip(tmp_path):
    config = RunConfig(method="spsa", method_args={"num_directions": 4, "eps": 1e-2})
    path = write(tmp_path, to_toml(config))
    [again] = configs_from_values(load_toml(path))
    assert again == config


@pytest.mark.parametrize("values, words", [
    ({"method": "bp", "loss": "zero-one"},
     ["loss 'zero-one' with method 'bp'", "backprop cannot", "(ulr, es, spsa)"]),
    ({"method": "bp-noise", "loss": "zero-one"}, ["method 'bp-noise'", "backprop cannot"]),
    ({"method": "forward-gradient", "loss": "zero-one"}, ["method 'forward-gradient'"]),
    ({"method": ["ulr", "bp"], "loss": "zero-one"}, ["method 'bp'", "loss 'auto'"]),
    ({"blocks": 0, "loss": "zero-one"}, ["blocks=0 (pure backprop)"]),
    ({"loss": "zero-one", "diag_every": 5}, ["diag_every", "zero for loss 'zero-one'"]),
    ({"loss": "hinge"}, ["loss", "'hinge'", "auto, zero-one"]),
    ({"site_sigma": {"out": -1}}, ["site_sigma['out'] must be a number > 0", "-1"]),
    ({"site_sigma": {"out": "wide"}}, ["site_sigma['out']", "'wide'"]),
    ({"site_sigma": {"out": True}}, ["site_sigma['out']"]),
    ({"site_sigma": {"out": float("inf")}}, ["site_sigma['out']"]),
    ({"site_sigma": {" ": 1.0}}, ["module name patterns"]),
    ({"site_sigma": 2.0}, ["site_sigma must be a dict"]),
])
def test_bad_loss_and_site_sigma_are_named(values, words):
    with pytest.raises(ConfigError) as err:
        configs_from_values(values)
    for word in words:
        assert word in str(err.value)


def test_zero_one_loss_with_the_gradient_free_methods():
    for method in ("ulr", "es", "spsa"):
        assert RunConfig(method=method, loss="zero-one").loss == "zero-one"
    # hybrid blocks: backprop inside a block, never through the loss
    assert RunConfig(loss="zero-one", blocks=2).blocks == 2
    assert RunConfig(loss="Zero_One").loss == "zero-one"
    assert RunConfig(site_sigma={"out": 2}).site_sigma == {"out": 2.0}


def test_site_sigma_table_round_trip(tmp_path):
    config = RunConfig(model="binary-mlp", loss="zero-one",
                       site_sigma={"hidden.*": 0.5, "out": 2.0})
    text = to_toml(config)
    assert '"hidden.*" = 0.5' in text and "out = 2.0" in text  # a dot in a key would nest
    [again] = configs_from_values(load_toml(write(tmp_path, text)))
    assert again == config and list(again.site_sigma) == ["hidden.*", "out"]


def test_warmup_refuses_the_per_epoch_schedules_and_old_configs_stay_valid():
    import pytest

    from ulr.train import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="per optimizer step.*cosine-steps"):
        RunConfig(schedule="step", warmup_steps=10)
    old = RunConfig(schedule="cosine").to_dict()
    del old["warmup_steps"], old["tensorboard"]  # a config.json written before these keys
    assert RunConfig.from_dict(old).warmup_steps == 0


def test_a_model_trains_with_its_own_defaults_where_the_user_sets_none():
    ulr, bp, bp_noise, es = configs_from_values(
        {"model": "lenet5", "method": ["ulr", "bp", "bp-noise", "es"]})
    pooled = ["pool1", "pool2", "fc1", "fc2", "fc3"]
    assert (ulr.sites, ulr.num_copies, ulr.sampler, ulr.sigma) == (pooled, 64, "antithetic", 0.05)
    # every method trains as long and on the same schedule; only ulr reads the estimator
    # options, bp-noise its noise
    assert {(c.epochs, c.schedule) for c in (ulr, bp, bp_noise, es)} == {(18, "cosine-steps")}
    assert (bp.sites, bp.num_copies, bp.sampler, bp.sigma) == (None, 32, "iid", 0.1)
    assert (bp_noise.sites, bp_noise.sigma, bp_noise.num_copies) == (pooled, 0.05, 32)
    assert es.sites is None
    # a value the user gives replaces the model's, one key at a time
    (ulr,) = configs_from_values({"model": "lenet5", "method": "ulr", "num_copies": 128,
                                  "epochs": 1, "schedule": "none"})
    assert (ulr.sites, ulr.num_copies, ulr.epochs, ulr.schedule) == (pooled, 128, 1, "none")
    # --blocks and --recommended choose the estimator themselves: the model's estimator goes
    for own in ({"blocks": 2}, {"recommended": True}):
        (ulr,) = configs_from_values({"model": "lenet5", "method": "ulr", **own})
        assert (ulr.sites, ulr.num_copies, ulr.sigma, ulr.sampler) == (None, 32, 0.1, "iid")
        assert ulr.epochs == 18
    # a model without defaults of its own keeps the fields' defaults
    (mlp,) = configs_from_values({"model": "mlp", "method": "ulr"})
    assert mlp == RunConfig()


def test_an_error_caused_by_the_model_defaults_names_them():
    with pytest.raises(ConfigError, match=r"num_copies=1.*lenet5's own defaults set .*"
                                          r"sampler='antithetic'"):
        configs_from_values({"model": "lenet5", "method": "ulr", "num_copies": 1})


def _cli_configs(command):
    import shlex

    from ulr.cli import _flag_values, build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])
    return configs_from_values(_flag_values(args))


@pytest.mark.parametrize("config", [
    RunConfig(model="lenet5", data="fashion-mnist", epochs=2),  # built in Python: no model defaults
    configs_from_values({"model": "lenet5", "data": "fashion-mnist"})[0],
    configs_from_values({"model": "lenet5", "method": "ulr", "blocks": 2})[0],
    RunConfig(model="mlp", model_args={"hidden": [8, 4]}, site_sigma={"out": 2.0},
              sites=["hidden.*", "out"], lr=0.01, recommended=True),
    RunConfig(method="es", method_args={"population": 8}, tensorboard=True, threads=0),
])
def test_to_command_and_to_toml_give_back_the_config(tmp_path, config):
    from ulr.train.config_file import to_command

    command = to_command(config)
    off = "--no-model-defaults" in command
    assert _cli_configs(command) == [config.replace(model_defaults=False) if off else config]
    path = write(tmp_path, to_toml(config))
    assert configs_from_values(load_toml(path)) == [config]
    # a config built in Python takes no model defaults: its command says so
    assert off == (config == RunConfig(model="lenet5", data="fashion-mnist", epochs=2))


def test_to_command_leaves_out_the_options_a_method_does_not_read():
    from ulr.train.config_file import to_command

    command = to_command(RunConfig(method="bp", num_copies=64, sigma=0.05, lr=0.01))
    assert command == "ulr train --method bp --model mlp --data digits --lr 0.01"
    assert _cli_configs(command) == [RunConfig(method="bp", lr=0.01)]
