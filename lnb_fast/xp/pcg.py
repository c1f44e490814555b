"""Preconditioned conjugate gradient for ``M_i θ̂_i = g_i`` (Algorithm 2, lines 9–10).

The recursion of :func:`lnb_ref.solvers.pcg` (Nocedal & Wright, Alg. 5.3), with ``P ≈ A⁻¹``::

    r₀ = b − A x₀,  y₀ = P r₀,  p₀ = y₀
    αₖ = rₖ·yₖ / pₖ·A pₖ;   xₖ₊₁ = xₖ + αₖ pₖ;   rₖ₊₁ = rₖ − αₖ A pₖ
    yₖ₊₁ = P rₖ₊₁;   βₖ = rₖ₊₁·yₖ₊₁ / rₖ·yₖ;   pₖ₊₁ = yₖ₊₁ + βₖ pₖ

written so that it never synchronises with the host: the scalars stay 0-d arrays on the device,
and the reference's guard (if ``rₖ·yₖ = 0`` or ``pₖ·A pₖ = 0``, repeat the iterate instead of
dividing 0 by 0) is a ``where`` rather than an ``if``. The iterates are the reference's exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import _compat
from ._compat import Array

Operator = Callable[[Array], Array]


@dataclass
class PCGResult:
    """What :func:`pcg` returns (as :class:`lnb_ref.solvers.PCGResult`, but the residual norms
    are 0-d arrays on the device; ``float()`` them to read them on the host).

    Attributes:
        x: the last iterate.
        iterates: ``[x_1, ..., x_k]``.
        residual_norms: ``[‖r_0‖, ..., ‖r_k‖]`` with ``r = b − A x``.
        residual: the last residual ``r_k`` (so ``xᵀAx = x · (b − r_k)``, :func:`metric_norm`).
    """

    x: Array
    iterates: list[Array] = field(default_factory=list)
    residual_norms: list[Array] = field(default_factory=list)
    residual: Array | None = None


def metric_norm(result: PCGResult, b: Array) -> Array:
    """``xᵀ A x`` of the last iterate as ``x · (b − r)`` from PCG's own residual: the squared
    length of the direction in the metric the solve used (:func:`lnb_ref.solvers.metric_norm`);
    a 0-d array on the device."""
    xp = _compat.namespace(result.x, b)
    return _compat.vdot(xp, result.x, b - result.residual)


def pcg(
    matvec: Operator,
    b: Array,
    iterations: int,
    precondition: Operator | None = None,
    x0: Array | None = None,
) -> PCGResult:
    """``iterations`` steps of preconditioned CG on ``A x = b`` from ``x0`` (0 if None).

    Args:
        matvec: ``v ↦ A v``, ``A`` symmetric positive semi-definite.
        b: the right-hand side (θ's shape is kept throughout).
        iterations: the number of iterations (≥ 1; the paper uses 2).
        precondition: ``v ↦ P v`` (None: the identity, plain CG).
        x0: the warm start.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    xp = _compat.namespace(b, x0)
    P = precondition if precondition is not None else (lambda v: v)
    if x0 is None:  # from 0: r₀ = b, no product
        x, r = xp.zeros_like(b), b
    else:
        x, r = x0, b - matvec(x0)
    y = P(r)
    p = y
    ry = _compat.vdot(xp, r, y)
    rnorm = _compat.norm(xp, r)
    result = PCGResult(x=x, residual_norms=[rnorm])
    zero = xp.zeros_like(ry)
    for _ in range(iterations):
        Ap = matvec(p)
        pAp = _compat.vdot(xp, p, Ap)
        skip = (ry == zero) | (pAp == zero)
        alpha = xp.where(skip, zero, ry / xp.where(skip, zero + 1, pAp))
        x = x + alpha * p
        r = r - alpha * Ap
        y = P(r)
        ry_next = _compat.vdot(xp, r, y)
        beta = xp.where(skip, zero, ry_next / xp.where(skip, zero + 1, ry))
        p = xp.where(skip, p, y + beta * p)
        ry = xp.where(skip, ry, ry_next)
        rnorm = xp.where(skip, rnorm, _compat.norm(xp, r))
        result.iterates.append(x)
        result.residual_norms.append(rnorm)
    result.x = x
    result.residual = r
    return result
