"""The explicit per-row metric of a dense or convolutional neuron: its design Gram ``C = ΦᵀΦ/n_i``.

A dense or convolutional neuron is ``f(X; θ)_g = Φ_g(X) Θ_gᵀ`` per group ``g``: the design
``Φ_g`` (``n_i × d``: samples or output pixels by input features or patch entries) times the
group's weight rows ``Θ_g`` (``K_g × d``). Its metric is then ``blockdiag_g(I_{K_g} ⊗ C_g)`` with
``C_g = Φ_gᵀΦ_g / n_i`` (paper Eq. 11; §3.3 for dense, footnote 3 for convolutions), and with a
bias the augmented ``[[C, μ], [μᵀ, 1]]`` of Eq. 12 with ``μ_g = Φ_gᵀ1/n_i``.

:func:`gram_layout` finds, once per neuron, how the user's weight leaf maps onto those rows and
how ``X`` maps onto ``Φ``, by re-tracing the neuron's core primitive (its ``dot_general``
dimension numbers, or the ``conv_general_dilated`` specs and groups, whose patches are
``lax.conv_general_dilated_patches``). The weight chain (the reshapes and transposes between
the leaf and the primitive) must be a permutation of entries; its inverse is its transpose
(``jax.linear_transpose``). Anything else (scale and tagged neurons, batched ``dot_general``,
a weight multiplied by a constant, ...) has no layout, and :func:`gram_layout` says why.

Two strategies of :func:`lnb_fast.lnb` use it (see :mod:`lnb_fast.strategy`):

* ``"gram"``: build ``C`` (and ``μ``) from this minibatch, then run the same PCG as the
  matrix-free strategy with products ``v ↦ v C + γ v`` instead of a forward and a VJP;
* ``"covariance"``: an EMA of the augmented second moment ``A`` (Eq. 12), its inverse
  ``(A/c₂ + γ I_nonbias)⁻¹`` refreshed every few steps, and an exact solve (§3.5's second
  option, and FOOF, :mod:`lnb_fast.foof`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .neuron import Neuron, probe, replay
from .spmd import columns_whole, whole


@dataclass(frozen=True, eq=False)
class GramLayout:
    """How a neuron's parameters and input map onto the rows and design of Eq. 11.

    Attributes:
        groups: ``G``; rows: ``K_g`` (output rows per group); cols: ``d`` (design columns).
        design: ``X ↦ Φ`` of shape ``(G, n_i, d)``.
        to_rows: weight leaf ``↦ (G, K_g, d)``; from_rows: its inverse (a permutation).
        bias_index: ``(G, K_g)`` integer array, the flat bias entry of every row (or None).
        bias_shape: the bias leaf's shape.
    """

    groups: int
    rows: int
    cols: int
    design: Callable
    to_rows: Callable
    from_rows: Callable
    bias_index: np.ndarray | None = None
    bias_shape: tuple[int, ...] | None = None

    @property
    def aug(self) -> int:
        """``D``: the row length of the augmented metric (``d`` plus 1 with a bias)."""
        return self.cols + (self.bias_index is not None)

    def bias_rows(self, b):
        """Bias leaf ``↦ (G, K_g)`` (the bias entry of each row)."""
        return jnp.ravel(b)[self.bias_index]

    def bias_from_rows(self, rows):
        """``(G, K_g)`` ``↦`` the bias leaf."""
        flat = jnp.zeros(int(np.prod(self.bias_shape)), rows.dtype)
        return flat.at[self.bias_index.ravel()].set(rows.ravel()).reshape(self.bias_shape)

    def params_to_rows(self, v):
        """``(w,)`` or ``(w, b)`` ``↦`` augmented rows ``(G, K_g, D)`` (bias last, as lnb_ref)."""
        rows = self.to_rows(v[0])
        if self.bias_index is None:
            return rows
        return jnp.concatenate([rows, self.bias_rows(v[1])[..., None]], axis=-1)

    def rows_to_params(self, rows) -> tuple:
        """Inverse of :meth:`params_to_rows`."""
        if self.bias_index is None:
            return (self.from_rows(rows),)
        return (self.from_rows(rows[..., :-1]), self.bias_from_rows(rows[..., -1]))


def _cached(neuron: Neuron) -> GramLayout | str:
    layout = getattr(neuron, "_gram_layout", None)
    if layout is None:
        try:
            layout = _build_layout(neuron)
        except Exception as err:  # noqa: BLE001 - any failure to relate the layout: matrix-free
            layout = f"its layout could not be related to a design ({type(err).__name__}: {err})"
        neuron._gram_layout = layout  # cached on the neuron (one per trace signature)
    return layout


def gram_layout(neuron: Neuron) -> GramLayout | str:
    """The :class:`GramLayout` of ``neuron``, or a string saying why it has none (it then can
    only be matrix-free). Computed once per neuron, at trace time."""
    return _cached(neuron)


def _core_eqn(neuron: Neuron):
    """The single primitive of the neuron's core, traced on the shapes it is applied to."""
    w = jax.ShapeDtypeStruct(neuron.weight_shape, neuron.x_dtype)
    wc = jax.eval_shape(lambda w: replay(neuron.w_chain, w), w)
    x = jax.ShapeDtypeStruct(neuron.x_shape, neuron.x_dtype)
    closed = jax.make_jaxpr(neuron.core)(x, wc)
    eqns = closed.jaxpr.eqns
    if len(eqns) != 1:
        raise ValueError(f"core is {len(eqns)} primitives")
    x_var, w_var = closed.jaxpr.invars
    eqn = eqns[0]
    if list(eqn.invars) == [x_var, w_var]:
        return eqn, 1, wc
    if list(eqn.invars) == [w_var, x_var]:
        return eqn, 0, wc
    raise ValueError("core operands are not (X, W)")


