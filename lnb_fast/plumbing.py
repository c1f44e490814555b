"""What every transformation of lnb_fast shares to be an ordinary optax citizen.

* **Hyperparameters that may be traced.** ``optax.inject_hyperparams`` calls the factory again
  (and ``init``) with every numeric argument as an array, traced in ``update``, so values are
  validated only when they are Python numbers (:func:`check_rate`); the few that fix the shape
  of the computation (PCG iterations, inner steps) must stay Python integers
  (:func:`static_int`).
* **Masked trees.** ``optax.masked`` and ``optax.partition`` hand the inner transformation
  trees with ``optax.MaskedNode`` where a leaf (or a whole subtree) is not its to update.
  :func:`align` reads such a tree in the order of the :class:`~lnb_fast.NeuronTable` of the
  full model (``None`` where masked) and writes results back in the masked structure;
  :func:`active_neurons` drops the neurons whose weight is masked and the bias of a neuron whose
  bias is masked (as if it were a constant of the model).
* **Non-finite values without a host round trip.** :class:`NonFiniteRecord` (in the state)
  records the first non-finite value a step met, in the graph; :func:`check_finite` reads it on
  the host and raises :class:`~lnb_fast.errors.NonFiniteError` naming it.
* :func:`refuse_multisteps`: ``optax.MultiSteps`` would hand these transformations the mean
  gradient of several micro-batches with the features of the last one only.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .errors import CompositionError, NonFiniteError, StructureError

# --- hyperparameters ---------------------------------------------------------------------------


def concrete(value) -> float | None:
    """``value`` as a Python float when it is known now (a number or a concrete scalar array),
    None when it is traced (or not a scalar number)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, jax.core.Tracer):
        if np.ndim(value) == 0:
            return float(np.asarray(value))
    return None


def check_rate(name: str, value, *, positive: bool = False, schedule_ok: bool = True) -> None:
    """A clear ``ValueError`` for a Python number ``value`` that is NaN, infinite or negative
    (or 0 with ``positive``). Arrays pass, concrete or traced: ``inject_hyperparams`` builds the
    transformation from arrays (a schedule's value at step 0, which may well be 0), and a
    schedule (callable) is checked step by step in the graph."""
    if schedule_ok and callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        need = "a finite positive number" if positive else "a finite number >= 0"
        raise ValueError(
            f"{name} must be {need}{' or a schedule' if schedule_ok else ''}, got {value!r}"
        )


def check_interval(name: str, value, low: float, high: float, high_open: bool = False) -> None:
    """``low <= value <= high`` (``< high`` with ``high_open``) for a Python number (arrays
    pass, as in :func:`check_rate`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return
    v = float(value)
    if not (low <= v and (v < high if high_open else v <= high)):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value!r}")


def static_int(name: str, value, minimum: int = 1) -> int:
    """A Python integer ``>= minimum`` out of ``value``; a traced value is a ``TypeError``: it
    sets how much is unrolled at trace time."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} fixes how many iterations are unrolled at trace time, so it cannot be a "
            f"traced hyperparameter; with optax.inject_hyperparams keep it static: "
            f"optax.inject_hyperparams(factory, static_args=({name!r},))"
        )
    v = concrete(value)
    if v is None or int(v) != v or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(v)


def every(name: str, value):
    """An integer period >= 1 (``refresh_every``, ``covariance_every``): a Python int when
    concrete, the traced value otherwise (it is only compared with the step count)."""
    v = concrete(value)
    if v is None:
        return value
    if int(v) != v or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(v)


def is_zero(value) -> bool:
    """True only for a Python number equal to 0: an array, even a concrete 0, may be changed
    later (``inject_hyperparams``), so it keeps the code path of a nonzero value."""
    return isinstance(value, (int, float)) and value == 0


def schedule_of(learning_rate, name: str = "learning_rate") -> tuple[Callable, str]:
    """``(count -> value, label)``: the schedule, or a constant; the label names it in errors."""
    if callable(learning_rate):
        label = getattr(learning_rate, "__qualname__", None) or repr(learning_rate)
        return learning_rate, f"{name} schedule {label}"
    return (lambda count: learning_rate), name


