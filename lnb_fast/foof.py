"""``foof``: FOOF (Benzing 2022) as an optax transformation, on the covariance machinery of LNB.

Per neuron ``i`` with a design (dense and convolutional neurons, :mod:`lnb_fast.covariance`) and
group ``g``::

    A_g ← β₂ A_g + (1 − β₂) C_g(X_i)        C_g = Φ_gᵀΦ_g/n_i, augmented [x; 1] (Eq. 12) with a bias
    every ``refresh_every`` steps (the first included):  A_inv = (A/c₂ + λ I_nonbias)⁻¹  (Cholesky)
    updates = −lr · g A_inv                  row by row; c₂ = 1 − β₂ᵗ (bias correction)

Every other parameter (identity-metric leaves, scale and tagged neurons) gets ``−lr · g``. There
is no gradient EMA and no normalisation: chain ``optax.trace`` *before* it for momentum.

FOOF is LNB's covariance option without LNB's step rule: on neurons without bias, with ``b2 = 0``
and ``refresh_every = 1``, its direction is Algorithm 1's ``M_i⁻¹ g_i`` with ridge = damping.
Reference: F. Benzing, *Gradient descent on neurons and its link to approximate second-order
optimization*, ICML 2022; the NumPy oracle is :class:`lnb_ref.covariance.FOOF`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .capture import Features
from .covariance import covariance_direction, gram_layout
from .discovery import NeuronTable
from .plumbing import (
    FEATURES,
    GRADIENT,
    RATE,
    Aligned,
    Guard,
    NonFiniteRecord,
    active_neurons,
    check_interval,
    check_rate,
    every,
    nonfinite_option,
    rate_at,
    refuse_multisteps,
    schedule_of,
)
from .spmd import (
    axis_tuple,
    check_axes,
    check_flag,
    check_sync,
    covariance_reducers,
    covariance_state,
    shared,
    split_plan,
    unwrapped,
)
from .transform import _wide, same_model


class FOOFState(NamedTuple):
    """``count`` (steps taken), ``covariance`` (per neuron ``(A, A_inv)`` or None, each
    ``(G, D, D)``, float32 at least), ``skipped`` (steps skipped for non-finite values) and
    ``nonfinite`` (the first one, for :func:`lnb_fast.check_finite`)."""

    count: jax.Array
    covariance: tuple
    skipped: jax.Array
    nonfinite: NonFiniteRecord = None


def foof(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    damping: float = 1e-3,
    *,
    b2: float = 0.95,
    refresh_every: int = 10,
    covariance_every: int = 1,
    neurons: NeuronTable | None = None,
    nonfinite: str | None = "skip",
    axis_name: str | tuple[str, ...] | None = None,
    covariance_sync: str = "step",
    split_refresh: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """FOOF (module docstring). ``update(grads, state, params, features=features)``.

    Args:
        learning_rate: a number or an optax schedule.
        damping: ``λ``, added to the non-bias diagonal of ``A/c₂`` before inverting.
        b2: EMA rate of ``A``.
        refresh_every: steps between refreshes of the stored inverse.
        covariance_every: steps between updates of the EMA of ``A`` (1: every step).
        neurons: the loss's :class:`~lnb_fast.NeuronTable`
            (``lnb_fast.value_and_grad(loss).table(params, batch)``); required, since the state
            holds a ``(G, D, D)`` matrix per neuron.
        nonfinite: ``"skip"`` (default), ``"raise"`` or None, as :func:`lnb_fast.lnb`.
        axis_name: the mesh axis (or axes) the batch is split over inside ``shard_map``/``pmap``:
            the gradients and the second moments are averaged over it, as :func:`lnb_fast.lnb`.
        covariance_sync: ``"step"`` or ``"refresh"``, as :func:`lnb_fast.lnb`'s.
        split_refresh: the refresh's inversions shared out among the replicas (each on one
            replica, or a large one's columns on all), as :func:`lnb_fast.lnb`'s.

    Composes with optax's wrappers as :func:`lnb_fast.lnb` does (masked parameters keep their
    values; their neurons hold no matrix).
    """
    if not isinstance(neurons, NeuronTable):
        raise ValueError(
            "lnb_fast.foof keeps a (G, D, D) matrix per neuron in its state and needs the neurons "
            "up front: pass neurons=lnb_fast.value_and_grad(loss).table(params, batch)"
        )
    check_interval("b2", b2, 0.0, 1.0, high_open=True)
    check_rate("learning_rate", learning_rate)
    check_rate("damping", damping, schedule_ok=False)
    refresh_every = every("refresh_every", refresh_every)
    covariance_every = every("covariance_every", covariance_every)
    nonfinite = nonfinite_option(nonfinite)
    axis_tuple(axis_name)
    check_sync(covariance_sync)
    check_flag(split_refresh, "split_refresh")
    schedule, rate_label = schedule_of(learning_rate)

    def design_layouts(active):
        """Each updated neuron's GramLayout, None without a design (−lr·g) or when masked."""
        return [None if n is None or isinstance(ly := gram_layout(n), str) else ly for n in active]

    def init(params) -> FOOFState:
        refuse_multisteps("foof")
        aligned = Aligned(params, neurons, "parameters", source="the neurons= table has")
        dtype = _wide(jnp.result_type(*[x for x in aligned.leaves if x is not None]))
        layouts = design_layouts(active_neurons(neurons, aligned.present))
        cov = tuple(
            None
            if ly is None
            else covariance_state(
                tuple(jnp.zeros((ly.groups, ly.aug, ly.aug), dtype) for _ in "AB"),
                covariance_sync,
                axis_name,
            )
            for ly in layouts
        )
        return FOOFState(
            jnp.zeros([], jnp.int32),
            cov,
            jnp.zeros([], jnp.int32),
            NonFiniteRecord.empty(rate_label),
        )

    def update(grads, state: FOOFState, params=None, *, features: Features | None = None, **_):
        refuse_multisteps("foof")
        if not isinstance(features, Features):
            raise TypeError(
                "lnb_fast.foof needs the neurons' input features: opt.update(grads, state, "
                "params, features=features) with lnb_fast.value_and_grad's features"
            )
        table = features.table
        same_model(neurons, table, "foof(neurons=...)")
        g = Aligned(grads, table, "gradients")
        g_leaves = g.leaves
        present = [i for i, x in enumerate(g_leaves) if x is not None]
        reduce = check_axes("foof", axis_name, ([g_leaves[i] for i in present], features.values))
        guard = Guard(nonfinite, "foof", rate_label, table)
        for i in present:
            guard.add(GRADIENT, i, g_leaves[i])
        # This trace's layouts (they know its batch's n_i; `neurons` may be another batch size).
        active = active_neurons(table, g.present)
        step_layouts = design_layouts(active)
        for neuron, X, layout in zip(active, features.values, step_layouts, strict=True):
            if layout is not None:
                guard.add(FEATURES, neuron.weight, X)
        if reduce:  # the mean gradient, and one replica's NaN skips the step on all
            g_leaves = shared(reduce, guard, g_leaves)
        t = state.count + 1
        dtype = jnp.result_type(*[g_leaves[i] for i in present]) if present else jnp.float32
        lr = rate_at(schedule, rate_label, state.count, _wide(dtype))
        guard.add(RATE, -1, lr)
        ok = guard.inputs_ok()  # gates the covariance matrices where they are computed
        splits = split_plan(
            reduce, {j: ly for j, ly in enumerate(step_layouts) if ly is not None}, split_refresh
        )

        directions = list(g_leaves)
        cov = list(state.covariance)
        for j, (neuron, X, layout) in enumerate(
            zip(active, features.values, step_layouts, strict=True)
        ):
            if layout is None:
                continue
            pair, marked = unwrapped(state.covariance[j])
            cov[j], d = covariance_direction(
                layout,
                neuron,
                X,
                pair,
                state.count,
                b2,
                damping,
                refresh_every,
                covariance_every,
                neuron.params_of(g_leaves),
                ok=ok,
                **covariance_reducers(reduce, covariance_sync),
                **splits.get(j, {}),
            )
            cov[j] = marked(cov[j])
            neuron.put_params(directions, d)
        updates = [None] * len(g_leaves)
        for i in present:
            updates[i] = (-lr * directions[i]).astype(g_leaves[i].dtype)
        new_state = FOOFState(t, tuple(cov), state.skipped, state.nonfinite)
        new_state = jax.tree.map(lambda n, o: jnp.asarray(n, o.dtype), new_state, state)
        return guard.finish(g.rebuild(updates), new_state, state, t, table, gated=["covariance"])

    return optax.GradientTransformationExtraArgs(init, update)