def _build_layout(neuron: Neuron) -> GramLayout | str:
    if neuron.kind not in ("dense", "conv"):
        return f"a {neuron.kind} neuron has no design Gram (matrix-free only)"
    if neuron.extra:
        return "its output is multiplied by further activations"
    eqn, p, wc = _core_eqn(neuron)
    if neuron.kind == "dense":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb:
            return "a batched dot_general (one weight per batch entry)"
        cw, cx = (lc, rc) if p == 0 else (rc, lc)
        fw = tuple(a for a in range(len(wc.shape)) if a not in cw)
        fx = tuple(a for a in range(len(neuron.x_shape)) if a not in cx)
        d = int(np.prod([wc.shape[a] for a in cw]))
        K = int(np.prod([wc.shape[a] for a in fw]))
        n = int(np.prod([neuron.x_shape[a] for a in fx]))

        def design(X):
            return jnp.transpose(X, fx + tuple(cx)).reshape(1, n, d)

        def core_rows(W):
            return jnp.transpose(W, fw + tuple(cw)).reshape(1, K, d)

        groups = 1
    else:
        prm = eqn.params
        if prm["batch_group_count"] != 1:
            return "a convolution with batch groups"
        lhs_spec, rhs_spec, out_spec = prm["dimension_numbers"]
        if list(rhs_spec[2:]) != sorted(rhs_spec[2:]):
            return "a kernel whose spatial axes are not in order"
        groups = int(prm["feature_group_count"])
        spatial = tuple(wc.shape[a] for a in rhs_spec[2:])
        O, I = wc.shape[rhs_spec[0]], wc.shape[rhs_spec[1]]
        d = I * int(np.prod(spatial))
        K = O // groups
        out_order = (out_spec[0], *out_spec[2:], out_spec[1])

        def design(X):
            patches = lax.conv_general_dilated_patches(
                X,
                spatial,
                prm["window_strides"],
                prm["padding"],
                lhs_dilation=prm["lhs_dilation"],
                rhs_dilation=prm["rhs_dilation"],
                dimension_numbers=prm["dimension_numbers"],
            )
            flat = jnp.transpose(patches, out_order).reshape(-1, groups, d)
            return jnp.transpose(flat, (1, 0, 2))

        def core_rows(W):
            W = jnp.transpose(W, (rhs_spec[0], rhs_spec[1], *rhs_spec[2:]))
            return W.reshape(groups, K, d)

    def to_rows(w):
        return core_rows(replay(neuron.w_chain, w))

    w_aval = jax.ShapeDtypeStruct(neuron.weight_shape, neuron.x_dtype)
    size = int(np.prod(neuron.weight_shape))
    if groups * K * d != size:
        return "its weight chain is not a permutation of the rows"
    # Probe with the entries' indices: exact in int32 (a chain that converts to float32 stays
    # exact up to 2^24 entries; beyond that the check fails and the neuron stays matrix-free).
    (entries,) = probe(
        "gram_layout rows", to_rows, np.arange(size, dtype=np.int32).reshape(neuron.weight_shape)
    )
    if not np.array_equal(np.sort(entries.ravel()), np.arange(size)):
        return "its weight chain is not a permutation of the rows"
    transpose = jax.linear_transpose(to_rows, w_aval)

    def from_rows(rows):
        return transpose(rows.astype(neuron.x_dtype))[0]

    bias_index = None
    if neuron.bias is not None:
        rowmap = neuron.row_map()
        (index,) = probe(
            "gram_layout bias rows",
            lambda v: to_rows(rowmap.broadcast(v)),
            np.arange(rowmap.n_rows, dtype=np.float32),
        )
        if not np.all(index == index[..., :1]):
            return "its bias rows do not line up with the weight rows"
        bias_index = index[..., 0].astype(np.int64)
        if not np.array_equal(np.sort(bias_index.ravel()), np.arange(rowmap.n_rows)):
            return "its bias rows do not line up with the weight rows"
    return GramLayout(
        groups,
        K,
        d,
        design,
        to_rows,
        from_rows,
        bias_index,
        tuple(neuron.bias_shape) if neuron.bias is not None else None,
    )


