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

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._jax_compat import checks_varying, make_varying, manual_axes, varying_axes
from .errors import AxisError


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


class Symmetric:
    """A symmetric matrix (or a stack of them, ``(..., d, d)``) handed to :meth:`Reducer.mean`:
    only its upper triangle, ``d(d + 1)/2`` entries, is reduced (the Grams ``C`` of Eq. 11)."""

    def __init__(self, matrix):
        self.matrix = matrix

    def pack(self):
        d = self.matrix.shape[-1]
        rows, cols = np.triu_indices(d)
        return self.matrix[..., rows, cols]

    def unpack(self, packed):
        d = self.matrix.shape[-1]
        rows, cols = np.triu_indices(d)
        upper = jnp.zeros(packed.shape[:-1] + (d, d), packed.dtype).at[..., rows, cols].set(packed)
        lower = jnp.swapaxes(upper, -1, -2)
        return upper + lower - jnp.eye(d, dtype=packed.dtype) * lower


class Reducer:
    """The means over ``axes`` one step of a transformation needs (module docstring).

    ``Reducer(())`` (no axis) returns every value unchanged: the single-device path is the
    same code with the identity here."""

    def __init__(self, axes: tuple):
        self.axes = axes
        self.typed = bool(axes) and bool(checks_varying())
        #: how many replicas the batch is split over (1 without an axis)
        self.size = int(np.prod([lax.axis_size(a) for a in axes])) if axes else 1

    def __bool__(self) -> bool:
        return bool(self.axes)

    def _varying(self, x):
        """``x`` typed as varying over every axis of the reduction (a no-op cast; needed under
        ``check_vma`` where operands of one collective, or both branches of a ``cond``, must
        vary alike). Unchanged without types."""
        if not self.typed:
            return x
        missing = tuple(a for a in self.axes if a not in varying_axes(x))
        return make_varying(x, missing) if missing else x

    def _needs(self, x) -> bool:
        # with types: only what varies over one of our axes (an averaged value is left alone)
        return not self.typed or bool(varying_axes(x) & set(self.axes))

    def mean(self, values: Sequence) -> list:
        """``pmean`` over the axes of every array in ``values`` (None entries pass), in *one*
        collective (one all-reduce of all the operands)."""
        values = list(values)
        if not self.axes:
            return [x.matrix if isinstance(x, Symmetric) else x for x in values]
        packed = {i: x for i, x in enumerate(values) if isinstance(x, Symmetric)}
        for i, x in packed.items():
            values[i] = x.pack()
        picked = [i for i, x in enumerate(values) if x is not None and self._needs(x)]
        if not picked:
            return self._unpack(values, packed)
        operands = tuple(self._varying(values[i]) for i in picked)
        reduced = lax.pmean(operands, self.axes)
        for i, x in zip(picked, reduced, strict=True):
            values[i] = x
        return self._unpack(values, packed)

    @staticmethod
    def _unpack(values: list, packed: dict) -> list:
        for i, x in packed.items():
            values[i] = x.unpack(values[i])
        return values

    def symmetric(self, matrix):
        """:meth:`mean` of one symmetric matrix (a stack of them), its upper triangle only."""
        return self.mean([Symmetric(matrix)])[0]

    def replica(self):
        """This replica's index along the axes, 0 … ``size − 1`` (row-major over the axes)."""
        index = jnp.zeros([], jnp.int32)
        for a in self.axes:
            index = index * lax.axis_size(a) + lax.axis_index(a)
        return index

    def from_owner(self, owner: int, compute, like):
        """``compute()``, a symmetric matrix (a stack of them) shaped like ``like``, evaluated on
        replica ``owner`` only and returned on every replica: the others contribute zeros to
        one all-reduce of the upper triangles (a broadcast; adding zeros is exact). Without
        axes, ``compute()``. Every replica must call this (it is a collective)."""
        if not self.axes:
            return compute()
        mine = self.replica() == owner
        value = lax.cond(
            mine, lambda: self._varying(compute()), lambda: self._varying(jnp.zeros_like(like))
        )
        packed = Symmetric(value)
        return packed.unpack(lax.psum(packed.pack(), self.axes))

    def by_columns(self, columns, d: int, symmetric: bool = False):
        """A ``(G, d, d)`` matrix whose columns ``columns(start, count)`` computes
        (``(G, d, count)``), each replica computing ``count = ⌈d/P⌉`` of them and one psum
        putting them together (each replica adds its block to zeros: exact). With
        ``symmetric``, only the upper triangle travels (``d(d + 1)/2`` entries, as
        :meth:`from_owner` sends) and the lower one is its mirror. Without axes,
        ``columns(0, d)``. Every replica must call this (it is a collective)."""
        if not self.axes:
            return columns(0, d)
        count = -(-d // self.size)
        start = self.replica() * count
        block = self._varying(columns(start, count))
        full = self._varying(jnp.zeros((*block.shape[:-1], count * self.size), block.dtype))
        full = lax.dynamic_update_slice_in_dim(full, block, start, axis=-1)[..., :d]
        if not symmetric:
            return lax.psum(full, self.axes)
        packed = Symmetric(full)
        return packed.unpack(lax.psum(packed.pack(), self.axes))

    def split_inverse(self, M):
        """``M⁻¹`` (``(G, d, d)``, symmetric positive definite) with its columns shared among
        the replicas (:meth:`by_columns`): every replica factors ``M`` (``d³/3`` flops) and
        solves for its ``⌈d/P⌉`` columns (``2d³/P``), instead of one replica doing all
        ``7d³/3``; ``split_refresh``'s plan for a metric larger than a replica's share. The
        inverse is symmetric, so its upper triangle is what travels (each entry ``(i, j)``,
        ``i ≤ j``, from the replica that solved for column ``j``)."""
        from .covariance import cholesky_inverse  # (covariance imports this module)

        columns = lambda start, n: cholesky_inverse(M, (start, n))  # noqa: E731
        return self.by_columns(columns, M.shape[-1], symmetric=True)

    def gram(self, values: Sequence) -> list:
        """:meth:`mean` of ``[C, μ]``, a Gram and its mean (:func:`lnb_fast.covariance.gram`),
        ``C`` as :class:`Symmetric`."""
        C, mu = values
        return self.mean([Symmetric(C), mu])


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


COVARIANCE_SYNCS = ("step", "refresh")


@jax.tree_util.register_pytree_node_class
class PerReplica:
    """A state entry each replica keeps of its own (the covariance EMA ``A`` with
    ``covariance_sync="refresh"``): :func:`state_specs` lays it out over the axis."""

    def __init__(self, value):
        self.value = value

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(children[0])

    def __repr__(self) -> str:
        return f"PerReplica({self.value!r})"


def covariance_state(pair, covariance_sync: str, axis_name=None):
    """A new ``(A, A_inv)`` entry of the state: ``A`` marked :class:`PerReplica` for
    ``"refresh"``, and typed as varying over ``axis_name`` when made inside ``shard_map`` (so
    that a ``lax.scan`` over steps carries the type it will have)."""
    if pair is None or covariance_sync != "refresh":
        return pair
    A = pair[0]
    axes = tuple(a for a in axis_tuple(axis_name) if a in manual_axes())
    if axes and checks_varying():
        A = make_varying(A, tuple(a for a in axes if a not in varying_axes(A)))
    return (PerReplica(A), pair[1])


def unwrapped(pair):
    """``(A, A_inv)`` as arrays, and a function that marks a new pair as ``pair`` was."""
    if pair is None or not isinstance(pair[0], PerReplica):
        return pair, lambda new: new
    return (pair[0].value, pair[1]), lambda new: (PerReplica(new[0]), new[1])


def check_sync(covariance_sync: str) -> str:
    if covariance_sync not in COVARIANCE_SYNCS:
        raise ValueError(
            f"covariance_sync must be one of {COVARIANCE_SYNCS}, got {covariance_sync!r}"
        )
    return covariance_sync


def check_flag(value, name: str) -> bool:
    """A constructor's on/off option (``split_refresh``, ``whole_directions``) as a bool: a
    ``TypeError`` naming it for anything but True or False (NumPy's bools included)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def owners(costs: Sequence[float], size: int, start: float = 0.0) -> list[int]:
    """The replica that computes each of the refresh's inverses (``split_refresh``): the
    costliest first, each to the replica with the least work so far (longest processing time
    first; within 4/3 of the best balance). ``costs``: one per inverse (``G·D³``); ``start``:
    the work every replica has already (its share of the column-split inverses)."""
    load = [start] * size
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(size), key=load.__getitem__)
        out[i], load[r] = r, load[r] + costs[i]
    return out


def refresh_plan(cubes: Sequence[float], size: int) -> list[int | None]:
    """How a refresh's inverses are shared out among ``size`` replicas (``split_refresh``): for
    each inverse (its ``G·D³``), the replica that computes it whole, or None when every replica
    computes its share of the columns.

    An inverse costs one replica ``7D³/3`` flops per group (factor and ``D`` solves). One that
    costs more than an even share of them all (``Σ 7D³/3 / P``) would alone set the refresh's
    time, so its columns are split among all replicas (:meth:`Reducer.split_inverse`:
    ``D³/3 + 2D³/P`` each); the others go whole to one replica each, longest first to the
    least loaded (:func:`owners`)."""
    share = sum(7 / 3 * c for c in cubes) / size
    wide = [7 / 3 * c > share for c in cubes]
    start = sum(c * (1 / 3 + 2 / size) for c, w in zip(cubes, wide, strict=True) if w)
    rest = [i for i, w in enumerate(wide) if not w]
    plan: list[int | None] = [None] * len(cubes)
    for i, r in zip(rest, owners([7 / 3 * cubes[i] for i in rest], size, start), strict=True):
        plan[i] = r
    return plan


def split_plan(reduce: Reducer, layouts: dict, split_refresh: bool) -> dict:
    """``{neuron index: {"split": ...} or {"solve": ...}}``: the arguments of
    :func:`lnb_fast.covariance.covariance_direction` that share out each covariance neuron's
    inverse at a refresh as :func:`refresh_plan` decides (``layouts``: index ↦ its
    GramLayout): ``"solve"`` (:meth:`Reducer.split_inverse`) for a column-split one,
    ``"split"`` (:meth:`Reducer.from_owner`) for one computed whole on one replica. Empty
    unless ``split_refresh`` under an axis with 2+ replicas."""
    if not (split_refresh and reduce and reduce.size > 1 and layouts):
        return {}
    keys = list(layouts)
    cubes = [layouts[k].groups * float(layouts[k].aug) ** 3 for k in keys]
    return {
        k: {"solve": reduce.split_inverse}
        if r is None
        else {"split": functools.partial(reduce.from_owner, r)}
        for k, r in zip(keys, refresh_plan(cubes, reduce.size), strict=True)
    }


def covariance_reducers(reduce: Reducer, covariance_sync: str) -> dict:
    """The ``reduce``/``shared`` arguments of :func:`lnb_fast.covariance.covariance_direction`
    for a step with ``reduce`` and ``covariance_sync``: ``"step"`` averages each step's Gram,
    ``"refresh"`` the replicas' EMAs on refresh steps only."""
    if not reduce:
        return {}
    if covariance_sync == "refresh":
        return {"shared": reduce.symmetric}
    return {"reduce": reduce.gram}


def state_specs(opt_state, axis_name):
    """``PartitionSpec``s for ``opt_state`` as ``shard_map``'s ``in_specs``/``out_specs``:
    ``P(axis_name)`` for what each replica keeps of its own (:class:`PerReplica`: the covariance
    strategy's and FOOF's EMA ``A`` with ``covariance_sync="refresh"``, one ``(G, D, D)`` block
    per replica, stacked on the first axis), ``P()`` (replicated) for the rest. Make the state
    inside ``shard_map`` too, so that each replica starts its own::

        specs = lnb_fast.state_specs(jax.eval_shape(opt.init, params), "data")
        state = jax.jit(jax.shard_map(opt.init, mesh=mesh, in_specs=P(), out_specs=specs))(params)
    """
    from jax.sharding import PartitionSpec as P

    def spec(node):
        return PerReplica(P(axis_name)) if isinstance(node, PerReplica) else P()

    return jax.tree.map(spec, opt_state, is_leaf=lambda x: isinstance(x, PerReplica))


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


# --- recipe (a), jit on a context mesh: the metrics kept whole -----------------------------------
def _context_mesh():
    """The mesh set with ``jax.set_mesh`` (or ``jax.sharding.use_mesh``) when it spans several
    devices and every axis is ``Auto`` (XLA places the arrays), else None: under ``shard_map``
    (``Manual`` axes) each replica's arrays are its own, and with no context mesh a sharding
    constraint has no mesh to name."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    if any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return None
    return mesh


def whole(tree):
    """Constrain every array of ``tree`` to be whole on every device of the context mesh (a no-op
    without one, :func:`_context_mesh`).

    For the covariance strategy's (and FOOF's) ``D × D`` second moments and their inverses, and
    the Grams: one matrix per layer, shared by all its neurons, which every device's neurons
    need whole. Left to itself, XLA splits a row-parallel layer's Gram like the layer's inputs
    (over a ``model`` axis) and gathers it back for the Cholesky and the products, weight-sized
    gathers every step (docs/scaling.md, tensor-parallel weights)."""
    if _context_mesh() is None:
        return tree
    spec = jax.sharding.PartitionSpec()
    return jax.tree.map(lambda a: lax.with_sharding_constraint(a, spec), tree)


def columns_whole(design):
    """A design ``Φ`` ``(G, n, d)`` with its ``d`` columns whole on every device of the context
    mesh and its ``n`` rows left where XLA puts them (split over the batch's axes): its Gram
    ``ΦᵀΦ`` is then each device's own rows' sum, with the one reduction over the batch and no
    gather of the Gram (a no-op without a context mesh)."""
    if _context_mesh() is None:
        return design
    P = jax.sharding.PartitionSpec
    return lax.with_sharding_constraint(design, P(None, P.UNCONSTRAINED, None))
