"""The runs of one command: directories are named and created exclusively."""

import own_model_file

from ulr.train.runs import new_dir


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    """The default run directory is created exclusively and names the seed: two commands in
    the same second never share one (they used to interleave metrics.jsonl)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("ulr.train.runs.time.strftime", lambda fmt: "20261205-090948")
    a = new_dir(["mlp", "digits", "ulr", "seed0"])
    b = new_dir(["mlp", "digits", "ulr", "seed0"])
    assert a != b and a.is_dir() and b.is_dir()
    assert (a.name, b.name) == ("20261205-090948-mlp-digits-ulr-seed0",
                                "20261205-090948-mlp-digits-ulr-seed0-2")


# -- the user's own model and data through the command line (issue 16 §1) --------------------



def _own(tmp_path):
    path = own_model_file.write(tmp_path)
    return ["--model", f"{path}:make_net", "--data", f"{path}:load"]


def test_own_model_resumes_bit_exactly_and_names_its_directory(tmp_path, monkeypatch, capsys):
    import torch

    from ulr.cli import main

    own = _own(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", *own, "--method", "ulr", "--epochs", "2", "--quiet", "--no-plots",
                 "--num-copies", "4", "--sampler", "antithetic"]) == 0
    (straight,) = (tmp_path / "runs").iterdir()
    assert "-make_net-load-ulr-seed0" in straight.name  # the callables' names, not the paths
    out = str(tmp_path / "b")
    common = ["--quiet", "--no-plots"]
    assert main(["train", *own, "--method", "ulr", "--epochs", "1", "--num-copies", "4",
                 "--sampler", "antithetic", "--out", out, *common]) == 0
    assert main(["train", "--resume", out, "--epochs", "2", *common]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_own_model_compare_plot_and_robust(tmp_path, capsys):
    from ulr.cli import main

    own = _own(tmp_path)
    group = tmp_path / "g"
    assert main(["compare", *own, "--method", "ulr", "bp", "--epochs", "1", "--quiet",
                 "--out", str(group)]) == 0
    assert (group / "comparison.txt").is_file() and (group / "accuracy_vs_epoch.png").is_file()
    assert main(["plot", str(group), "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert main(["robust", str(group), "--attacks", "fgsm-linf", "--eps", "0.1",
                 "--corruptions", "none", "--no-plot", "--quiet"]) == 0
    assert "fgsm-linf" in capsys.readouterr().out


def test_own_model_errors_exit_2_in_one_line(tmp_path, capsys):
    from ulr.cli import main

    own = _own(tmp_path)
    for args, words in [
        (["--model", own[1].replace("make_net", "make_nett")], "did you mean 'make_net'"),
        (["--model", "no_such_pkg_e16:make"], "no module named 'no_such_pkg_e16' on sys.path"),
        (["--model", own[1], "--model-arg", "width=3"], "cannot be called with keyword"),
        (["--data", f"{tmp_path}/nope.py:load"], "does not exist"),
    ]:
        assert main(["train", *own, *args, "--method", "bp", "--epochs", "1", "--quiet",
                     "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_own_model_on_two_processes(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    own = _own(tmp_path)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "ulr", "train", *own, "--nproc", "2", "--method",
                        "ulr", "--epochs", "1", "--max-steps", "2", "--quiet", "--no-plots",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["environment"]["world_size"] == 2