# --- the linear algebra ------------------------------------------------------------------------
def gram(layout: GramLayout, X, n_samples: int, keep_whole: bool = False):
    """``(C, μ)``: ``C_g = Φ_gᵀΦ_g/n_i`` ``(G, d, d)`` and ``μ_g = Φ_gᵀ1/n_i`` ``(G, d)``.

    With ``keep_whole`` (the covariance strategy and FOOF, whose EMA and inverse every device
    needs whole), on a context mesh (``jax.set_mesh``) both come out whole on every device,
    computed from ``Φ`` with its columns whole (:func:`lnb_fast.spmd.columns_whole`): a
    row-parallel layer's inputs are gathered once, its Gram never (docs/scaling.md). Not for
    the gram strategy's PCG: with ``C`` whole, XLA gathers a row-parallel layer's direction for
    every product ``V C`` instead of exchanging partial products."""
    Phi = layout.design(X)
    if keep_whole:
        Phi = columns_whole(Phi)
    C = jnp.einsum("gni,gnj->gij", Phi, Phi) / n_samples
    mu = jnp.sum(Phi, axis=1) / n_samples
    return whole((C, mu)) if keep_whole else (C, mu)


def augmented(layout: GramLayout, C, mu):
    """Eq. 12's augmented second moment ``[[C, μ], [μᵀ, 1]]`` (just ``C`` without a bias)."""
    if layout.bias_index is None:
        return C
    G, d = mu.shape
    top = jnp.concatenate([C, mu[:, :, None]], axis=2)
    bottom = jnp.concatenate([mu, jnp.ones((G, 1), mu.dtype)], axis=1)[:, None, :]
    return jnp.concatenate([top, bottom], axis=1)


