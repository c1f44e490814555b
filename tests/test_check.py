"""``lnb.check``, the engine of ``lnb check``: a few fresh problems pass, the report lists every
quantity and flags the ones over tolerance, and a deliberately wrong fast metric is caught."""

from __future__ import annotations

import math

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import lnb_fast.neuron  # noqa: E402
from lnb.check import TOLERANCES, format_report, passed, run_check  # noqa: E402

QUANTITIES = ["metric product", "CG iterates", "theta_hat", "z", "step norm", "step"]


def test_tolerances():
    assert list(TOLERANCES) == QUANTITIES
    assert TOLERANCES["step"] == 1e-9
    assert all(TOLERANCES[key] == 1e-10 for key in QUANTITIES[:-1])


def test_run_check_passes_on_fresh_problems():
    """Called in float32 (this test is not marked x64), run_check turns float64 on for its
    duration (float32 would miss the 1e-10 tolerances by four orders of magnitude) and back off
    afterwards, so it changes nothing for the caller."""
    assert not jax.config.jax_enable_x64
    errors = run_check(3, seed=0, progress=False)
    assert not jax.config.jax_enable_x64
    assert list(errors) == QUANTITIES
    for key, value in errors.items():
        assert math.isfinite(value) and 0 <= value < TOLERANCES[key], (key, value)
    assert errors["step"] > 0  # the two sides did round differently, so something was compared
    assert passed(errors)
    report = format_report(errors)
    for key in QUANTITIES:
        assert f"| {key} |" in report
    assert "NO" not in report


def test_report_flags_errors_over_tolerance():
    errors = {"metric product": 3e-16, "CG iterates": 2e-8, "theta_hat": 1e-14, "z": 1e-15}
    errors["step norm"], errors["step"] = 1e-15, 1e-12
    assert not passed(errors)
    lines = {line.split("|")[1].strip(): line for line in format_report(errors).splitlines()}
    assert "**NO**" in lines["CG iterates"] and "2.00e-08" in lines["CG iterates"]
    for key in ("metric product", "theta_hat", "z", "step"):
        assert "NO" not in lines[key]
    # exactly at the tolerance is not over it; NaN and infinity are failures
    assert passed({**errors, "CG iterates": 1e-10})
    assert not passed({**errors, "CG iterates": math.nan})
    assert not passed({**errors, "step": math.inf})
    assert "**NO**" in format_report({"z": math.nan})


def test_a_wrong_metric_product_is_caught(monkeypatch):
    """Scale every fast metric product by 1 + 1e-6: far below what training would notice, far
    above the tolerance."""
    matvec = lnb_fast.neuron.Neuron.metric_matvec

    def wrong(self, X, v, ridge=0.0):
        return tuple(o * (1 + 1e-6) for o in matvec(self, X, v, ridge))

    monkeypatch.setattr(lnb_fast.neuron.Neuron, "metric_matvec", wrong)
    errors = run_check(2, seed=1, progress=True)
    assert 1e-7 < errors["metric product"] < 1e-5
    assert errors["metric product"] > TOLERANCES["metric product"]
    assert not passed(errors)
    report = format_report(errors)
    assert "**NO**" in next(line for line in report.splitlines() if "| metric product |" in line)


def test_the_lnb_check_command_exits_nonzero_over_tolerance(monkeypatch, capsys):
    """The command's wiring: the report is printed and the exit code follows ``passed`` (the
    engine itself is exercised above)."""
    import lnb.check
    from lnb.cli import main

    good = {key: TOLERANCES[key] / 10 for key in QUANTITIES}
    monkeypatch.setattr(lnb.check, "run_check", lambda n, seed=None, progress=True: good)
    assert main(["check", "--problems", "1", "--quiet"]) == 0
    assert "all within tolerance" in capsys.readouterr().out
    bad = {**good, "theta_hat": 1e-6}
    monkeypatch.setattr(lnb.check, "run_check", lambda n, seed=None, progress=True: bad)
    assert main(["check", "--problems", "1", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "SOME QUANTITIES ARE OVER TOLERANCE" in out and "**NO**" in out


def test_cli_prints_the_seed_it_drew(monkeypatch, capsys):
    """Without --seed, ``lnb check`` draws fresh entropy and prints it with the command that
    replays the draw; the seed printed is the one the check ran with."""
    import lnb.check
    from lnb.cli import main

    seen = []

    def fake_run_check(n_problems, seed=None, progress=True):
        seen.append(seed)
        return dict.fromkeys(TOLERANCES, 0.0)

    monkeypatch.setattr(lnb.check, "run_check", fake_run_check)
    for _ in range(2):
        assert main(["check", "--problems", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    seeds = [int(s) for s in __import__("re").findall(r"--seed (\d+)\)", printed)]
    assert seeds == seen and None not in seen
    assert seen[0] != seen[1]  # fresh entropy each time
    assert main(["check", "--problems", "2", "--quiet", "--seed", "7"]) == 0
    assert seen[-1] == 7
