"""The `ulr` command, run in-process through ulr.cli.main (one subprocess test of -m ulr)."""

import json
import subprocess
import sys

import pytest

from ulr.cli import main
from ulr.train import keys

FAST = ["--threads", "1", "--device", "cpu", "--quiet", "--batch-size", "128",
        "--num-copies", "8"]
NO_ULR = FAST[:-2]  # runs without the ulr method: a ULR option would be refused


def config_of(run_dir):
    return json.loads((run_dir / "config.json").read_text())


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for key in keys():
        flag = "--" + key.replace("_", "-")
        flag = flag[:-1] if key.endswith("_args") else flag
        assert flag in out, flag
    for text in ("--config", "--resume", "--out", "--quiet", "(default: ulr bp)",
                 "(default: 32)", "3e-3 for ulr", "lenet5"):
        assert text in out


def test_python_m_ulr_train_help():
    proc = subprocess.run([sys.executable, "-m", "ulr", "train", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--num-copies" in proc.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--model", "resnet50"], ["unknown value 'resnet50'", "did you mean 'resnet5'", "lenet5",
                               "mlp", "vgg8", "MODULE:CALLABLE"]),
    (["--data", "cifar10"], ["unknown value", "digits", "fashion-mnist"]),
    (["--noise", "cauchy"], ["invalid choice", "gaussian", "laplace"]),
    (["--method", "mezo"], ["invalid choice", "ulr", "bp", "es", "spsa", "forward-gradient"]),
])
def test_unknown_names_list_the_valid_ones(capsys, args, words):
    if args[0] in ("--model", "--data"):  # checked by the config: names or MODULE:CALLABLE
        assert main(["train", *args]) == 2
    else:
        with pytest.raises(SystemExit) as exit_:
            main(["train", *args])
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


def test_default_train_is_the_verified_ulr_vs_bp_setting(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train", "--max-steps", "2", "--threads", "1", "--quiet", "--no-plots",
                 "--out", str(out)]) == 0
    ulr, bp = config_of(out / "ulr"), config_of(out / "bp")
    assert (ulr["model"], ulr["data"], ulr["num_copies"], ulr["sigma"], ulr["sampler"],
            ulr["baseline"], ulr["plan"], ulr["optimizer"], ulr["lr"], ulr["batch_size"],
            ulr["epochs"]) == ("mlp", "digits", 32, 0.1, "iid", "leave-one-out",
                               "layerwise", "adam", 3e-3, 32, 30)
    assert bp["method"] == "bp" and bp["lr"] == 1e-3 and bp["seed"] == ulr["seed"]
    table = capsys.readouterr().out
    assert "best val acc" in table and "fwd rows" in table
    assert [line.split()[0] for line in table.strip().splitlines()[2:4]] == ["ulr", "bp"]
    assert (out / "comparison.txt").read_text().strip() in table


