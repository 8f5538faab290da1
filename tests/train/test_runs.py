"""The runs of one command: directories are named and created exclusively."""

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
