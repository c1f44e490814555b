"""One forward and one backward pass that also return every neuron's input features.

:func:`value_and_grad` is the drop-in for ``jax.value_and_grad`` that LNB needs. It traces the
loss function once per input signature (``jax.make_jaxpr``), finds the neurons
(:mod:`lnb_fast.discovery`), then evaluates the jaxpr with a small interpreter that records the
value of each neuron's input ``X`` as it goes by. The interpreter runs *inside*
``jax.value_and_grad``, so the features are intermediate values of the very forward pass whose
backward gives the gradients: under ``jax.jit`` XLA computes them once.

The interpreter binds every primitive as it is (the way ``jax.core.eval_jaxpr`` does), except that
it steps into the ``jit``/``remat`` calls that contain a neuron so that the neuron's input can be
read. A ``custom_jvp``/``custom_vjp`` call that contains a neuron is bound as it is (its custom
derivative is kept) and its body is evaluated a second time on ``stop_gradient`` inputs to read
the features; XLA usually merges the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.extend.core import Literal

from ._jax_compat import bind, make_varying, untyped_varying, varying_axes
from .discovery import CUSTOM_CALLS, INLINE_CALLS, NeuronTable, resolve, sub_jaxpr, walk
from .errors import DiscoveryError


class Features:
    """The input features ``X_i`` of every neuron, from one forward pass, plus the (static)
    :class:`~lnb_fast.discovery.NeuronTable` saying which parameters they belong to.

    A PyTree: the arrays are its leaves and the table its static data, so it can cross
    ``jax.jit`` boundaries and be passed to ``opt.update(..., features=features)``.
    """

    def __init__(self, values: tuple, table: NeuronTable):
        self.values = tuple(values)
        self.table = table

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        shapes = ", ".join(
            str(jax.tree.map(lambda x: tuple(getattr(x, "shape", ())), v)) for v in self.values
        )
        return f"Features({len(self.values)} neurons: {shapes})"


jax.tree_util.register_pytree_node(
    Features, lambda f: (f.values, f.table), lambda table, values: Features(values, table)
)


def leaf_paths(tree) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf, e.g. ``['layers'][0].weight``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path) for path, _ in flat]


def check_params(params) -> None:
    """Every parameter leaf must be a floating array; say which one is not, and what to do."""
    leaves = jax.tree_util.tree_leaves(params)
    for path, leaf in zip(leaf_paths(params), leaves, strict=True):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            raise DiscoveryError(
                f"parameter {path or '<root>'} is {type(leaf).__name__}"
                + (f" of dtype {dtype}" if dtype is not None else "")
                + ", not a floating array; pass only the trainable arrays (e.g. "
                "eqx.partition(model, eqx.is_inexact_array) or nnx.split(model, nnx.Param)) "
                "and close over the rest"
            )


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(jax.numpy.shape(x)), jax.numpy.result_type(x)) for x in leaves)


class Traced:
    """A loss function traced for one input signature: its jaxpr and its neuron table.

    Built by :meth:`ValueAndGrad.trace`, which has already checked the parameters."""

    def __init__(self, loss_fn: Callable, params, args: tuple, has_aux: bool):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)),
            (params, args),
        )
        try:
            closed, out_shape = jax.make_jaxpr(lambda p, a: loss_fn(p, *a), return_shape=True)(
                *abstract
            )
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise DiscoveryError(f"could not trace the loss function: {err}") from err
        value_shape = out_shape[0] if has_aux else out_shape
        if getattr(value_shape, "shape", None) != ():
            raise DiscoveryError(
                "the loss function must return a scalar"
                + (" as the first element of (loss, aux)" if has_aux else "")
                + f"; it returned {value_shape}"
            )
        self.closed = closed
        self.out_tree = jax.tree_util.tree_structure(out_shape)
        self.n_params = len(leaves)
        self.table = resolve(walk(closed, len(leaves), leaf_paths(params)), treedef)

    def evaluate(self, param_leaves, arg_leaves):
        """``(outputs, features)`` of the jaxpr: outputs as a flat list, features a tuple."""
        table = self.table
        captured: dict[int, Any] = {}
        calls = table.call_paths
        outs = _evaluate(
            self.closed.jaxpr,
            self.closed.consts,
            [*param_leaves, *arg_leaves],
            (),
            table.sites,
            calls,
            captured,
        )
        values = []
        for i, neuron in enumerate(table.neurons):
            slots = range(1 + len(neuron.extra))
            if any((i, s) not in captured for s in slots):  # pragma: no cover - a walk bug
                raise DiscoveryError(f"internal: the inputs of {neuron.weight_path} were missed")
            got = tuple(captured[(i, s)] for s in slots)
            values.append(got if neuron.extra else got[0])
        return outs, tuple(values)


def _evaluate(jaxpr, consts, args, path, sites, calls, captured):
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    def write(v, value):
        env[v] = value
        for slot in sites.get((path, v), ()):
            captured[slot] = value

    for v, value in zip(jaxpr.constvars, consts, strict=True):
        write(v, value)
    for v, value in zip(jaxpr.invars, args, strict=True):
        write(v, value)
    for index, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        here = path + (index,)
        name = eqn.primitive.name
        if here in calls and name in INLINE_CALLS:
            inner, inner_consts = sub_jaxpr(eqn)
            outs = _evaluate(inner, inner_consts, invals, here, sites, calls, captured)
        else:
            with eqn.ctx.manager:
                outs = bind(eqn.primitive, eqn.params, invals)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            if here in calls and name in CUSTOM_CALLS:
                inner, inner_consts = sub_jaxpr(eqn)
                frozen = [lax.stop_gradient(x) for x in invals]
                _evaluate(inner, inner_consts, frozen, here, sites, calls, captured)
        for v, value in zip(eqn.outvars, outs, strict=True):
            write(v, value)
    return [read(v) for v in jaxpr.outvars]


class ValueAndGrad:
    """``jax.value_and_grad(loss_fn)`` that also returns each neuron's input features.

    Calling it returns ``(loss, grads, features)`` (``((loss, aux), grads, features)`` with
    ``has_aux``). Traces are cached per signature of ``(params, *args)``.
    """

    def __init__(self, loss_fn: Callable, has_aux: bool = False):
        self.loss_fn, self.has_aux = loss_fn, has_aux
        self._cache: dict = {}

    def trace(self, params, *args) -> Traced:
        """The :class:`Traced` loss function for this signature (traced on first use)."""
        check_params(params)
        key = _signature((params, args))
        if key not in self._cache:
            self._cache[key] = Traced(self.loss_fn, params, args, self.has_aux)
        return self._cache[key]

    def table(self, params, *args) -> NeuronTable:
        """The neuron table for these inputs (what :func:`lnb_fast.describe` prints)."""
        return self.trace(params, *args).table

    def __call__(self, params, *args):
        traced = self.trace(params, *args)
        arg_leaves = jax.tree_util.tree_leaves(args)
        param_leaves, treedef = jax.tree_util.tree_flatten(params)
        _refuse_explicit_sharding(param_leaves, arg_leaves)

        def forward(leaves):
            outs, feats = traced.evaluate(leaves, arg_leaves)
            out = jax.tree_util.tree_unflatten(traced.out_tree, outs)
            loss, aux = out if self.has_aux else (out, None)
            return loss, (aux, feats)

        # Inside shard_map (check_vma=True) the jaxpr, traced outside it, is replayed untyped,
        # as under check_vma=False: the loss, gradients and features are this replica's own;
        # they are then typed as varying over the axes the inputs vary over, which is what
        # they are (lnb_fast.spmd: the transformation built with axis_name averages them).
        varying = frozenset().union(*(varying_axes(x) for x in (*param_leaves, *arg_leaves)))
        with untyped_varying():
            (loss, (aux, feats)), grads = jax.value_and_grad(forward, has_aux=True)(param_leaves)
        if varying:
            axes = tuple(sorted(varying))
            loss, aux, feats, grads = jax.tree.map(
                lambda x: make_varying(x, tuple(a for a in axes if a not in varying_axes(x))),
                (loss, aux, feats, grads),
            )
        grads = jax.tree_util.tree_unflatten(treedef, grads)
        value = (loss, aux) if self.has_aux else loss
        return value, grads, Features(feats, traced.table)


def _refuse_explicit_sharding(*groups) -> None:
    """A :class:`DiscoveryError` for inputs sharded over an ``Explicit`` mesh axis (JAX ≥ 0.7's
    sharding in types, ``jax.make_mesh``'s default since 0.9): the loss is traced and replayed
    on unsharded types. ``Auto`` axes (XLA propagates the shardings) and ``shard_map`` work."""
    for leaf in (x for group in groups for x in group):
        sharding = getattr(jax.typeof(leaf), "sharding", None)
        spec = getattr(sharding, "spec", ())
        if any(entry is not None for entry in spec):
            raise DiscoveryError(
                f"an input of the loss is sharded in its type ({jax.typeof(leaf).str_short()}: "
                "a mesh with Explicit axes), which lnb_fast.value_and_grad does not follow "
                "yet; make the mesh with axis_types=(jax.sharding.AxisType.Auto, ...) (XLA then "
                "shards the step itself) or run the step under jax.shard_map (docs/scaling.md)"
            )


def value_and_grad(loss_fn: Callable, has_aux: bool = False) -> ValueAndGrad:
    """Like ``jax.value_and_grad(loss_fn, has_aux=has_aux)``, but the returned function gives
    ``(value, grads, features)``: the features are the input of every linear neuron, captured
    from the same forward pass (Algorithm 2, line 3).

    ``loss_fn(params, *args)`` must take the trainable parameters first (a PyTree of floating
    arrays) and return a scalar (or ``(scalar, aux)`` with ``has_aux``); ``args`` are PyTrees of
    arrays (the batch). Close over anything static. Example::

        value_grad_features = lnb_fast.value_and_grad(loss_fn)
        loss, grads, features = value_grad_features(params, batch)
        updates, state = opt.update(grads, state, params, features=features)
    """
    return ValueAndGrad(loss_fn, has_aux=has_aux)
