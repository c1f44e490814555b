"""Data parallelism inside ``jax.shard_map`` (or ``pmap``): every replica takes the step of the
global batch.

Inside ``shard_map`` over a mesh axis ``"data"`` each replica sees its shard of the batch: its
loss, gradients and neuron features are those of the shard. Every statistic LNB builds from a
batch is a *mean over the design rows* (paper Eq. 11, footnote 3), and the mean of a batch split
into equal shards is the mean of the shards' means; so with ``axis_name="data"`` a transformation
averages over the axis, with ``jax.lax.pmean``, exactly these:

* the gradients ``g`` (unless they are already averaged, below);
* the feature moments ``μ_i, χ_i`` (Alg. 2, lines 6–7);
* the design Grams ``C_i`` and means ``μ_i`` (``"gram"``), the covariance strategy's augmented
  second moment (Eq. 12), FOOF's;
* every metric product ``M_i v = Jᵢᵀ Jᵢ v / n_i`` (matrix-free PCG, ProxProp, LocoProp-S) and
  LocoProp's pull-backs ``Jᵢᵀ u`` and Gershgorin bound;
* the non-finite flags (one replica's NaN skips the step on all).

Everything computed from these (PCG's scalars, θ̂, the step norm ``z``, the EMAs) is then the same
on every replica, so the updates and the state are replicated (``out_specs=P()``) and equal, to
rounding, to the single-device step on the global batch.

**Who reduces the gradients.** :func:`lnb_fast.value_and_grad` called inside ``shard_map``
returns the replica's *own* loss, gradients and features (typed as varying over the batch's
axes); the transformation averages them. Gradients the caller already averaged
(``jax.lax.pmean``) are accepted too: under ``shard_map``'s default ``check_vma=True`` their type
says so and they are not reduced again; with ``check_vma=False`` or ``pmap`` they are averaged a
second time, which leaves them unchanged (a mean of equal values) at the price of an
all-reduce. Never pass a *sum* over replicas (what ``jax.grad`` of a shard's loss returns under
``check_vma=True``): it is ``axis_size`` times too long for FOOF, LocoProp and ProxProp (LNB
itself is invariant to the gradient's scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ._jax_compat import checks_varying, make_varying, manual_axes, varying_axes
from .errors import LNBError


class AxisError(LNBError):
    """A transformation runs under a mapped mesh axis it was not told about (or was told about
    one it does not run under)."""


def axis_tuple(axis_name) -> tuple:
    """``None`` -> ``()``, ``"data"`` -> ``("data",)``, a tuple/list of names -> that tuple."""
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    if isinstance(axis_name, (tuple, list)) and all(isinstance(a, str) for a in axis_name):
        return tuple(axis_name)
    raise TypeError(
        f"axis_name must be None, a mesh axis name (str) or a tuple of them, got {axis_name!r}"
    )


class Reducer:
    """The means over ``axes`` one step of a transformation needs (module docstring).

    ``Reducer(())`` (no axis) returns every value unchanged: the single-device path is the
    same code with the identity here."""

    def __init__(self, axes: tuple):
        self.axes = axes
        self.typed = bool(axes) and bool(checks_varying())

    def __bool__(self) -> bool:
        return bool(self.axes)

    def _needs(self, x) -> bool:
        # with types: only what varies over one of our axes (an averaged value is left alone)
        return not self.typed or bool(varying_axes(x) & set(self.axes))

    def mean(self, values: Sequence) -> list:
        """``pmean`` over the axes of every array in ``values`` (None entries pass), in *one*
        collective (one all-reduce of all the operands)."""
        values = list(values)
        if not self.axes:
            return values
        picked = [i for i, x in enumerate(values) if x is not None and self._needs(x)]
        if not picked:
            return values
        operands = []
        for i in picked:
            x = values[i]
            if self.typed:  # varying over every axis of the mean (a no-op cast)
                missing = tuple(a for a in self.axes if a not in varying_axes(x))
                x = make_varying(x, missing) if missing else x
            operands.append(x)
        reduced = lax.pmean(tuple(operands), self.axes)
        for i, x in zip(picked, reduced, strict=True):
            values[i] = x
        return values

    def tree_mean(self, tree):
        """:meth:`mean` over the leaves of a PyTree."""
        if not self.axes:
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        return jax.tree.unflatten(treedef, self.mean(leaves))


def shared(reduce: Reducer, guard, leaves: list, extra: Sequence = ()) -> list:
    """``leaves + extra`` averaged over ``reduce``'s axes in one all-reduce, together with the
    non-finite flags ``guard`` collected so far (made the same on every replica: one replica's
    NaN skips the step on all). None entries pass."""
    leaves = [*leaves, *extra]
    flags = jnp.stack(guard.flags).astype(jnp.float32) if guard.flags else None
    out = reduce.mean([*leaves, flags])
    if flags is not None:
        guard.flags = list(out[-1] > 0)
    return out[:-1]


def check_axes(who: str, axis_name, values) -> Reducer:
    """The :class:`Reducer` of a step of ``who`` built with ``axis_name``, after checking that
    it matches the mapped axes the step is traced under; ``values`` (gradients and features)
    tell, where ``shard_map`` types them, which axes the batch is split over.

    Raises :class:`AxisError` instead of letting replicas diverge: under ``shard_map`` (default
    ``check_vma=True``) when a gradient or a feature varies over an axis that ``axis_name`` does
    not name; under ``pmap`` or ``shard_map(check_vma=False)``, where JAX does not type what
    varies, when ``axis_name`` does not name every mapped axis; and when ``axis_name`` names an
    axis the step is not mapped over (``jit`` with a sharded batch needs no ``axis_name``: XLA
    inserts the reductions itself)."""
    axes = axis_tuple(axis_name)
    mapped = manual_axes()
    unknown = [a for a in axes if a not in mapped]
    if unknown:
        where = f"the mapped axes here are {mapped}" if mapped else "it runs under no mapped axis"
        raise AxisError(
            f"lnb_fast.{who}(axis_name={axis_name!r}): {where}, not {tuple(unknown)}. "
            "axis_name is for shard_map/pmap over a batch axis; under jax.jit with a sharded "
            "batch (NamedSharding) leave it None: XLA reduces the statistics itself"
        )
    if not mapped:
        return Reducer(axes)
    if checks_varying():
        varying = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(values)))
        missing = tuple(a for a in mapped if a in varying and a not in axes)
        why = "the gradients or the features vary over the mesh axes"
    else:
        missing = tuple(a for a in mapped if a not in axes)
        why = (
            "it runs under pmap or shard_map(check_vma=False), where JAX does not say which "
            "values differ between replicas, mapped over"
        )
    if missing:
        suggestion = missing[0] if len(missing) == 1 and not axes else (*axes, *missing)
        if any(str(a).startswith("_") for a in missing):  # pmap's own name for an unnamed axis
            suggestion = "i"
            why = f"{why} (an unnamed pmap axis: pmap(..., axis_name='i'))"
        raise AxisError(
            f"lnb_fast.{who}: {why} {missing}, but axis_name={axis_name!r} does not name them: "
            "each replica would take a step with the statistics of its own shard and the "
            f"replicas would drift apart. Build it with axis_name={suggestion!r} so that the "
            "feature statistics, metric products and gradients are averaged over the batch "
            "(docs/scaling.md); averaging over an axis whose replicas hold the same data is "
            "harmless"
        )
    return Reducer(axes)
