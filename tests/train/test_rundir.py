"""The run directory: an old one (written before the training package was split, commit
df863be: tests/train/fixtures/old-run, stopped at max_steps=3) still resumes bit-identically
and plots; the path expander finds runs in comparison directories."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from ulr.cli import main
from ulr.train import RunConfig, fit, resume_config
from ulr.train.rundir import expand_run_dirs

OLD = Path(__file__).parent / "fixtures" / "old-run"
TIMING = {"wall_time_s", "train_time_s", "samples_per_s", "peak_rss_mb",
          "step_peak_mb"}


def rows(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] in ("step", "epoch"):
            out.append({k: v for k, v in row.items() if k not in TIMING})
    return out


def test_an_old_run_directory_resumes_bit_identically(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(OLD, run)
    config = resume_config(run, {"max_steps": None})
    fit(config, run, resume=True)
    straight = fit(config, tmp_path / "straight")
    assert straight["steps"] == 12 and straight["status"] == "complete"
    assert rows(run) == rows(tmp_path / "straight")
    a = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_old_run_directory_resumes_and_plots_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(OLD, run)
    assert main(["train", "--resume", str(run), "--max-steps", "5", "--quiet",
                 "--no-plots"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 5
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert "plots:" in capsys.readouterr().out and any((tmp_path / "plots").glob("*.png"))


def test_expand_run_dirs_reads_comparison_directories(tmp_path):
    config = RunConfig(epochs=1, max_steps=1, batch_size=256, num_copies=4, threads=1,
                       model_args={"hidden": [4]})
    group = tmp_path / "group"
    assert main(["train", "--method", "ulr", "bp", "--epochs", "1", "--max-steps", "1",
                 "--num-copies", "4", "--out", str(group), "--quiet", "--no-plots"]) == 0
    assert expand_run_dirs([group]) == [group / "ulr", group / "bp"]
    fit(config, tmp_path / "single")
    assert expand_run_dirs([tmp_path / "single", group / "bp"]) == [tmp_path / "single",
                                                                     group / "bp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        expand_run_dirs([tmp_path / "empty"])