def rate_at(schedule: Callable, label: str, count, dtype):
    """``schedule(count)`` as a scalar of ``dtype``; a ``TypeError`` naming the schedule when it
    returns nothing usable (None, a string, a non-scalar)."""
    value = schedule(count)
    if value is None or isinstance(value, str) or np.ndim(value) != 0:
        raise TypeError(
            f"the {label} returned {value!r} at step count {count}; it must return a number "
            "(a scalar) for every step count"
        )
    return jnp.asarray(value, dtype)


def refuse_multisteps(name: str) -> None:
    """Raise :class:`CompositionError` when called (``init``/``update``) from
    ``optax.MultiSteps``: it averages the gradients of k micro-batches but hands the inner
    transformation only the last micro-batch's features, so the metric would be that of 1/k of
    the data (and the state of the k − 1 other calls is dropped)."""
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        for _ in range(12):
            if frame is None:
                return
            if frame.f_code.co_name in ("init", "update", "_do_update", "_skip_update"):
                owner = frame.f_locals.get("self")
                if isinstance(owner, optax.MultiSteps):
                    raise CompositionError(
                        f"lnb_fast.{name} cannot run under optax.MultiSteps: it accumulates the "
                        "gradients of several micro-batches but passes the features (the "
                        "activations the metric is built from) of the last micro-batch only, "
                        "so the step would use a metric of 1/k of the data. Use a larger batch "
                        "instead (LNB's step costs about the same per sample)"
                    )
            frame = frame.f_back
    finally:
        del frame


# --- masked trees ------------------------------------------------------------------------------


def absent(x) -> bool:
    """A leaf (or subtree) the transformation does not update: ``optax.MaskedNode`` or None."""
    return x is None or isinstance(x, optax.MaskedNode)


class Aligned:
    """A tree that may hold ``MaskedNode`` (or None) where the full parameter tree has leaves or
    subtrees, read in the order of ``table``'s leaves.

    Attributes:
        leaves: one entry per leaf of the full tree, None where absent.
    """

    def __init__(
        self,
        tree,
        table,
        what: str,
        shapes: bool = True,
        source: str = "the features were captured for",
    ):
        n = len(table.paths)
        index = jax.tree.unflatten(table.treedef, list(range(n)))
        self.tree, self._index = tree, index
        leaves: list = [None] * n

        def visit(x, ids):
            if absent(x):
                return
            if not isinstance(ids, int):
                raise ValueError(f"a leaf where the parameters have {jax.tree.structure(ids)}")
            leaves[ids] = x

        try:
            jax.tree.map(visit, tree, index, is_leaf=absent)
        except (ValueError, TypeError) as err:
            raise StructureError(
                f"the {what} tree does not match the parameters {source.rsplit(' ', 1)[0]} "
                f"({err}):\n  {what}: {jax.tree.structure(tree, is_leaf=absent)}\n"
                f"  parameters: {table.treedef}"
            ) from None
        if shapes:
            for leaf, path, shape in zip(leaves, table.paths, table.shapes, strict=True):
                if leaf is not None and tuple(jnp.shape(leaf)) != tuple(shape):
                    raise StructureError(
                        f"{what} {path}: shape {tuple(jnp.shape(leaf))}, but {source} shape "
                        f"{tuple(shape)}"
                    )
        self.leaves = leaves

    @property
    def present(self) -> list[bool]:
        return [leaf is not None for leaf in self.leaves]

    def rebuild(self, values: list):
        """A tree of the same (masked) structure with ``values[i]`` at full leaf ``i``."""
        return jax.tree.map(
            lambda x, ids: x if absent(x) else values[ids], self.tree, self._index, is_leaf=absent
        )


def active_neurons(table, present: list[bool]) -> list:
    """Per neuron of ``table``: None when its weight is absent (masked), the neuron without its
    bias when only the bias is absent (the bias is then a constant of the model), else the
    neuron."""
    out = []
    for neuron in table.neurons:
        if not present[neuron.weight]:
            out.append(None)
        elif neuron.bias is not None and not present[neuron.bias]:
            out.append(without_bias(neuron))
        else:
            out.append(neuron)
    return out


def without_bias(neuron):
    """``neuron`` as if its bias were not a parameter (cached on the neuron)."""
    cached = neuron.__dict__.get("_without_bias")
    if cached is None:
        cached = dataclasses.replace(
            neuron,
            bias=None,
            bias_path=None,
            bias_shape=None,
            b_chain=(),
            _rows=None,
            transfer="identity",
        )
        neuron.__dict__["_without_bias"] = cached
    return cached


