"""Smoke test of ``benchmarks/step_time.py --quick``: it runs, and writes the JSON and the
Markdown it promises, with every strategy's ratios. No timing is asserted (the machine is
shared); only the shape of the record."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_module

pytest.importorskip("jax")


def test_quick_run_writes_every_strategy(tmp_path):
    bench = benchmark_module("step_time")
    out = tmp_path / "step_time.json"
    argv = ["--quick", "--quiet", "--models", "mlp", "--max-epochs", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    (row,) = record["models"]
    assert set(row["strategy_ratios"]) == {
        "auto",
        "matrix-free",
        "gram",
        "covariance",
        "speed",
        "speed/50",
    }
    for s in row["strategy_ratios"].values():
        assert s["ratio"] > 0 and s["median_ratio"] > 0 and s["predicted_ratio"] > 1
    # every timed function has its mean (the ratios') and its median
    for t in row["times"].values():
        assert t["mean_ms"] > 0 and t["q1_ms"] <= t["median_ms"] <= t["q3_ms"] <= t["max_ms"]
    # the floor (gradient + one d×d product per neuron) is timed beside the strategies
    assert row["floor_ratio"] > 0 and "floor" in row["times"]
    # The memory analysis compares donated steps; LNB keeps more state than Adam.
    assert row["strategy_ratios"]["matrix-free"]["memory_ratio"] > 1
    results = record["time_to_target"]["results"]
    assert [r["optimizer"] for r in results] == [
        "adam 0.0003",
        "lnb auto (ε 0.01)",
        "lnb matrix-free (ε 0.01)",
        "lnb gram (ε 0.01)",
        "lnb covariance (ε 0.01)",
        "lnb speed (ε 0.01)",
        "lnb speed/50 (ε 0.01)",
    ]
    blas = [lib for lib in record["machine"]["blas"] if lib["user_api"] == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas), blas  # --blas-threads 1
    assert "device" in record["machine"]
    assert "| mlp | gram |" in out.with_suffix(".md").read_text()


def test_memory_breakdown_orders_the_state_layouts():
    """The memory table of docs/fast.md: each layout change removes state, so XLA's peak of the
    donated step falls strictly from the paper's layout (gradient EMA, broadcast moments) to
    b1 = 0 to compact moments; the covariance step keeps no PCG temporaries."""
    bench = benchmark_module("step_time")
    rows = {r["step"]: r for r in bench.memory_breakdown(bench.MODELS["mlp"], 8)}
    peak = [
        rows[name]["peak_mib"]
        for name in (
            "LNB matrix-free, b1 = 0.9, broadcast moments",
            "LNB matrix-free, b1 = 0, broadcast moments",
            "LNB matrix-free, compact moments (neurons=)",
        )
    ]
    assert peak[0] > peak[1] > peak[2] > rows["Adam"]["peak_mib"]
    lnb = [r for name, r in rows.items() if name.startswith("LNB")]
    assert min(lnb, key=lambda r: r["temporaries_mib"])["step"] == "LNB covariance"
