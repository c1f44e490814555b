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
from .errors import StructureError
from .transform import _check_structure, _nonfinite_flags, _raise_if_nonfinite


class FOOFState(NamedTuple):
    """``count`` (steps taken), ``covariance`` (per neuron ``(A, A_inv)`` or None, each
    ``(G, D, D)``) and ``skipped`` (steps skipped for non-finite values)."""

    count: jax.Array
    covariance: tuple
    skipped: jax.Array


def foof(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    damping: float = 1e-3,
    *,
    b2: float = 0.95,
    refresh_every: int = 10,
    covariance_every: int = 1,
    neurons: NeuronTable | None = None,
    nonfinite: str = "raise",
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
        nonfinite: ``"raise"`` or ``"skip"``, as :func:`lnb_fast.lnb`.
    """
    if not isinstance(neurons, NeuronTable):
        raise ValueError(
            "lnb_fast.foof keeps a (G, D, D) matrix per neuron in its state and needs the neurons "
            "up front: pass neurons=lnb_fast.value_and_grad(loss).table(params, batch)"
        )
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"b2 must lie in [0, 1), got {b2}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    for name, value in (("refresh_every", refresh_every), ("covariance_every", covariance_every)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value}")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def design_layouts(table):
        """Each neuron's GramLayout, None without a design (−lr·g)."""
        return [None if isinstance(ly, str) else ly for ly in map(gram_layout, table.neurons)]

    layouts = design_layouts(neurons)

    def init(params) -> FOOFState:
        dtype = jnp.result_type(*jax.tree.leaves(params))
        cov = tuple(
            None
            if ly is None
            else tuple(jnp.zeros((ly.groups, ly.aug, ly.aug), dtype) for _ in "AB")
            for ly in layouts
        )
        return FOOFState(jnp.zeros([], jnp.int32), cov, jnp.zeros([], jnp.int32))

    def update(grads, state: FOOFState, params=None, *, features: Features | None = None, **_):
        if not isinstance(features, Features):
            raise TypeError(
                "lnb_fast.foof needs the neurons' input features: opt.update(grads, state, "
                "params, features=features) with lnb_fast.value_and_grad's features"
            )
        table = features.table
        if [n.weight_path for n in table.neurons] != [n.weight_path for n in neurons.neurons]:
            raise StructureError(
                "the features' neurons are not those foof(neurons=...) was built for"
            )
        g_leaves, treedef = jax.tree.flatten(grads)
        _check_structure(table, treedef, g_leaves, "gradients")
        bad = _nonfinite_flags(g_leaves, features)
        if nonfinite == "raise":
            _raise_if_nonfinite(table, bad)

        t = state.count + 1
        dtype = jnp.result_type(*g_leaves) if g_leaves else jnp.float32
        directions = list(g_leaves)
        cov = list(state.covariance)
        # This trace's layouts (they know its batch's n_i; `neurons` may be another batch size).
        step_layouts = design_layouts(table)
        for j, (neuron, X, layout) in enumerate(
            zip(table.neurons, features.values, step_layouts, strict=True)
        ):
            if layout is None:
                continue
            cov[j], d = covariance_direction(
                layout,
                neuron,
                X,
                state.covariance[j],
                state.count,
                b2,
                damping,
                refresh_every,
                covariance_every,
                neuron.params_of(g_leaves),
            )
            neuron.put_params(directions, d)
        lr = jnp.asarray(schedule(state.count), dtype)
        updates = [(-lr * d).astype(g.dtype) for d, g in zip(directions, g_leaves, strict=True)]
        updates = jax.tree.unflatten(treedef, updates)
        new_state = FOOFState(t, tuple(cov), state.skipped)
        if nonfinite == "skip":
            ok = ~jnp.any(bad)
            updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
            new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
            new_state = new_state._replace(skipped=state.skipped + (~ok).astype(jnp.int32))
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)
