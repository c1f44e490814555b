"""A linear neuron found in a traced loss function, and the linear algebra LNB needs from it.

A :class:`Neuron` is the part of a model that is linear in one weight leaf (and optionally one
bias leaf): ``f(X; w, b)`` with ``X`` the neuron's input features. It is *replayed* from the
primitives :mod:`lnb_fast.discovery` found in the jaxpr (``dot_general``, ``conv_general_dilated``,
an elementwise ``mul``, the ``add`` of a bias, and the reshapes/transposes in between), so every
layer library is handled by the same code and nothing is layer-specific:

* ``J v = f(X; v)`` exactly, because ``f`` is linear in θ (paper Eq. 11);
* ``Jᵀ u`` is the VJP of that same map (``jax.vjp``);
* the metric product is ``M v = Jᵀ(J v) / n_i + γ v_w`` (Eq. 11, ridge on non-bias entries, §3.4);
* the feature moments of Algorithm 2 (lines 6–7) are ``Jᵀ 1 / n_i`` with inputs ``X`` and
  ``X ⊙ X``: the mean and mean square of each design column, broadcast over the neuron's output
  rows, i.e. *shaped like the weight*. A design column is a selection of input entries (a column
  of ``X``, a patch position of a convolution, a feature of a scale), so ``Φ(X ⊙ X) = Φ(X)²``.

Parameters keep the user's layout (``(d_in, d_out)`` for ``x @ w``, ``(out, in)`` for Equinox,
``HWIO`` or ``OIHW`` kernels, ...). The only place where the output rows matter is the incomplete
Cholesky preconditioner of a neuron with a bias, which pairs weight row ``k`` with bias entry ``k``;
:class:`RowMap` finds that pairing once per neuron by probing the map (see :func:`row_map`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._jax_compat import bind, varying_like

Params = tuple  # (w,) or (w, b): the neuron's parameters, in the user's layouts


@dataclass(frozen=True, eq=False)
class Step:
    """One primitive applied to a single traced operand, the other operands being literals.

    Used for the shape-only (linear) ops between a parameter leaf and the op that consumes it:
    transposes, reshapes, dtype conversions, broadcasts, a multiplication by a constant."""

    primitive: Any
    params: dict
    operands: tuple
    position: int

    def __call__(self, value):
        ops = list(self.operands)
        ops[self.position] = value
        out = bind(self.primitive, self.params, ops)
        return out[0] if self.primitive.multiple_results else out


def replay(steps: tuple[Step, ...], value):
    """Apply a chain of :class:`Step` in order."""
    for step in steps:
        value = step(value)
    return value


@dataclass(eq=False)
class Neuron:
    """A neuron ``f(X; w, b)`` discovered in a loss function.

    Attributes:
        kind: ``"dense"`` (``dot_general``), ``"conv"`` (``conv_general_dilated``), ``"scale"``
            (elementwise ``mul``) or ``"tagged"`` (:func:`lnb_fast.tag_neuron`).
        weight, bias: indices of the weight and bias leaves in the flattened parameters
            (``bias`` is None without one).
        weight_path, bias_path: the leaves' pytree paths, for tables and error messages.
        n_samples: ``n_i`` of Eq. 11 (footnote 3): the number of rows of the design — batch
            elements for a dense neuron, output pixels for a convolution, uses of each entry
            for a scale.
        x_shape, x_dtype: the input features' aval.
        extra: for a scale whose output is multiplied again by activations (Flax's LayerNorm
            computes ``(x − m) · (rsqrt(v) · scale)``), the operand position and shape of each
            further factor; ``X`` is then the tuple of all factors and ``f = (X₀ ⊙ s) ⊙ X₁ ...``.
        free_axes: for a dense neuron, the axes of ``X`` that index samples (its design rows).
        transfer: the elementwise activation φ applied right after the neuron (and its bias):
            ``"tanh"``, ``"sigmoid"``, ``"relu"`` when that is the output's only consumer, else
            ``"identity"``. Only LocoProp-M (:mod:`lnb_fast.locoprop`) reads it.
    """

    kind: str
    weight: int
    weight_path: str
    weight_shape: tuple[int, ...]
    x_shape: tuple[int, ...]
    x_dtype: Any
    n_samples: int
    core: Callable[..., Any]
    w_chain: tuple[Step, ...] = ()
    out_chain: tuple[Step, ...] = ()
    bias: int | None = None
    bias_path: str | None = None
    bias_shape: tuple[int, ...] | None = None
    b_chain: tuple[Step, ...] = ()
    extra: tuple[tuple[int, tuple[int, ...]], ...] = ()
    free_axes: tuple[int, ...] | None = None
    _rows: RowMap | None = field(default=None, repr=False)
    transfer: str = "identity"

    # --- the map ---------------------------------------------------------------------------------
    def apply(self, X, w, b=None):
        """``f(X; w, b)``: the neuron's output for parameters ``(w, b)`` (linear in them)."""
        if self.kind == "tagged":
            return self.core(X, w, b)
        factors = X[1:] if self.extra else ()
        y = self.core(X[0] if self.extra else X, replay(self.w_chain, w))
        for (position, _), factor in zip(self.extra, factors, strict=True):
            y = lax.mul(factor, y) if position == 0 else lax.mul(y, factor)
        y = replay(self.out_chain, y)
        if b is not None:
            y = lax.add(y, replay(self.b_chain, b))
        return y

    def params_of(self, leaves) -> Params:
        """This neuron's ``(w,)`` or ``(w, b)`` out of a list of leaves."""
        if self.bias is None:
            return (leaves[self.weight],)
        return (leaves[self.weight], leaves[self.bias])

    def put_params(self, leaves: list, values: Params) -> None:
        """Write ``(w,)`` or ``(w, b)`` into a list of leaves, in place (inverse of
        :meth:`params_of`)."""
        leaves[self.weight] = values[0]
        if self.bias is not None:
            leaves[self.bias] = values[1]

    # --- Eq. 11 ----------------------------------------------------------------------------------
    def metric_matvec(self, X, v: Params, ridge: float = 0.0) -> Params:
        """``M v = Jᵀ (J v) / n_i + γ v_w`` (Eq. 11 and §3.4): one forward of the neuron's own map
        with parameters ``v`` (which *is* ``J v``) and its VJP. Nothing ``P × P`` is built."""
        v = varying_like(tuple(v), X)  # the replica's own product under shard_map (spmd)
        Jv, pullback = jax.vjp(lambda th: self.apply(X, *th), v)
        out = list(pullback(Jv)[0])
        out = [o / self.n_samples for o in out]
        out[0] = out[0] + ridge * v[0]
        return tuple(out)

    def moments(self, X):
        """``(mean(Φ), mean(Φ ⊙ Φ))`` per design column, shaped like the weight (Alg. 2, lines
        6–7): ``Jᵀ 1 / n_i`` for inputs ``X`` and ``X ⊙ X``."""
        zero = jnp.zeros(self.weight_shape, jnp.result_type(*jax.tree.leaves(X)))
        zero = varying_like(zero, X)  # the replica's own moments under shard_map (spmd)
        apply = self.apply
        if self.free_axes is not None:
            # Dense: the design rows are X's sample axes, so sum them first (keeping them as
            # axes of size 1) and pull back through one "sample": O(d·k) instead of O(n·d·k).
            def apply(inputs, w):
                summed = jnp.sum(inputs, axis=self.free_axes, keepdims=True)
                return self.core(summed, replay(self.w_chain, w))

        def column_sums(inputs):
            out, pullback = jax.vjp(lambda w: apply(inputs, w), zero)
            return pullback(jnp.ones_like(out))[0] / self.n_samples

        return column_sums(X), column_sums(jax.tree.map(lambda x: x * x, X))

    def preconditioner(self, mean, second, ridge: float = 0.0) -> Callable[[Params], Params]:
        """The §3.5 preconditioner ``P ≈ M⁻¹`` from (EMA) moments shaped like the weight.

        Without a bias: ``P = diag(χ + γ)⁻¹`` (Jacobi). With a bias: ``P = W̃ W̃ᵀ``, the exact
        inverse of Eq. 12 with Σ replaced by its diagonal ``δ = χ − μ² + γ`` (a variance within
        rounding of 0, ``≤ 64·eps·χ``, counts as 0). For a row ``[v_w; v_b]``::

            u = (v_w − μ v_b) / δ,      P v = [u; v_b − Σ_row μ ⊙ u]

        A zero entry of ``χ + γ`` (or ``δ``) gets 1 instead of ``1/0``: it belongs to a feature
        that is identically zero, or constant next to a bias, where the metric is singular.
        """
        if self.bias is None:
            inv = safe_reciprocal(second + ridge)
            return lambda v: (v[0] * inv,)
        var = second - mean * mean
        tiny = 64 * jnp.finfo(jnp.result_type(second)).eps * second
        inv_var = safe_reciprocal(jnp.where(var > tiny, var, 0.0) + ridge)
        rows = self.row_map()

        def apply(v):
            vw, vb = v
            u = (vw - mean * rows.broadcast(vb)) * inv_var
            return (u, vb - rows.row_sum(mean * u))

        return apply

    def row_map(self) -> RowMap:
        """The pairing of weight entries with bias entries (computed once, see :func:`row_map`)."""
        if self._rows is None:
            self._rows = row_map(self)
        return self._rows

    # --- for tables ------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        n = int(np.prod(self.weight_shape))
        return n + (int(np.prod(self.bias_shape)) if self.bias is not None else 0)


