"""Smoke test of ``benchmarks/ridge_default.py --quick``: the invariance part runs and measures
what the relative ridge promises (LNB on ``a⊙X + c`` tracks LNB on ``X`` to rounding) and what
the absolute one breaks; the whole quick study (every part) is marked slow."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_module

from lnb.testing.tolerances import STEP_RTOL

pytestmark = pytest.mark.x64  # the invariance gaps are measured in float64

pytest.importorskip("jax")


def test_quick_invariance_separates_relative_from_absolute(tmp_path):
    bench = benchmark_module("ridge_default")
    out = tmp_path / "ridge.json"
    assert bench.main(["--quick", "--quiet", "--parts", "invariance", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [inv["activation"] for inv in record["invariance"]] == ["tanh"]  # relu: full run
    for inv in record["invariance"]:
        assert inv["initial_gap"] < 1e-12  # the transformed first layer: the same function
        gaps = {label: g["auto"] for label, g in inv["gaps"].items()}
        assert set(gaps) == {"absolute 0.001", "relative 0.001", "relative 0.01", "relative 0.1"}
        for label, gap in gaps.items():
            if label.startswith("relative"):
                assert gap < STEP_RTOL, (inv["activation"], label, gap)
            else:
                assert gap > 1e-6, (inv["activation"], label, gap)
        # x ↦ ±x + c: every candidate, the absolute ridge included, keeps it
        assert all(g["auto"] < STEP_RTOL for g in inv["shift_gaps"].values()), inv["shift_gaps"]
    table = out.with_suffix(".md").read_text()
    assert "| invariance gap, x ↦ a⊙x + c, MLP 20-32-32-5 tanh" in table


@pytest.mark.slow
def test_quick_study_runs_every_part(tmp_path):
    bench = benchmark_module("ridge_default")
    out = tmp_path / "ridge.json"
    assert bench.main(["--quick", "--quiet", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert len(record["cnn"]) == len(record["unet"]) == 4
    assert len(record["stress"]) == 12 and len(record["readme"]) == 4
    for run in record["readme"]:
        assert run["final_loss"] is not None and run["final_loss"] < run["losses"][0]
    assert "covariance: final loss" in out.with_suffix(".md").read_text()
