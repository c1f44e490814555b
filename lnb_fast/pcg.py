"""Preconditioned conjugate gradient with a fixed number of iterations (Algorithm 2, line 10).

Written for JAX on PyTrees (a neuron's ``(w, b)``), unrolled at trace time: LNB runs 2 iterations,
so a ``lax.while_loop`` would only add overhead, and the fixed count makes every step cost the
same. ``jax.scipy.sparse.linalg.cg`` (and lineax) stop on a tolerance and do not return the
iterates, both of which the cross-checks against :func:`lnb_ref.solvers.pcg` need; hence our own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


def vdot(x, y):
    """``Σ x ⊙ y`` over all entries, in the arrays' own shapes (parameters are real).

    Not ``jnp.vdot``: it flattens both operands first, and flattening a weight that is sharded
    along an inner axis (a column-parallel ``(d_in, d_out)`` split over ``d_out``) makes XLA
    all-gather the whole weight. An elementwise product and a full sum keep every shard where
    it is and all-reduce one scalar (docs/scaling.md, tensor-sharded weights). Low-precision
    (bf16/f16) entries are multiplied and summed in float32, as ``jnp.vdot``'s dot accumulates,
    and the result has the operands' dtype, as ``jnp.vdot``'s."""
    dtype = jnp.result_type(x, y)
    wide = jnp.promote_types(dtype, jnp.float32)
    return jnp.sum(x.astype(wide) * y.astype(wide)).astype(dtype)


def tree_vdot(a: PyTree, b: PyTree):
    """``Σ_leaves a · b`` (:func:`vdot` per leaf)."""
    return sum(vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(lambda u, v: v + alpha * u, x, y)


def _next_direction(ok, beta, y, p):
    """``p ← y + β p`` unless the iteration was degenerate (then p is kept)."""
    return jnp.where(ok, y + beta * p, p)


class PCGResult(NamedTuple):
    """``x``: the last iterate; ``iterates``: ``[x_1, ..., x_k]``; ``residual_norms``:
    ``[‖r_0‖, ..., ‖r_k‖]`` with ``r = b − A x`` (as :class:`lnb_ref.solvers.PCGResult`);
    ``residual``: the last ``r_k`` itself, so that ``xᵀAx = x · (b − r_k)`` needs no further
    product (:func:`metric_norm`)."""

    x: PyTree
    iterates: list
    residual_norms: list
    residual: PyTree = None


def metric_norm(result: PCGResult, b: PyTree):
    """``xᵀ A x`` of the last iterate as ``x · (b − r)``: the squared length of the direction in
    the metric the solve used, from PCG's own residual (as :func:`lnb_ref.solvers.metric_norm`)."""
    return tree_vdot(result.x, jax.tree.map(jnp.subtract, b, result.residual))


def pcg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    iterations: int,
    precondition: Callable[[PyTree], PyTree] | None = None,
    x0: PyTree | None = None,
) -> PCGResult:
    """Solve ``A x = b`` (``A`` symmetric PSD) by ``iterations`` steps of PCG from ``x0``.

    The textbook recursion (Nocedal & Wright, Alg. 5.3) with ``P ≈ A⁻¹``::

        r₀ = b − A x₀,  y₀ = P r₀,  p₀ = y₀
        αₖ = rₖ·yₖ / pₖ·A pₖ;   xₖ₊₁ = xₖ + αₖ pₖ;   rₖ₊₁ = rₖ − αₖ A pₖ
        yₖ₊₁ = P rₖ₊₁;   βₖ = rₖ₊₁·yₖ₊₁ / rₖ·yₖ;   pₖ₊₁ = yₖ₊₁ + βₖ pₖ

    If ``rₖ·yₖ = 0`` or ``pₖ·A pₖ = 0`` (the residual vanished) the iterate is kept, as in the
    reference. Returns every iterate so tests can compare them one by one. Without ``x0`` the
    start is 0 and ``r₀ = b`` (no product).
    """
    P = precondition if precondition is not None else (lambda v: v)
    if x0 is None:
        x, r = jax.tree.map(jnp.zeros_like, b), b
    else:
        x = x0
        r = jax.tree.map(jnp.subtract, b, matvec(x))
    y = P(r)
    p = y
    ry = tree_vdot(r, y)
    iterates, norms = [], [jnp.sqrt(tree_vdot(r, r))]
    for _ in range(iterations):
        Ap = matvec(p)
        pAp = tree_vdot(p, Ap)
        ok = (ry != 0) & (pAp != 0)
        alpha = jnp.where(ok, ry / jnp.where(ok, pAp, 1), 0)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, Ap, r)
        y = P(r)
        ry_next = tree_vdot(r, y)
        beta = jnp.where(ok, ry_next / jnp.where(ok, ry, 1), 0)
        p = jax.tree.map(partial(_next_direction, ok, beta), y, p)
        ry = jnp.where(ok, ry_next, ry)
        iterates.append(x)
        norms.append(jnp.sqrt(tree_vdot(r, r)))
    return PCGResult(x, iterates, norms, r)
