"""ulr robust: attacks (effect, budgets, PGD vs FGSM), corruptions (determinism, severity),
non-differentiable models, the command line and its errors."""

import json

import pytest
import torch
from torch import nn

from ulr.cli import main
from ulr.evaluate import robust
from ulr.evaluate.robust import (
    ATTACKS,
    CORRUPTIONS,
    NotDifferentiableError,
    corrupt,
    evaluate,
    fgsm,
    pgd,
    radius,
)
from ulr.models import BinaryMLP, BlackBoxMLP, SpikingMLP
from ulr.train import RunConfig, fit

BP = dict(method="bp", epochs=8, threads=1, device="cpu")


@pytest.fixture(scope="module")
def bp_run(tmp_path_factory):
    """A 64-128-10 MLP trained by backprop on digits (under a second)."""
    run_dir = tmp_path_factory.mktemp("runs") / "bp"
    fit(RunConfig(**BP), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def trained(bp_run):
    loaded = robust.load(bp_run)
    return loaded.model, loaded.x, loaded.y


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ---------------------------------------------------------------------------------------------
# Attacks


def test_attacks_reduce_the_accuracy_of_a_bp_model(trained):
    model, x, y = trained
    rows = evaluate(model, x, y, attacks=ATTACKS, eps=[0.1, 0.2], corruptions=[])
    clean = rows[0]["accuracy"]
    assert rows[0]["condition"] == "clean" and clean > 0.93
    by = {r["condition"]: r["accuracy"] for r in rows}
    for name in ATTACKS:
        assert by[f"{name} eps=0.1"] < clean - 0.2, name
        assert by[f"{name} eps=0.2"] < 0.1, name


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_attacks_respect_their_budget_and_the_input_range(trained, attack, norm, eps):
    model, x, y = trained
    # The same model seen through inputs in [-1, 3]: budgets scale with the value range.
    lo, hi = -1.0, 3.0
    shifted = nn.Sequential(_Affine(1 / (hi - lo), -lo / (hi - lo)), model)
    xs = x * (hi - lo) + lo
    kwargs = dict(norm=norm, value_range=(lo, hi))
    if attack == "pgd":
        kwargs.update(steps=5, generator=torch.Generator().manual_seed(1))
    adv = (fgsm if attack == "fgsm" else pgd)(shifted, xs, y, eps, **kwargs)
    r = radius(eps, norm, (lo, hi), 64)
    assert r == pytest.approx(eps * 4 * (1 if norm == "linf" else 8))
    delta = (adv - xs).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= r * (1 + 1e-5)
    assert float(size.max()) >= 0.99 * r  # the budget is used, not just respected
    assert float(adv.min()) >= lo and float(adv.max()) <= hi
    # and it is an attack of that model: accuracy falls
    assert accuracy(shifted, adv, y) < accuracy(shifted, xs, y)


class _Affine(nn.Module):
    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x):
        return x * self.scale + self.shift


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_is_at_least_as_strong_as_fgsm(trained, norm):
    model, x, y = trained
    rows = evaluate(model, x, y, attacks=[f"fgsm-{norm}", f"pgd-{norm}"],
                    eps=[0.02, 0.05, 0.1], corruptions=[])
    by = {r["condition"]: r["accuracy"] for r in rows}
    for eps in ("0.02", "0.05", "0.1"):
        assert by[f"pgd-{norm} eps={eps}"] <= by[f"fgsm-{norm} eps={eps}"], eps
    # and strictly stronger where the loss is not linear any more
    assert by[f"pgd-{norm} eps=0.1"] < by[f"fgsm-{norm} eps=0.1"]


def test_pgd_without_random_start_is_deterministic_and_seeds_matter(trained):
    model, x, y = trained
    x, y = x[:100], y[:100]
    a = pgd(model, x, y, 0.1, steps=3, random_start=False)
    assert torch.equal(a, pgd(model, x, y, 0.1, steps=3, random_start=False))
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(pgd(model, x, y, 0.1, steps=3, generator=g(0)),
                       pgd(model, x, y, 0.1, steps=3, generator=g(0)))
    assert not torch.equal(pgd(model, x, y, 0.1, steps=3, generator=g(0)),
                           pgd(model, x, y, 0.1, steps=3, generator=g(1)))


def test_evaluate_leaves_the_model_alone(trained):
    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    evaluate(model, x[:50], y[:50], attacks=["pgd-l2"], eps=[0.1], corruptions=["blur"],
             severities=[2])
    assert model.training
    model.eval()
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------
# Corruptions


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_are_deterministic_given_a_seed(trained, name):
    _, x, _ = trained
    original = x.clone()
    a = corrupt(x, name, 3, seed=7)
    assert torch.equal(a, corrupt(x, name, 3, seed=7))
    assert torch.equal(x, original)  # the input is not modified
    assert not torch.equal(a, x)
    if name in ("gaussian-noise", "impulse-noise"):
        assert not torch.equal(a, corrupt(x, name, 3, seed=8))
    assert float(a.min()) >= 0 and float(a.max()) <= 1


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_distort_more_with_severity(trained, name):
    _, x, _ = trained
    dist = [(corrupt(x, name, s, seed=3) - x).abs() for s in range(1, 6)]
    means = [float(d.mean()) for d in dist]
    assert all(a < b for a, b in zip(means, means[1:])), means
    if name != "blur":  # the noise and the contrast factor: per feature, too
        for a, b in zip(dist, dist[1:]):
            assert bool((a <= b + 1e-7).all())


