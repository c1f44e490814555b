"""``benchmarks/matmul_precision.py`` on a small problem: its errors are measured against
float64 definitions recomputed here, and full float32 precision is at least as accurate as
JAX's default (equal on a CPU, which has one float32 product; better on GPUs that round to
fewer bits at the default). No timing is asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import benchmark_module

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")


def test_errors_are_against_float64_and_highest_is_float32_accurate(tmp_path):
    bench = benchmark_module("matmul_precision")
    out = tmp_path / "precision.json"
    argv = ["--batch", "128", "--width", "48", "--repeats", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert set(rows) == {"default", "high", "highest"}
    assert record["shape"] == [128, 49]

    # the Gram's error at full float32, recomputed: float32 rounding of a sum of 128 products
    # is at most ~128·2⁻²⁴ ≈ 8e-6 relative (a worst-case bound; the typical error is far less)
    x = bench.features(128, 784, 48)
    m32 = np.asarray(
        jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST) / x.shape[0], np.float64
    )
    m64 = x.astype(np.float64).T @ x.astype(np.float64) / x.shape[0]
    expected = np.linalg.norm(m32 - m64) / np.linalg.norm(m64)
    assert rows["highest"]["gram_error"] == pytest.approx(expected, rel=1e-6)
    assert rows["highest"]["gram_error"] < 128 * 2.0**-24
    # the step scaled to length ε in float32 is ε long in float64 to float32's accuracy, the
    # solve amplifying the Gram's rounding by at most cond(M + γ) ~ 1e3 (γ = 1e-3·mean diag)
    assert rows["highest"]["step_length_error"] < 1e-3
    for name in ("default", "high"):  # never more accurate than full float32 (to rounding)
        assert rows[name]["gram_error"] >= 0.5 * rows["highest"]["gram_error"]
