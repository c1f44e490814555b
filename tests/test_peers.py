"""Smoke test of ``benchmarks/peers.py --quick``: on generated images it trains Adam and LNB's
speed preset (K-FAC and PSGD-Kron are skipped, with the reason, where their packages are not
installed; the full comparison runs in ``.venv-kfac``, ``make peers-env``), and writes the
JSON, the Markdown and the figure it promises. No timing is asserted; the properties are the
record's: one shared initial point, targets read off the curves, ratios to the best Adam."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_module

pytest.importorskip("jax")
pytest.importorskip("matplotlib")


def test_quick_run_writes_the_comparison(tmp_path):
    bench = benchmark_module("peers")
    out = tmp_path / "peers.json"
    argv = ["--quick", "--quiet", "--methods", "adam,lnb,kfac", "--adam-lrs", "1e-3,3e-4"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    (row,) = record["models"]
    results = {r["method"]: r for r in row["results"]}
    assert set(results) >= {"adam 0.001", "adam 0.0003", "lnb SPEED ε 0.3"}
    assert "kfac (adaptive)" in results or "kfac" in row["skipped"]
    # every method starts from the same parameters: the same first evaluation
    first = {json.dumps(r["curve"][0], sort_keys=True) for r in results.values()}
    assert len(first) == 1
    assert sum(r["best_adam"] for r in results.values()) == 1
    best = next(r for r in results.values() if r["best_adam"])
    assert best["epoch_cost"] == 1.0 and best["memory"] == 1.0
    for r in results.values():
        times = [p["seconds"] for p in r["curve"]]
        assert times == sorted(times) and times[0] == 0.0
        if r["to_accuracy"] is not None:  # the first evaluation at or above the target
            hit = next(p for p in r["curve"] if p["test_accuracy"] >= 0.85)
            assert r["to_accuracy"] == {"epoch": hit["epoch"], "seconds": hit["seconds"]}
    # LNB keeps its covariance matrices: more state than Adam
    assert results["lnb SPEED ε 0.3"]["memory"] > 1
    assert "| lnb SPEED ε 0.3 |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "peers_mlp.png").stat().st_size > 0


def test_a_figure_that_cannot_be_saved_is_one_line_and_the_numbers_are_kept(
    tmp_path, monkeypatch, capsys
):
    """A path that passes the writability check and still fails later (root on /proc, a full
    disk) ends in a one-line error and exit 2, with the JSON and Markdown already written."""
    bench = benchmark_module("peers")

    def full_disk(path, *args):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(bench, "figure", full_disk)
    out = tmp_path / "peers.json"
    assert bench.main(["--quick", "--quiet", "--methods", "adam,lnb", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: figure") and "No space left" in err and "\n" not in err
    assert json.loads(out.read_text())["models"][0]["model"]
    assert out.with_suffix(".md").is_file()