class ActiveTable:
    """The subset of a table that a (masked) step updates: ``neurons`` (the active ones, as
    :func:`active_neurons` makes them) and ``index`` (their positions in the full table)."""

    def __init__(self, table, present: list[bool]):
        pairs = [(j, n) for j, n in enumerate(active_neurons(table, present)) if n is not None]
        self.index = [j for j, _ in pairs]
        self.neurons = [n for _, n in pairs]


# --- non-finite values -------------------------------------------------------------------------

#: What ``NonFiniteRecord.code[0]`` says was not finite.
NONE, GRADIENT, FEATURES, RATE, STEP = range(5)


@jax.tree_util.register_pytree_node_class
class NonFiniteRecord:
    """The first non-finite value the transformation met, recorded in the graph (no host
    round trip): ``code = [kind, leaf, step]`` (int32), ``kind`` one of ``0`` (none yet),
    ``1`` a gradient, ``2`` a neuron's input features (``leaf``: its weight), ``3`` the
    learning rate (NaN, Inf or negative), ``4`` LNB's step norm ``z`` (from finite inputs);
    ``step`` is the step count the step would have had (1-based). ``rate`` names the learning
    rate (its schedule) for the message: static data of the PyTree."""

    def __init__(self, code, rate: str = "learning_rate"):
        self.code = code
        self.rate = rate

    def tree_flatten(self):
        return (self.code,), self.rate

    @classmethod
    def tree_unflatten(cls, rate, children):
        return cls(children[0], rate)

    def __repr__(self) -> str:
        return f"NonFiniteRecord(code={self.code!r}, rate={self.rate!r})"

    @classmethod
    def empty(cls, rate: str = "learning_rate") -> NonFiniteRecord:
        return cls(jnp.zeros([3], jnp.int32), rate)


def nonfinite_option(nonfinite) -> str | None:
    if nonfinite not in ("skip", "raise", None):
        raise ValueError(f"nonfinite must be 'skip', 'raise' or None, got {nonfinite!r}")
    return nonfinite


def _all_finite(tree):
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class Guard:
    """Collects one flag per thing that must be finite and decides for a step.

    The *inputs* (gradients, features, the learning rate) are added first and
    :meth:`inputs_ok` gives their verdict before the step is computed, so that the state can be
    gated where it is produced (XLA fuses the select into the producer: no extra pass over the
    state; the covariance matrices are gated through their ``lax.cond``). Outputs (LNB's step
    norm ``z``) may be added after. :meth:`finish` then, with ``"skip"``: zero updates unless
    everything is finite; the state as it was unless the inputs are (a non-finite ``z`` from
    finite inputs zeroes the update but keeps the step's finite EMAs); ``skipped`` + 1 and the
    first offender recorded. ``"raise"``: :class:`NonFiniteError` at once (eager calls only).
    None: nothing is checked."""

    def __init__(self, mode: str | None, name: str, rate_label: str, table=None):
        self.mode, self.name, self.rate_label, self.table = mode, name, rate_label, table
        self.flags: list = []
        self.kinds: list[tuple[int, int]] = []
        self._ok_in = None
        self._checked = 0  # flags already raised on ("raise")

    def add(self, kind: int, leaf: int, value) -> None:
        if self.mode is None:
            return
        if kind == RATE:
            bad = ~(jnp.isfinite(value) & (value >= 0))
        else:
            bad = ~_all_finite(value)
        self.flags.append(bad)
        self.kinds.append((kind, leaf))

    def inputs_ok(self):
        """True where the inputs added so far are finite (a scalar), None without a check."""
        if self.mode is None or not self.flags:
            return None
        flags = jnp.stack(self.flags)
        if self.mode == "raise":
            self._raise(flags, self.table)
            return None
        self._ok_in = ~jnp.any(flags)
        return self._ok_in

    def _raise(self, flags, table) -> None:
        if isinstance(flags, jax.core.Tracer):
            raise ValueError(
                f"lnb_fast.{self.name}(nonfinite='raise') raises NonFiniteError only on eager "
                "(un-jitted) updates: from inside jit, vmap or scan it would need a host "
                "round trip every step. Use nonfinite='skip' (the default: the step is "
                "skipped in the graph and recorded) and call "
                "lnb_fast.check_finite(opt_state, params) on the host when you want the error"
            )
        bad = np.flatnonzero(np.asarray(flags))
        if bad.size:
            paths = getattr(table, "paths", None)
            names = [describe(*self.kinds[i], paths, self.rate_label, None) for i in bad]
            raise NonFiniteError(
                "NaN or Inf in " + "; ".join(names) + ". Refusing to take the step (the "
                "default nonfinite='skip' skips such steps instead)"
            )
        self._checked = len(flags)

    def finish(self, updates_tree, new_state, state, count, table, gated=()):
        """``(updates, new_state)`` after the check (class docstring); the state fields named in
        ``gated`` were gated by :meth:`inputs_ok` where they were computed."""
        if self.mode is None or not self.flags:
            return updates_tree, new_state
        flags = jnp.stack(self.flags)
        if self.mode == "raise":
            self._raise(flags, table)
            return updates_tree, new_state
        ok = ~jnp.any(flags)
        ok_in = ok if self._ok_in is None else self._ok_in
        first = jnp.argmax(flags)
        kinds = jnp.asarray(np.array([k for k, _ in self.kinds], np.int32))
        leaves = jnp.asarray(np.array([i for _, i in self.kinds], np.int32))
        code = jnp.stack([kinds[first], leaves[first], jnp.asarray(count, jnp.int32)])
        old = state.nonfinite.code
        record = jnp.where((old[0] == NONE) & ~ok, code, old)
        updates_tree = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates_tree)
        kept = {name: getattr(new_state, name) for name in gated}
        new_state = jax.tree.map(
            lambda n, o: jnp.where(ok_in, n, o),
            new_state._replace(**{name: None for name in gated}),
            state._replace(**{name: None for name in gated}),
        )
        return updates_tree, new_state._replace(
            **kept,
            skipped=state.skipped + (~ok).astype(jnp.int32),
            nonfinite=NonFiniteRecord(record, state.nonfinite.rate),
        )