def safe_reciprocal(v):
    """``1/v`` where ``v > 0`` and 1 elsewhere (see :meth:`Neuron.preconditioner`)."""
    positive = v > 0
    return jnp.where(positive, 1.0 / jnp.where(positive, v, 1.0), 1.0)


@dataclass(frozen=True, eq=False)
class RowMap:
    """Which bias entry each weight entry shares its output row with.

    Stored separably when possible: the output row of weight entry ``w[i]`` is
    ``perm[ravel(i[axes])]`` (``axes``: the weight axes that carry the output feature, e.g. the
    last axis of a ``(d_in, d_out)`` dense weight or the ``O`` axis of a kernel). Otherwise a
    full integer map ``rows`` shaped like the weight is used (gathers and segment sums).
    """

    weight_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]
    axes: tuple[int, ...] | None
    perm: np.ndarray | None
    rows: np.ndarray | None

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.bias_shape))

    def row_sum(self, u):
        """Weight-shaped -> bias-shaped: ``out[k] = Σ_{entries i of row k} u[i]``."""
        if self.axes is None:
            flat = jax.ops.segment_sum(u.ravel(), self.rows.ravel(), self.n_rows)
            return flat.reshape(self.bias_shape)
        others = tuple(i for i in range(len(self.weight_shape)) if i not in self.axes)
        flat = jnp.sum(u, axis=others).ravel()
        if self.perm is not None:
            flat = flat[np.argsort(self.perm)]
        return flat.reshape(self.bias_shape)

    def broadcast(self, v):
        """Bias-shaped -> weight-shaped: every entry of row ``k`` gets ``v[k]``."""
        flat = v.ravel()
        if self.axes is None:
            return flat[self.rows]
        if self.perm is not None:
            flat = flat[self.perm]
        sub = flat.reshape(tuple(self.weight_shape[a] for a in self.axes))
        return lax.broadcast_in_dim(sub, self.weight_shape, self.axes)


