"""Shared test helpers.

Tolerances: the reference runs in float64 (machine epsilon ≈ 2.2e-16). Quantities compared
after a handful of dense products or one Cholesky solve of a well-conditioned matrix carry
relative rounding errors of order ``κ · d · eps``; we use ``1e-10`` for those, which leaves
three to four orders of magnitude of headroom for the sizes drawn here (d ≤ 40, κ ≤ 1e3).
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from threadpoolctl import threadpool_limits

# numpy and scipy each ship an OpenBLAS; on the small matrices used here their two thread pools
# only contend (8x slower on 2 cores: benchmarks/blas_threads.py), so the suite runs BLAS
# single-threaded.
threadpool_limits(limits=1)

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci")

RTOL = 1e-10

from lnb.testing import correlated_features, rel_err, teacher_problem  # noqa: E402, F401 - shared helpers


def naive_conv2d(X, filters, bias, stride, padding, dilation, groups):
    """A loop-by-loop convolution, independent of the im2col code under test."""
    n, _, h, w = X.shape
    co, cg, kh, kw = filters.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Xp = np.pad(X, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, co, ho, wo))
    kg = co // groups
    for o in range(co):
        g = o // kg
        for y in range(ho):
            for x in range(wo):
                ys, xs = y * sh, x * sw
                patch = Xp[
                    :,
                    g * cg : (g + 1) * cg,
                    ys : ys + dh * (kh - 1) + 1 : dh,
                    xs : xs + dw * (kw - 1) + 1 : dw,
                ]
                out[:, o, y, x] = np.sum(patch * filters[o], axis=(1, 2, 3))
                if bias is not None:
                    out[:, o, y, x] += bias[o]
    return out


try:  # the lnb_fast cross-checks compare against the float64 reference
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - lnb_fast tests are skipped without jax
    pass