def describe(kind: int, leaf: int, paths, rate: str, step) -> str:
    """What a record's ``(kind, leaf)`` names; ``paths`` the parameters' paths (or None)."""
    where = f" at step {step}" if step is not None else ""
    name = paths[leaf] if paths is not None and 0 <= leaf < len(paths) else f"#{leaf}"
    if kind == GRADIENT:
        return f"the gradient of parameter {name}{where}"
    if kind == FEATURES:
        return f"the input features of the neuron of {name}{where}"
    if kind == RATE:
        return f"the {rate}{where} (NaN, Inf or negative)"
    if kind == STEP:
        return f"the step's norm z{where} (from finite inputs: the solve overflowed)"
    return f"an unknown kind {kind}{where}"


def _records(opt_state) -> list:
    def ours(x):
        return isinstance(x, tuple) and hasattr(x, "_fields") and "nonfinite" in x._fields

    found = []
    for node in jax.tree.leaves(opt_state, is_leaf=ours):
        if ours(node) and isinstance(node.nonfinite, NonFiniteRecord):
            found.append(node.nonfinite)
    return found


def check_finite(opt_state: Any, params: Any = None) -> None:
    """Raise :class:`~lnb_fast.errors.NonFiniteError` if a step of an lnb_fast transformation
    anywhere in ``opt_state`` (an optax chain, masked, injected, vmapped state...) met a NaN or
    an Inf; otherwise return None.

    The transformations record the first non-finite value in their state, in the graph (with
    the default ``nonfinite="skip"`` the step is skipped): reading it here is the one host
    round trip, made when you call this (say every 100 steps, or at the end of an epoch).
    ``params`` (the full parameter tree) lets the message name the parameter's path."""
    paths = None
    if params is not None:
        flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=absent)
        paths = [jax.tree_util.keystr(p) for p, _ in flat]
    messages = []
    for record in _records(opt_state):
        code = np.asarray(jax.device_get(record.code)).reshape(-1, 3)
        for kind, leaf, step in code:
            if kind != NONE:
                messages.append(describe(int(kind), int(leaf), paths, record.rate, int(step)))
    if messages:
        unique = list(dict.fromkeys(messages))
        raise NonFiniteError(
            "NaN or Inf in "
            + "; ".join(unique)
            + " (the first non-finite value each transformation met; those steps were skipped)"
        )