#: :func:`probe`'s results, by what was probed; the oldest are dropped beyond PROBE_CACHE_SIZE
_PROBES: OrderedDict[tuple, tuple[np.ndarray, ...]] = OrderedDict()
PROBE_CACHE_SIZE = 1024


def probe(kind: str, fn: Callable, *args) -> tuple[np.ndarray, ...]:
    """``fn(*args)``'s output leaves as read-only NumPy arrays: one trace-time evaluation of a
    neuron's own map (:func:`row_map`, :func:`lnb_fast.covariance.gram_layout`), compiled as one
    program rather than run one operation at a time (each operation run eagerly compiles on its
    own, ~15 ms each on a CPU).

    Remembered for the process by ``kind`` and what ``fn`` computes: its jaxpr for the
    arguments' shapes and dtypes, with the values of its constants. So a layer of a shape and
    structure already probed (the next block of a transformer, the same model traced again for
    another step function) costs one trace of ``fn``, not another compilation. The arguments
    must be fixed by ``kind`` and their shapes (all-ones inputs, index arrays); a constant that
    is not concrete (traced) is not remembered."""
    # Traced on its own (also inside a jit trace: a new trace, nothing staged into the outer
    # one) and outside ensure_compile_time_eval, so its constants are not computed eagerly.
    traced = jax.jit(fn).trace(*args)
    try:
        consts = [np.asarray(c) for c in traced.jaxpr.consts]
        values = tuple((c.dtype.str, c.shape, c.tobytes()) for c in consts)
        key = (kind, str(traced.jaxpr.jaxpr), values)
    except jax.errors.JAXTypeError:  # a traced constant: evaluated as before, not remembered
        key = None
    if key is not None and key in _PROBES:
        _PROBES.move_to_end(key)
        return _PROBES[key]
    if key is None:
        with jax.ensure_compile_time_eval():
            out = tuple(np.asarray(leaf) for leaf in jax.tree.leaves(fn(*args)))
    else:
        out = tuple(np.asarray(leaf) for leaf in jax.tree.leaves(traced.lower().compile()(*args)))
    for leaf in out:
        leaf.flags.writeable = False
    if key is not None:
        _PROBES[key] = out
        if len(_PROBES) > PROBE_CACHE_SIZE:
            _PROBES.popitem(last=False)
    return out