@pytest.mark.parametrize("method", ["ulr", "bp"])
def test_train_single_method_conv_model(tmp_path, capsys, method):
    out = tmp_path / method
    assert main(["train", "--method", method, "--model", "lenet5", "--max-steps", "2",
                 *(FAST if method == "ulr" else NO_ULR), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"checkpoint.pt", "metrics.jsonl",
                                                 "summary.json", "config.toml"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "lenet5" and summary["steps"] == 2
    assert f"run directory: {out}" in capsys.readouterr().out


def test_lenet5_trains_with_its_model_defaults_and_says_so(tmp_path, capsys):
    common = ["train", "--method", "ulr", "--model", "lenet5", "--max-steps", "1", "--threads",
              "1", "--device", "cpu", "--batch-size", "64", "--no-plots"]
    assert main([*common, "--num-copies", "4", "--out", str(tmp_path / "own")]) == 0
    err = capsys.readouterr().err
    assert "lenet5's own defaults where you set none" in err and "--sites pool1 pool2" in err
    config = config_of(tmp_path / "own")
    assert (config["sites"], config["num_copies"], config["sampler"], config["schedule"]) == (
        ["pool1", "pool2", "fc1", "fc2", "fc3"], 4, "antithetic", "cosine-steps")
    assert main([*common, "--no-model-defaults", "--out", str(tmp_path / "generic")]) == 0
    assert "own defaults" not in capsys.readouterr().err
    config = config_of(tmp_path / "generic")
    assert (config["sites"], config["num_copies"], config["sampler"], config["schedule"],
            config["model_defaults"]) == (None, 32, "iid", "none", False)


def test_flags_override_the_config_file(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "ulr"\nsigma = 0.05\nplan = "all-sites"\nepochs = 1\n'
                   '[model_args]\nhidden = [16]\nactivation = "tanh"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--sigma", "0.2", "--max-steps", "1",
                 "--model-arg", "hidden=[8]", *FAST, "--out", str(out)]) == 0
    stored = config_of(out)
    assert stored["sigma"] == 0.2 and stored["plan"] == "all-sites" and stored["epochs"] == 1
    assert stored["model_args"] == {"hidden": [8], "activation": "tanh"}
    # The run's own config.toml reproduces it.
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.toml"), "--quiet",
                 "--out", str(again)]) == 0
    assert config_of(again) == stored