def gram_matvec(layout: GramLayout, C, mu, v, ridge):
    """``M v`` from the Gram, on ``(w,)`` / ``(w, b)`` in the user's layout (Eq. 11–12)::

        (M v)_w = V C + b μᵀ + γ V,      (M v)_b = V μ + b        per row ``[V; b]``

    ``ridge`` is a number or an array broadcasting against the rows ``(G, K_g, d)`` (a
    per-column ridge). ``2·d²·K`` flops (plus ``4·d·K`` with a bias) instead of a forward and
    a VJP."""
    V = layout.to_rows(v[0])
    out_w = jnp.einsum("gkd,gde->gke", V, C) + ridge * V
    if layout.bias_index is None:
        return (layout.from_rows(out_w),)
    b = layout.bias_rows(v[1])
    out_w = out_w + b[..., None] * mu[:, None, :]
    out_b = jnp.einsum("gkd,gd->gk", V, mu) + b
    return (layout.from_rows(out_w), layout.bias_from_rows(out_b))


def ridge_matrix(layout: GramLayout, ridge, dtype):
    """``γ I`` on the non-bias diagonal entries, ``(D, D)`` (§3.4); with a per-column ridge
    ``(G, d)``, ``diag(γ_g)`` per group, ``(G, D, D)``."""
    ridge = jnp.asarray(ridge, dtype)
    diag = jnp.full((layout.cols,), ridge, dtype) if ridge.ndim == 0 else ridge
    if layout.bias_index is not None:
        diag = jnp.concatenate([diag, jnp.zeros((*diag.shape[:-1], 1), dtype)], axis=-1)
    return diag[..., :, None] * jnp.eye(layout.aug, dtype=dtype)


def feature_variance(mean, second, bias: bool):
    """``Var(x_j) = χ_j − μ_j²`` with a bias (within rounding of 0, ``≤ 64·eps·χ``: 0), ``χ_j``
    without: the scale of :func:`relative_ridge` (as :func:`lnb_ref.metric.feature_variance`)."""
    if not bias:
        return second
    var = second - mean * mean
    tiny = 64 * jnp.finfo(jnp.result_type(second)).eps * second
    return jnp.where(var > tiny, var, 0.0)


def relative_ridge(mean, second, ridge: float, bias: bool):
    """``γ·Var(x_j)`` per column, ``γ·χ_j`` (or ``γ``) where the variance is 0: the scale-free
    ridge that keeps LNB invariant to per-feature affine maps of the inputs
    (:func:`lnb_ref.metric.relative_ridge` derives it)."""
    var = feature_variance(mean, second, bias)
    return ridge * jnp.where(var > 0, var, jnp.where(second > 0, second, 1.0))


def moments_of_augmented(layout: GramLayout, A):
    """``(μ, χ)`` per group ``(G, d)`` read off an augmented second moment ``[[C, μ], [μᵀ, 1]]``."""
    d = layout.cols
    second = jnp.diagonal(A, axis1=1, axis2=2)[:, :d]
    mean = A[:, :d, d] if layout.bias_index is not None else jnp.zeros_like(second)
    return mean, second


def cholesky_inverse(M, columns: tuple[int, int] | None = None):
    """``M⁻¹`` per group by Cholesky, for ``M`` ``(G, d, d)`` symmetric positive definite; with
    ``columns=(start, count)``, only those columns (``(G, d, count)``; columns past ``d`` are
    zeros): ``L Lᵀ X = E`` for the identity's columns ``E``. The factor costs ``d³/3`` flops,
    each column ``2d²``: a replica that computes ``d/P`` of the columns does ``d³/3 + 2d³/P``
    instead of ``7d³/3`` (:meth:`lnb_fast.spmd.Reducer.by_columns`)."""
    d = M.shape[-1]
    if columns is None:
        eye = jnp.broadcast_to(jnp.eye(d, dtype=M.dtype), M.shape)
    else:
        start, count = columns
        picked = start + jnp.arange(count)  # traced start: this replica's block
        eye = (jnp.arange(d)[:, None] == picked[None, :]).astype(M.dtype)
        eye = jnp.broadcast_to(eye, (*M.shape[:-1], count))
    return jax.vmap(
        lambda m, e: jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(m, lower=True), e)
    )(M, eye)