def row_map(neuron: Neuron) -> RowMap:
    """Find the output row of every weight entry by probing the neuron's own map.

    With all-ones inputs ``X₁`` and zero weights, ``c = f(X₁; 0, k+1)`` is an output whose every
    entry holds (one plus) the index of the bias it receives. Pulled back to the weights,
    ``Jᵀc / Jᵀ1`` is then, for every weight entry, one plus the index of its row (the ratio
    removes how many output positions the entry reaches). Computed once per neuron at trace
    time, as one compiled program remembered across neurons of the same map (:func:`probe`).
    """
    if neuron.bias is None:
        raise ValueError(f"neuron {neuron.weight_path}: no bias, so no rows to pair")
    K = int(np.prod(neuron.bias_shape))

    def pulled_back(X1, w0, index):
        c = neuron.apply(X1, w0, index)
        _, pullback = jax.vjp(lambda w: neuron.apply(X1, w), w0)
        return pullback(c)[0], pullback(jnp.ones_like(c))[0]

    dtype = np.dtype(neuron.x_dtype)
    ones = [np.ones(neuron.x_shape, dtype)] + [np.ones(shape, dtype) for _, shape in neuron.extra]
    X1 = tuple(ones) if neuron.extra else ones[0]
    w0 = np.zeros(neuron.weight_shape, dtype)
    index = np.arange(1, K + 1).astype(dtype).reshape(neuron.bias_shape)
    num, den = (a.astype(np.float64) for a in probe("row_map", pulled_back, X1, w0, index))
    ratio = np.divide(num, den, out=np.ones_like(num), where=den > 0)
    rows = np.rint(ratio).astype(np.int64) - 1
    if np.max(np.abs(ratio - (rows + 1))) > 0.25 or rows.min() < 0 or rows.max() >= K:
        raise ValueError(
            f"neuron {neuron.weight_path}: could not pair weight rows with the bias "
            f"{neuron.bias_path}; tag it with lnb_fast.tag_neuron or leave the bias out"
        )
    shape = tuple(neuron.weight_shape)
    axes = tuple(
        a for a in range(rows.ndim) if rows.shape[a] > 1 and np.any(np.diff(rows, axis=a) != 0)
    )
    sub = rows[tuple(slice(None) if a in axes else 0 for a in range(rows.ndim))]
    others = tuple(a for a in range(rows.ndim) if a not in axes)
    separable = bool(axes) and np.array_equal(
        np.broadcast_to(np.expand_dims(sub, others), shape), rows
    )
    if separable and np.array_equal(np.sort(sub.ravel()), np.arange(K)):
        perm = sub.ravel()
        perm = None if np.array_equal(perm, np.arange(K)) else perm
        return RowMap(shape, tuple(neuron.bias_shape), axes, perm, None)
    return RowMap(shape, tuple(neuron.bias_shape), None, None, rows)