def test_config_file_errors_exit_2_and_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("sigmaa = 0.1\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'sigmaa'" in err and "did you mean 'sigma'" in err and "num_copies" in err
    assert not (tmp_path / "x").exists()
    assert main(["train", "--model-arg", "hidden", "--out", str(tmp_path / "y")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_model_that_does_not_fit_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["train", "--model", "lenet5", "--data", "adding", *FAST, "--out",
                 str(out)]) == 2
    assert "lenet5 cannot take in_shape (50, 2)" in capsys.readouterr().err
    assert not out.exists()


def test_resume_via_cli_and_refused_change(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "ulr", "--epochs", "1", *FAST, "--out", str(run)]) == 0
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--sigma", "0.3", "--quiet"]) == 2
    assert "sigma: 0.1 -> 0.3" in capsys.readouterr().err
    assert snapshot(run) == before
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 2
    assert main(["train", "--method", "bp", "--epochs", "1", *NO_ULR, "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_regression_dataset_via_cli(tmp_path, capsys):
    assert main(["train", "--data", "adding", "--method", "ulr", "bp", "--max-steps", "2",
                 "--no-plots", "--eval-batch-size", "500", *FAST, "--out",
                 str(tmp_path / "r")]) == 0
    assert "test MSE" in capsys.readouterr().out


def test_compare_config_files_writes_table_and_plots(tmp_path, capsys):
    (tmp_path / "iid.toml").write_text('sampler = "iid"\nepochs = 2\n')
    (tmp_path / "anti.toml").write_text('sampler = "antithetic"\nepochs = 2\n'
                                        'method = ["ulr", "bp"]\n')
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "iid.toml"), str(tmp_path / "anti.toml"),
                 "--diag-every", "5", *FAST, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    labels = [line.split()[0] for line in table.strip().splitlines()[2:5]]
    assert labels == ["iid", "anti-ulr", "anti-bp"]
    assert (out / "comparison.txt").is_file()
    assert len(json.loads((out / "comparison.json").read_text())) == 3
    for name in ("accuracy_vs_epoch", "accuracy_vs_time", "loss_vs_epoch", "cosine"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_compare_methods_and_plot_from_run_dirs(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--method", "ulr", "bp", "--epochs", "1", "--no-plots", *FAST,
                 "--out", str(out)]) == 0
    assert not (out / "accuracy_vs_epoch.png").exists()
    capsys.readouterr()
    plots = tmp_path / "plots"
    assert main(["plot", str(out / "ulr"), str(out / "bp"), "--out", str(plots)]) == 0
    assert "ulr" in capsys.readouterr().out
    assert {p.name for p in plots.iterdir()} == {
        "accuracy_vs_epoch.png", "accuracy_vs_time.png", "loss_vs_epoch.png"}
    assert main(["plot", str(out)]) == 0  # a comparison directory stands for its runs
    assert (out / "accuracy_vs_epoch.png").stat().st_size > 5000
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_ctrl_c_in_a_comparison_then_resume(tmp_path, capsys, monkeypatch):
    import ulr.train

    args = ["train", "--method", "ulr", "bp", "--epochs", "2", "--no-plots", *FAST]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    original = ulr.train.ConsoleProgress.on_step

    def interrupt(self, row):
        if self.label == "bp" and row["step"] == 14:
            raise KeyboardInterrupt
        original(self, row)

    monkeypatch.setattr(ulr.train.ConsoleProgress, "on_step", interrupt)
    cut = tmp_path / "cut"
    assert main([*args, "--out", str(cut)]) == 130
    err = capsys.readouterr().err
    assert "run 'bp' after epoch 1, step 11" in err and f"ulr train --resume {cut}" in err
    assert not (cut / "bp" / "summary.json").exists()
    monkeypatch.setattr(ulr.train.ConsoleProgress, "on_step", original)
    assert main(["train", "--resume", str(cut), "--quiet"]) == 0
    for run in ("ulr", "bp"):
        def table(path):
            rows = [json.loads(line) for line in (path / run / "metrics.jsonl").open()]
            return [(r["step"], r.get("loss"), r.get("test_acc")) for r in rows
                    if r["kind"] in ("step", "epoch")]
        assert table(cut) == table(tmp_path / "straight")


def test_peer_methods_with_per_method_arguments(tmp_path):
    """--method takes the peers of ulr.peers; --method-arg PEER.KEY=VALUE configures each,
    also layered over a config file's [method_args.PEER] tables."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('epochs = 1\n[method_args.es]\npopulation = 8\nsigma = 0.05\n')
    out = tmp_path / "cmp"
    assert main(["train", "--config", str(cfg), "--method", "es", "spsa", "--max-steps", "2",
                 "--method-arg", "es.population=4", "--method-arg", "spsa.num_directions=3",
                 *NO_ULR, "--out", str(out)]) == 0
    es, spsa = config_of(out / "es"), config_of(out / "spsa")
    assert es["method_args"] == {"population": 4, "sigma": 0.05}
    assert spsa["method_args"] == {"num_directions": 3}
    # ES: population x batch rows per step; SPSA: two rows per direction and example.
    rows = [json.loads(line) for line in (out / "es" / "metrics.jsonl").read_text().splitlines()]
    batch = es["batch_size"]
    assert [r["forward_rows"] for r in rows if r["kind"] == "step"] == [4 * batch] * 2
    rows = [json.loads(line) for line in (out / "spsa" / "metrics.jsonl").read_text().splitlines()]
    assert [r["forward_rows"] for r in rows if r["kind"] == "step"] == [6 * batch] * 2


@pytest.mark.parametrize("argv, words", [
    (["--method", "ulr", "--method-arg", "population=4"], "configure the peer estimators"),
    (["--method", "es", "--method-arg", "eps=0.1"], "es takes no argument ['eps']"),
    (["--method", "es", "--method-arg", "spsa.eps=0.1"], "table for ['spsa']"),
    (["--method", "es", "--method-arg", "population"], "needs KEY=VALUE"),
])
def test_bad_method_arguments_are_explained(tmp_path, capsys, argv, words):
    assert main(["train", *argv, *FAST, "--out", str(tmp_path / "x")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_site_sigma_flags_come_before_the_file_and_zero_one_loss(tmp_path, capsys):
    """--site-sigma PATTERN=SIGMA flags are layered over a [site_sigma] table with the flags'
    patterns first (the first match wins); --loss zero-one with backprop is refused."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "binary-mlp"\nmethod = "ulr"\nloss = "zero-one"\n'
                   '[site_sigma]\nout = 1.0\n"hidden.0" = 0.7\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--site-sigma", "out=2.0", "--site-sigma",
                 "hidden.*=0.5", "--max-steps", "2", *FAST, "--out", str(out)]) == 0
    stored = config_of(out)
    assert stored["loss"] == "zero-one"
    assert list(stored["site_sigma"].items()) == [("out", 2.0), ("hidden.*", 0.5),
                                                  ("hidden.0", 0.7)]
    assert main(["train", "--method", "ulr", "bp", "--loss", "zero-one",
                 "--out", str(tmp_path / "x")]) == 2
    assert "backprop cannot train on it" in capsys.readouterr().err
    assert main(["train", "--site-sigma", "out", "--out", str(tmp_path / "y")]) == 2
    assert "--site-sigma needs PATTERN=SIGMA" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()