def damped_inverse(layout: GramLayout, A, ridge, relative: bool = False, solve=None):
    """``(A + γ I_nonbias)⁻¹`` per group by Cholesky (``jax.scipy.linalg.cho_factor``); with
    ``relative``, ``γ·Var(x_j)`` read off ``A``'s own diagonal (:func:`relative_ridge`).

    With a bias, ``A = [[C, μ], [μᵀ, a]]`` (Eq. 12, ``a = 1``) is inverted through its Schur
    complement, the *centred* ``S = C + γ − μμᵀ/a`` (the covariance Σ plus the ridge, §3.3)::

        (A + γ)⁻¹ = [[S⁻¹, −S⁻¹μ/a], [−μᵀS⁻¹/a, 1/a + μᵀS⁻¹μ/a²]]

    which is the same matrix, but only ``S`` is factorised: it lacks the ``d·|μ|²`` eigenvalue
    that the mean adds to ``C``, so its condition number is smaller by up to that factor (20× on
    uniform [0, 1] pixels), which decides whether a float32 Cholesky succeeds.

    The *inverse* is stored, not the factor: between refreshes every step applies it, and a
    matrix product is one GEMM (fast on every accelerator) where ``cho_solve`` is two
    triangular solves (sequential, slow on GPUs). A is symmetric positive definite (γ > 0,
    or a full-rank design), so the inverse is as accurate as the solve to ``κ·eps``.

    ``solve`` (``M ↦ M⁻¹``, default :func:`cholesky_inverse`) lets ``split_refresh`` share the
    columns of one large inverse among the replicas."""
    stored = A.dtype
    A = A.astype(jnp.promote_types(stored, jnp.float32))  # no Cholesky in bf16/f16
    if relative:
        ridge = relative_ridge(
            *moments_of_augmented(layout, A), ridge, layout.bias_index is not None
        )
    M = A + ridge_matrix(layout, ridge, A.dtype)
    bias = layout.bias_index is not None
    if bias:
        d = layout.cols
        mu, a = M[:, :d, d], M[:, d, d][:, None]
        M = M[:, :d, :d] - mu[:, :, None] * mu[:, None, :] / a[:, :, None]
    # ``solve``: split_refresh's column split over the replicas (Reducer.by_columns)
    inv = cholesky_inverse(M) if solve is None else solve(M)
    inv = (inv + jnp.swapaxes(inv, -1, -2)) / 2
    if not bias:
        return inv.astype(stored)
    u = jnp.einsum("gij,gj->gi", inv, mu) / a  # S⁻¹μ/a
    corner = 1 / a + jnp.sum(mu * u, axis=1, keepdims=True) / a
    top = jnp.concatenate([inv, -u[:, :, None]], axis=2)
    bottom = jnp.concatenate([-u, corner], axis=1)[:, None, :]
    return jnp.concatenate([top, bottom], axis=1).astype(stored)


def apply_inverse(layout: GramLayout, inverse, g):
    """``θ̂ = g A⁻¹`` row by row (the exact solve of Eq. 11 with Eq. 12's augmented second
    moment), on ``(w,)``/``(w, b)`` in the user's layout.

    With a bias, by blocks of ``A⁻¹ = [[S, u], [uᵀ, c]]`` rather than on rows ``[V, b]`` with
    the bias appended: ``θ̂_w = V S + b uᵀ``, ``θ̂_b = V u + b c``. The same products, but no
    concatenation onto the design axis, which for a row-parallel weight is the split axis
    (XLA would gather the whole direction to append the column; docs/scaling.md)."""
    V = layout.to_rows(g[0])
    if layout.bias_index is None:
        return (layout.from_rows(jnp.einsum("gkd,gde->gke", V, inverse)),)
    d = layout.cols
    b = layout.bias_rows(g[1])  # (G, K)
    out_w = (
        jnp.einsum("gkd,gde->gke", V, inverse[:, :d, :d]) + b[..., None] * inverse[:, None, d, :d]
    )
    out_b = jnp.einsum("gkd,gd->gk", V, inverse[:, :d, d]) + b * inverse[:, None, d, d]
    return (layout.from_rows(out_w), layout.bias_from_rows(out_b))


