"""``benchmarks/conv_f64.py`` (why float64 convolution cross-checks lose digits on a GPU) on this
machine: its float32-scale column is the definition recomputed here, and on a CPU the compiled
metric product agrees with ``lnb_ref`` to float64 rounding. No timing is asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import benchmark_module

jax = pytest.importorskip("jax")


def test_conv_f64_measures_against_the_reference_and_the_float32_scale(tmp_path):
    bench = benchmark_module("conv_f64")
    out = tmp_path / "conv.json"
    assert bench.main(["--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [r["layout"] for r in rows] == ["NCHW", "NHWC"]
    for row in rows:
        # 2 images, 7×7, kernel 3 dilated 2 (spans 5), padding 1, stride 2: 3×3 outputs each
        assert row["n_samples"] == 2 * 3 * 3
        n = row["n_samples"]
        assert row["float32_scale"] == abs(float(np.float32(1 / n)) * n - 1) > 1e-9
        assert len(row["jit_vs_ref"]) == 2  # the weight and the bias
        if record["platform"] == "cpu":
            # float64 rounding of sums of at most 4·3·3·18 products: 1e-14 is ~50 ulps of slack
            assert max(row["jit_vs_ref"]) < 1e-14
            for name in ("jit", "eager", "vjp_jit"):  # the same device: the same numbers
                assert row[name] == [0.0, 0.0]
