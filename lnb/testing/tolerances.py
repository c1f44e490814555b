"""The relative tolerances of the test suite and ``lnb check``, by quantity and dtype, explained
once here.

Every comparison in the suite is between two computations of the same quantity that differ only
by rounding: two backends (``lnb_fast`` against ``lnb_ref``, ``lnb_fast.xp`` on NumPy against
``lnb_ref``), two algebraically equal formulas (``‖Wx‖`` through a factor or through an inverse),
or two compilations of one program. Their relative difference is the unit roundoff ``eps`` of
the dtype times a growth factor: the number of operations ``d`` a value went through and the
condition number ``κ`` of any solve on the way (a solve amplifies a relative perturbation of its
right-hand side by up to ``κ``). The tolerances below are that bound for the sizes the tests
draw, with two to four orders of magnitude of headroom over what was measured, so they catch a
wrong formula (a missing term, a wrong constant, a transposed factor: relative errors of order
1e-6 or more) and never a change of summation order.

| quantity | float64 | float32 |
|---|---:|---:|
| `rounding` | 1e-10 | |
| `solve` | 1e-9 | |
| `steps` | 1e-9 | 1e-4 |
| `recurrence` | 1e-8 | |

* `rounding`: one neuron's metric product `M v` (Eq. 11), moments (Alg. 2 lines 6–7),
  preconditioner (§3.5), every PCG iterate, θ̂, z and step norm, at κ ≤ 1e3 (the well-posed
  draws, `MAX_CONDITION` in `lnb.testing.crosscheck`) and d ≤ 40: `c·κ·eps` with a measured
  `c ≤ 21`, at most 5e-14 over `lnb check --problems 500`.
* `solve`: one dense factorisation or inverse (Cholesky, `eigh`, a triangular solve,
  whitening) of a matrix with κ up to ~1e4.
* `steps`: the parameters (and loss) after ≤ 12 whole Algorithm 2 steps through a nonlinear
  network: the per-step rounding compounds over the steps (measured ≤ 4e-14).
* `recurrence`: a quantity read off PCG's recursive residual (the measured step norm) or
  chained through several solves at κ ≤ 1e4: `~k·κ·eps` over k iterations.

float32 (``eps ≈ 1.2e-7``, what users run by default; the suite runs float32 unless a test is
marked ``x64``): ``steps`` is **1e-4** relative with an absolute floor of 1e-5 for near-zero
entries, for two float32 runs compiled differently (a jitted step against ``vmap``/``scan``/
``chain`` of the same step, ≤ 20 steps) or a float32 run against the same run in float64
(measured: a few 1e-6 over 20 steps of a 64-sample MLP, ``tests/test_fast.py``). bfloat16 (``eps
≈ 3.9e-3``) is only checked for keeping its dtype and staying finite, never compared.

A test that needs one of the float64 rows must be marked ``@pytest.mark.x64`` (or the module
``pytestmark = pytest.mark.x64``): without it, JAX computes in float32 and a 1e-10 comparison
fails, as it should. A tolerance is never widened to make a test pass: find out which side is
wrong.
"""

from __future__ import annotations

#: ``{(quantity, dtype): relative tolerance}``; see the module docstring for each row.
TOLERANCES: dict[tuple[str, str], float] = {
    ("rounding", "float64"): 1e-10,
    ("solve", "float64"): 1e-9,
    ("steps", "float64"): 1e-9,
    ("recurrence", "float64"): 1e-8,
    ("steps", "float32"): 1e-4,
}

#: The absolute floor of float32 comparisons (entries that are rounding noise around zero).
FLOAT32_ATOL = 1e-5


def rtol(quantity: str, dtype: str = "float64") -> float:
    """The relative tolerance for ``quantity`` in ``dtype`` (a row of ``TOLERANCES``)."""
    try:
        return TOLERANCES[quantity, str(dtype)]
    except KeyError:
        known = ", ".join(f"{q}/{d}" for q, d in TOLERANCES)
        raise KeyError(f"no tolerance for {quantity!r} in {dtype!s} (known: {known})") from None


#: The rows used most, by name.
RTOL = rtol("rounding")
SOLVE_RTOL = rtol("solve")
STEP_RTOL = rtol("steps")
RECURRENCE_RTOL = rtol("recurrence")
FLOAT32_RTOL = rtol("steps", "float32")

#: The largest relative error ``lnb check`` accepts per quantity it reports: every per-neuron
#: quantity is a ``rounding`` one, the parameters after whole steps a ``steps`` one.
CHECK_TOLERANCES: dict[str, float] = {
    "metric product": RTOL,
    "CG iterates": RTOL,
    "theta_hat": RTOL,
    "z": RTOL,
    "step norm": RTOL,
    "step": STEP_RTOL,
}