def test_corruptions_reduce_accuracy_at_severity_5(trained):
    model, x, y = trained
    rows = evaluate(model, x, y, attacks=[], corruptions=CORRUPTIONS, severities=[1, 5])
    clean = rows[0]["accuracy"]
    for name in CORRUPTIONS:
        s5 = next(r for r in rows if r["condition"] == f"{name} s=5")["accuracy"]
        assert s5 < clean, name


def test_corrupt_checks_its_arguments():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="severity must be an int from 1 to 5"):
        corrupt(x, "blur", 6)
    with pytest.raises(ValueError, match="valid corruptions: gaussian-noise, impulse-noise"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="blur needs images"):
        corrupt(torch.rand(2, 64), "blur", 1)


# ---------------------------------------------------------------------------------------------
# Models without an input gradient


@pytest.mark.parametrize("model", [
    BinaryMLP(64, 10, hidden=(32,)),   # sign units: zero input gradient
    BlackBoxMLP(64, 10, hidden=32),    # numpy: no graph
    SpikingMLP(64, 10, hidden=(32,), num_steps=4),  # Heaviside spikes, no surrogate
], ids=["binary", "blackbox", "snn"])
def test_non_differentiable_models_get_a_clear_error_and_a_transfer_fallback(trained, model):
    surrogate, x, y = trained
    with pytest.raises(NotDifferentiableError, match="cannot be attacked by gradient.*"
                                                     "--transfer-from"):
        evaluate(model, x[:64], y[:64], attacks=["fgsm-linf"], eps=[0.1], corruptions=[])
    rows = evaluate(model, x[:64], y[:64], attacks=[], corruptions=["contrast"],
                    severities=[1])
    assert [r["condition"] for r in rows] == ["clean", "contrast s=1"]
    rows = evaluate(model, x[:64], y[:64], attacks=["pgd-linf"], eps=[0.1], corruptions=[],
                    surrogate=surrogate)
    assert rows[1]["transfer"] is True and 0 <= rows[1]["accuracy"] <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(attacks=["cw"]), "unknown attack 'cw'; valid attacks: fgsm-linf, fgsm-l2, pgd-linf"),
    (dict(attacks=["pgd_linf"], eps=[-0.1]), "eps must be a finite number >= 0"),
    (dict(corruptions=["snow"]), "unknown corruption 'snow'; valid corruptions"),
    (dict(severities=[0]), "severities must be ints from 1 to 5"),
    (dict(value_range=(0.2, 0.5)), "outside value_range"),
])
def test_evaluate_errors(trained, kwargs, match):
    model, x, y = trained
    with pytest.raises(ValueError, match=match):
        evaluate(model, x[:10], y[:10], **kwargs)


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_smoke_on_a_run_directory(bp_run, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["robust", str(bp_run), "--attacks", "fgsm-linf", "pgd-l2", "--eps", "0.05",
                 "--steps", "3", "--corruptions", "blur", "impulse-noise", "--severities", "1",
                 "5", "--limit", "100", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "pgd-l2 eps=0.05" in text and "impulse-noise s=5" in text
    record = json.loads((out / "robust.json").read_text())
    (result,) = record["results"]
    assert result["label"] == "bp" and result["method"] == "bp"
    assert [r["condition"] for r in result["rows"]] == [
        "clean", "fgsm-linf eps=0.05", "pgd-l2 eps=0.05", "blur s=1", "blur s=5",
        "impulse-noise s=1", "impulse-noise s=5"]
    assert all(r["n"] == 100 for r in result["rows"])
    assert result["rows"][1]["max_perturbation"] == pytest.approx(0.05, rel=1e-5)
    assert "| condition | bp |" in (out / "robust.md").read_text()
    assert (out / "robust.png").stat().st_size > 0


def test_cli_puts_several_runs_side_by_side(tmp_path, capsys):
    group = tmp_path / "pair"
    assert main(["train", "--method", "bp", "bp-noise", "--epochs", "1", "--threads", "1",
                 "--device", "cpu", "--quiet", "--no-plots", "--out", str(group)]) == 0
    capsys.readouterr()
    assert main(["robust", str(group), "--attacks", "fgsm-l2", "--eps", "0.1",
                 "--corruptions", "none", "--no-plot", "--quiet"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["condition", "bp", "bp-noise"]
    labels = [r["label"] for r in json.loads((group / "robust.json").read_text())["results"]]
    assert labels == ["bp", "bp-noise"]


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["robust", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--attacks", "--eps", "--steps", "--step-size", "--no-random-start",
                 "--severities", "--transfer-from", "sqrt(d)"):
        assert text in out


@pytest.mark.parametrize("args, match", [
    (["MISSING"], "does not exist"),
    (["EMPTY"], "no checkpoint.pt"),
    (["RUN", "--attacks", "cw"], "unknown attack 'cw'; valid attacks: fgsm-linf, fgsm-l2, "
                                 "pgd-linf, pgd-l2"),
    (["RUN", "--corruptions", "fog"], "valid corruptions: gaussian-noise"),
    (["RUN", "--attacks", "none", "--corruptions", "none"], "nothing to evaluate"),
    (["BROKEN"], "not a readable ulr train checkpoint"),
])
def test_cli_errors(bp_run, tmp_path, capsys, args, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    paths = {"MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty",
             "RUN": bp_run, "BROKEN": tmp_path / "broken"}
    argv = [str(paths.get(a, a)) for a in args]
    assert main(["robust", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ulr robust: error:") and match in err
    assert not (tmp_path / "empty" / "robust.json").exists()


def test_cli_refuses_a_regression_run(tmp_path, capsys):
    run = tmp_path / "adding"
    fit(RunConfig(method="bp", data="adding", model="rnn", epochs=1, max_steps=1, threads=1,
                  device="cpu"), run)
    assert main(["robust", str(run)]) == 2
    assert "is not a classification task" in capsys.readouterr().err
