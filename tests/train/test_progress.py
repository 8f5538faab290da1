"""Progress reporting: the comparison table and the console's step lines."""

from ulr.train import ConsoleProgress, RunConfig, fit, format_table


def tiny(**changes):
    return RunConfig(**{**dict(batch_size=128, num_copies=8, threads=1, device="cpu",
                               epochs=2), **changes})


def test_format_table_lists_every_run():
    s = fit(tiny(max_steps=1, epochs=1))
    table = format_table([s, {**s, "label": "other"}])
    assert "test acc" in table and "fwd rows" in table
    assert table.splitlines()[2].startswith("ulr") and table.splitlines()[3].startswith("other")


def test_step_lines_with_eta(tmp_path):
    import io

    out = io.StringIO()
    fit(tiny(epochs=1), tmp_path / "run",
        callbacks=[ConsoleProgress("ulr", bar=False, file=out, log_every=5)])
    lines = [line for line in out.getvalue().splitlines() if " step " in line]
    assert lines and all("samples/s" in line for line in lines)
    assert lines[0].startswith("[ulr] step 5/") and "ETA " in lines[0]


def test_spsa_and_forward_gradient_runs_start_with_a_hint_on_the_epochs_they_need():
    import io

    from ulr.train.progress import slow_peer_hint

    for method in ("spsa", "forward-gradient"):
        out = io.StringIO()
        fit(tiny(method=method, max_steps=1, epochs=5),
            callbacks=[ConsoleProgress(bar=False, file=out)])
        (hint,) = [line for line in out.getvalue().splitlines() if "hint:" in line]
        assert hint.startswith(f"[{method}] hint:") and "--epochs 120 --lr 0.003" in hint
        assert slow_peer_hint(tiny(method=method, epochs=120, lr=3e-3)) is None
        assert slow_peer_hint(tiny(method=method, epochs=120)) is not None  # lr 1e-3
    for method in ("ulr", "bp", "es"):
        assert slow_peer_hint(tiny(method=method)) is None
    out = io.StringIO()
    fit(tiny(method="spsa", max_steps=1), callbacks=[ConsoleProgress(quiet=True, file=out)])
    assert out.getvalue() == ""