def ema_inverse_step(
    layout: GramLayout,
    X,
    n_samples: int,
    A_old,
    inv_old,
    count,
    b2: float,
    ridge: float,
    refresh_every: int,
    covariance_every: int = 1,
    relative: bool = False,
    ok=None,
    reduce=None,
    shared=None,
    split=None,
    solve=None,
):
    """One step of the covariance strategy's bookkeeping (and FOOF's): ``(A, A_inv)``.

    ``A ← β₂ A + (1 − β₂) [[C, μ], [μᵀ, 1]]`` on the steps ``count % covariance_every == 0``
    (the Gram is not even formed on the others), and on the steps ``count % refresh_every == 0``
    ``A_inv = (A/c₂ + γ I_nonbias)⁻¹`` with ``c₂ = 1 − β₂ᵘ``, ``u`` the number of EMA updates so
    far; otherwise the stored inverse is kept (stale). ``count`` is the step count before this
    step (0 first: the first step updates and refreshes). ``ok`` (a boolean scalar, or None):
    False keeps both as they were (a skipped step), gated inside the update and the ``lax.cond``
    so that no extra pass over the matrices is made. Data parallelism (:mod:`lnb_fast.spmd`):
    ``reduce`` averages the replicas' ``[C, μ]`` every step; or ``shared`` averages their
    ``A`` on refresh steps only, each replica keeping the EMA of its own shard (an EMA is
    linear: the mean of the replicas' EMAs is the EMA of the global batch's moments).
    ``split`` (``split_refresh``): ``split(compute, like)`` runs the refresh's inverse on one
    replica and shares it (:meth:`lnb_fast.spmd.Reducer.from_owner`); or ``solve`` (for a
    metric too large for one replica's share) computes its columns on every replica
    (:meth:`lnb_fast.spmd.Reducer.by_columns`)."""

    def update():
        # the Gram in the EMA's precision (float32 at least: bf16 features are widened first)
        X_wide = jax.tree.map(lambda x: x.astype(A_old.dtype), X)
        C, mu = gram(layout, X_wide, n_samples, keep_whole=True)
        if reduce is not None:
            C, mu = reduce([C, mu])
        return b2 * A_old + (1 - b2) * augmented(layout, C, mu).astype(A_old.dtype)

    if isinstance(covariance_every, int) and covariance_every == 1:
        A = update() if ok is None else jnp.where(ok, update(), A_old)
    else:
        now = count % covariance_every == 0
        A = lax.cond(now if ok is None else now & ok, update, lambda: A_old)
    updates = count // covariance_every + 1
    c2 = 1 - jnp.asarray(b2, A_old.dtype) ** updates
    refresh = count % refresh_every == 0

    def refreshed():
        mean = (A if shared is None else shared(A)) / c2
        inverse = lambda: damped_inverse(layout, mean, ridge, relative, solve)  # noqa: E731
        return inverse() if split is None else split(inverse, inv_old)

    inv = lax.cond(refresh if ok is None else refresh & ok, refreshed, lambda: inv_old)
    return whole((A, inv))  # on a context mesh: whole on every device (spmd.whole)


def covariance_direction(
    layout: GramLayout,
    neuron,
    X,
    state,
    count,
    b2,
    ridge,
    refresh_every,
    covariance_every,
    g,
    relative: bool = False,
    ok=None,
    reduce=None,
    shared=None,
    split=None,
    solve=None,
):
    """One neuron's step of the covariance strategy (and of FOOF): update ``state = (A, A_inv)``
    by :func:`ema_inverse_step` (gated by ``ok``) and return it with the direction
    ``θ̂ = g A⁻¹`` for ``g`` the neuron's ``(w,)``/``(w, b)``."""
    A, inv = ema_inverse_step(
        layout,
        X,
        neuron.n_samples,
        *state,
        count,
        b2,
        ridge,
        refresh_every,
        covariance_every,
        relative,
        ok,
        reduce,
        shared,
        split,
        solve,
    )
    direction = apply_inverse(layout, inv, g)
    return (A, inv), tuple(d.astype(x.dtype) for d, x in zip(direction, g, strict=True))