def test_a_run_directory_in_use_is_refused_and_left_alone(tmp_path, capsys):
    """A second writer of one directory (a parallel --resume, or --out of a running run)
    stops before it writes anything."""
    import fcntl
    import os

    from ulr.cli import main

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `ulr train` holds it
        code = main(["train", "--method", "ulr", "--max-steps", "1", "--out", str(run)])
    finally:
        os.close(fd)
    assert code == 2 and not any(run.iterdir())
    assert "is in use by another ulr process; nothing was changed" in capsys.readouterr().err


def _run_until_first_epoch(args, run, timeout=120):
    import signal
    import subprocess
    import sys
    import time

    # as a shell starts a background job: its own session, SIGINT ignored
    proc = subprocess.Popen([sys.executable, "-m", "ulr", "train", "--method", "ulr",
                             "--epochs", "500", "--quiet", "--out", str(run), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and '"kind": "epoch"' in metrics.read_text():
            return proc
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no epoch finished in time")


@pytest.mark.parametrize("signame,args", [("SIGTERM", []), ("SIGINT", ["--nproc", "2"])])
def test_a_stop_signal_leaves_a_resumable_run(tmp_path, signame, args):
    """SIGTERM (a scheduler's stop) ends a run like Ctrl-C, and SIGINT sent to the --nproc
    launcher's pid alone reaches every rank: rc 130, the last checkpoint kept, --resume goes
    on."""
    import json
    import signal

    from ulr.cli import main

    run = tmp_path / "run"
    proc = _run_until_first_epoch(args, run)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "keeps the last checkpoint" in err
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["status"] == "complete"


def test_max_steps_zero_lifts_the_limit_on_resume(tmp_path, capsys):
    import json

    from ulr.cli import main

    run = tmp_path / "run"
    assert main(["train", "--method", "ulr", "--max-steps", "3", "--epochs", "1", "--quiet",
                 "--out", str(run)]) == 0
    before = (run / "metrics.jsonl").read_text()
    # the same limit again would do nothing: refused, nothing changed
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "stopped at max_steps=3" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before
    assert main(["train", "--resume", str(run), "--max-steps", "0", "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 41  # one digits epoch


def test_out_with_resume_and_an_out_that_is_a_file_are_refused(tmp_path, capsys):
    from ulr.cli import main

    run = tmp_path / "run"
    assert main(["train", "--method", "ulr", "--max-steps", "1", "--quiet",
                 "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "--out cannot be combined with --resume" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["train", "--method", "ulr", "--max-steps", "1", "--out", str(afile)]) == 2
    assert "is a file; choose another --out" in capsys.readouterr().err
    assert afile.read_text() == "mine"
    under = afile / "run"  # a path through a file: the OS error in one line, rc 2
    assert main(["train", "--method", "ulr", "--max-steps", "1", "--out", str(under)]) == 2
    assert "Not a directory" in capsys.readouterr().err


def test_ulr_options_for_a_run_without_ulr_are_refused(tmp_path, capsys):
    """--num-copies given to ES alone would be recorded although ES ignores it."""
    import json

    from ulr.cli import main

    out = tmp_path / "es"
    assert main(["train", "--method", "es", "--num-copies", "64", "--max-steps", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "num_copies only changes the ULR estimator" in err and "es.population" in err
    assert not out.exists()
    # bp-noise reads the noise options; a peer records the settings it really used
    assert main(["train", "--method", "bp-noise", "--sigma", "0.2", "--max-steps", "1",
                 "--quiet", "--out", str(tmp_path / "bpn")]) == 0
    assert main(["train", "--method", "es", "--method-arg", "population=8", "--max-steps", "1",
                 "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "population=8" in summary["estimator"]


def test_small_cli_consistency_items(tmp_path, capsys):
    """--model-arg hidden=32 is one hidden layer; --device takes cuda:N (refused clearly
    without that GPU); ulr robust takes --no-plots like the other commands."""
    import torch

    from ulr.evaluate.robust import parser as robust_parser

    run = tmp_path / "h32"
    assert main(["train", "--method", "ulr", "--model-arg", "hidden=32", "--max-steps", "1",
                 *FAST, "--out", str(run)]) == 0
    assert config_of(run)["model_args"] == {"hidden": 32}
    if not torch.cuda.is_available():
        assert main(["train", "--method", "ulr", "--max-steps", "1", *FAST,
                     "--device", "cuda:0", "--out", str(tmp_path / "gpu")]) == 2
        assert "device 'cuda:0' was requested" in capsys.readouterr().err
    assert main(["train", "--method", "ulr", *FAST, "--device", "gpu",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert robust_parser().parse_args(["r", "--no-plots"]).plot is False


def test_plots_of_a_single_run_and_of_mixed_tasks(tmp_path, capsys):
    """A single-method run draws its own plots (cosine.png with --diag-every); ulr plot draws
    regression runs apart from classification runs (never as 0% accuracy); titles name the
    model and the data."""
    from ulr.evaluate.plots import load_run, plot_runs

    cls = tmp_path / "cls"
    assert main(["train", "--method", "ulr", "--epochs", "2", "--diag-every", "5", *FAST,
                 "--out", str(cls)]) == 0
    assert {"accuracy_vs_epoch.png", "loss_vs_epoch.png", "cosine.png"} <= {
        p.name for p in cls.iterdir()}
    reg = tmp_path / "reg"
    assert main(["train", "--method", "ulr", "--data", "adding", "--max-steps", "2", *FAST,
                 "--out", str(reg)]) == 0
    capsys.readouterr()
    out = tmp_path / "plots"
    written = {p.name for p in plot_runs([load_run(cls), load_run(reg)], out)}
    assert {"accuracy_vs_epoch.png", "accuracy_vs_epoch-regression.png",
            "loss_vs_epoch-regression.png", "cosine.png"} <= written
    from ulr.evaluate.plots import _subject

    assert _subject([load_run(cls)]) == "mlp on digits"


@pytest.mark.parametrize("args, hint", [
    (["train", "--epoch", "3"], "did you mean --epochs?"),
    (["train", "--num-copy", "3"], "did you mean --num-copies?"),
    (["compare", "--no-plot"], "did you mean --no-plots?"),
    (["trian"], "did you mean train?"),
])
def test_flag_typos_get_a_did_you_mean_and_no_abbreviation(capsys, args, hint):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and hint in capsys.readouterr().err


def test_quiet_is_q_on_every_command_that_prints_progress(tmp_path, capsys):
    from ulr.evaluate.bench import parser as bench_parser
    from ulr.evaluate.robust import parser as robust_parser

    assert main(["train", "--method", "spsa", "--max-steps", "1", "--threads", "1", "-q",
                 "--no-plots", "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "[spsa]" not in out and "fwd rows" in out  # no header, no hint: the table only
    for p, extra in ((bench_parser(), []), (robust_parser(), ["RUN"])):
        assert p.parse_args(["-q", *extra]).quiet
