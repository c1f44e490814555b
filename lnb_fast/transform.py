"""``lnb``: Algorithm 2 of the paper (online Linear Neuron Boosting) as an optax transformation.

Per step, with ``ĝ`` the bias-corrected EMA of the gradients and, for each neuron ``i`` found by
:func:`lnb_fast.value_and_grad` (identity-metric parameters skip the solver, ``θ̂ = ĝ``)::

    μ_i ← ema(μ_i, mean(Φ_i)),  χ_i ← ema(χ_i, mean(Φ_i ⊙ Φ_i))     β₂, bias-corrected (l. 6–7)
    P_i ← diag(χ_i + γ)⁻¹ (no bias)  or  W̃ W̃ᵀ (bias, §3.5)                          (l. 8)
    θ̂_i ← pcg(M_i of *this* minibatch + γ, ĝ_i, P_i, x0 = previous θ̂_i, k iterations)  (l. 9–10)

then, over the whole network (lines 12–14)::

    z = max(z0, Σ_i θ̂_iᵀ (M_i + γ) θ̂_i)
    updates = −√ε·ρ·θ − √(ε/z)·θ̂          so that  θ + updates = (1 − √ε·ρ) θ − √(ε/z) θ̂

**Step norm.** The paper's line 13 is ``z = Σ θ̂·ĝ``, which is the step's squared length in
function space only when θ̂ solves ``(M + γ)θ̂ = ĝ``; a warm-started 2-iteration PCG does not,
and steps up to 2.7e4·ε long were measured. The default ``step_norm="metric"`` measures it:
``θ̂ᵀ(M + γ)θ̂ = θ̂ · (ĝ − r)`` with PCG's residual ``r`` (no extra product), so every step has
squared length exactly ε in the metric the solve used (the stale EMA metric for
``"covariance"``, whose exact solve makes it ``θ̂ · ĝ``). ``step_norm="paper"`` keeps line 13.

**Descent.** A warm-started θ̂ with ``θ̂ · ĝ ≤ min_descent · θ̂ᵀ(M + γ)θ̂`` is replaced by PCG
from 0 (a ``lax.cond``: paid only on such steps), whose Galerkin iterates have
``θ̂ · ĝ = θ̂ᵀ(M + γ)θ̂ > 0``.

**Ridge.** ``relative_ridge=True`` (default) adds ``γ·Var(x_j)`` per input feature (from the EMA
moments; for ``"covariance"`` from its own metric), which keeps the invariance to per-feature
affine maps of the inputs exactly; ``False`` adds the paper's absolute ``γ``
(:func:`lnb_ref.metric.relative_ridge` has the derivation).

How ``θ̂_i`` is computed is the neuron's *strategy* (:mod:`lnb_fast.strategy`): PCG with
matrix-free products (the paper's), the same PCG with products on the design Gram ``C_i``
(``"gram"``; same iterates to rounding, cheaper when ``d`` is small next to ``n_i``), or an exact
solve against a stale EMA of ``C_i`` (``"covariance"``, opt-in: a different algorithm).

Reference: Munoz, *Simple Linear Neuron Boosting* (2025), Algorithm 2 and §3.4–3.5; the NumPy
oracles are :class:`lnb_ref.lnb.OnlineLNB` (matrix-free, gram), which the test suite matches to
1e-9, and :class:`lnb_ref.covariance.CovarianceLNB` (covariance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .capture import Features
from .covariance import covariance_direction, gram, gram_layout, gram_matvec
from .covariance import relative_ridge as relative_ridge_of
from .discovery import NeuronTable
from .errors import NonFiniteError, StructureError
from .pcg import metric_norm, pcg, tree_vdot
from .strategy import check_strategy, plan

STEP_NORMS = ("metric", "paper")
"""``step_norm`` options, as :data:`lnb_ref.lnb.STEP_NORMS`."""


class LNBState(NamedTuple):
    """The state of :func:`lnb`; ``grad_ema``, ``mean``, ``second_moment`` and ``direction`` are
    shaped like the params.

    Attributes:
        count: steps taken (``t``; the schedule reads ε at ``count``).
        grad_ema: EMA of the gradients (β₁); ``None`` when ``b1 = 0`` (no EMA: ``ĝ = g``, and
            one parameter-sized tree less in memory).
        mean, second_moment: EMAs (β₂) of each neuron's design-column moments ``μ`` and ``χ``,
            stored broadcast over the weight's output rows (zeros for other leaves).
        direction: the previous θ̂ (PCG's warm start).
        skipped: steps skipped for non-finite values (``nonfinite="skip"``).
        covariance: one entry per neuron of ``neurons=``: ``None``, or for a neuron with the
            ``"covariance"`` strategy ``(A, A_inv)``, the EMA of its augmented second moment
            (Eq. 12) and the damped inverse last refreshed, each ``(G, D, D)``.
        restarts: how many times, over all steps and neurons, a warm-started PCG direction
            failed the descent test and was recomputed from 0 (``min_descent``).
    """

    count: jax.Array
    grad_ema: Any
    mean: Any
    second_moment: Any
    direction: Any
    skipped: jax.Array
    covariance: tuple = ()
    restarts: jax.Array = None


def lnb(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    weight_decay: float = 0.0,
    *,
    ridge: float = 1e-3,
    z0: float = 0.0,
    b1: float = 0.0,
    b2: float = 0.99,
    cg_iterations: int = 2,
    precondition: bool = True,
    warm_start: bool = True,
    nonfinite: str = "raise",
    strategy: str | dict = "auto",
    refresh_every: int = 10,
    covariance_every: int = 1,
    neurons: NeuronTable | None = None,
    relative_ridge: bool = True,
    step_norm: str = "metric",
    min_descent: float = 0.5,
) -> optax.GradientTransformationExtraArgs:
    """Online Linear Neuron Boosting (Algorithm 2) as an optax transformation.

    Use with :func:`lnb_fast.value_and_grad`, which returns the features ``update`` needs::

        opt = lnb_fast.lnb(learning_rate=0.01)
        state = opt.init(params)
        loss, grads, features = value_grad_features(params, batch)
        updates, state = opt.update(grads, state, params, features=features)
        params = optax.apply_updates(params, updates)

    Args:
        learning_rate: ``ε``, the squared length of the step *in function space* (Eq. 1–2): a
            number or an optax schedule ``count ↦ ε``.
        weight_decay: ``ρ``; parameters shrink by ``1 − √ε·ρ`` per step, biases included.
        ridge: ``γ``, added to the non-bias diagonal of every ``M_i`` and to ``P_i`` (§3.4):
            ``γ·Var(x_j)`` per input feature with ``relative_ridge`` (the default), else ``γ``.
            Default 1e-3 (``lnb_ref`` uses 0): with γ = 0 a neuron whose inputs do not span its
            weights (a convolution with few output pixels) has a singular metric.
        z0: lower bound of the norm ``z`` (Alg. 2, line 13).
        b1: EMA rate of the gradient; default 0, i.e. no EMA (``lnb_ref`` uses 0.9): every
            sweep we ran (matrix factorization, digits MLP and CNN) converged faster with 0.
        b2: EMA rate of the feature moments.
        cg_iterations: PCG iterations per step (the paper: 2).
        precondition: use the §3.5 preconditioners (False: plain CG).
        warm_start: start PCG from the previous θ̂ (False: from 0).
        nonfinite: ``"raise"`` (a NaN/Inf in a gradient or a neuron's features raises
            :class:`~lnb_fast.errors.NonFiniteError` naming the parameter) or ``"skip"`` (the
            step is skipped: zero updates, state unchanged but ``skipped`` incremented).
        strategy: how each neuron's θ̂ is computed (:mod:`lnb_fast.strategy`): ``"auto"``
            (the cheaper of the next two by the cost model), ``"matrix-free"`` (PCG with a
            forward and a VJP per product), ``"gram"`` (the same PCG on the minibatch's design
            Gram), ``"covariance"`` (exact solve against an EMA of the second moment, inverse
            refreshed every ``refresh_every`` steps; needs ``neurons``), or a dict mapping a
            weight's path (as :func:`lnb_fast.describe` prints it) to one of these (others:
            ``"auto"``). Neurons without a design (scale, tagged) are always matrix-free;
            forcing gram/covariance on one raises a ``ValueError`` naming it.
        refresh_every: steps between refreshes of the covariance strategy's inverse (the first
            step refreshes).
        covariance_every: steps between updates of the covariance strategy's EMA (the first
            step updates; the bias correction counts updates). 1 (default) updates every step;
            larger values skip forming the Gram (``2·n·D²``) on the other steps.
        neurons: the :class:`~lnb_fast.NeuronTable` of the loss
            (``lnb_fast.value_and_grad(loss).table(params, batch)``), so that ``init`` can
            allocate the per-neuron ``(G, D, D)`` matrices of the covariance strategy.
        relative_ridge: ``γ`` relative to each input feature's variance (default: keeps the
            invariance to per-feature affine maps of the inputs; module docstring) or absolute.
        step_norm: ``"metric"`` (default): ``z = Σ θ̂ᵀ(M + γ)θ̂``, the step's measured squared
            length, so every step is ε long; ``"paper"``: ``z = Σ θ̂ · ĝ`` (Alg. 2, line 13),
            equal only when PCG has converged.
        min_descent: a warm-started θ̂ with ``θ̂ · ĝ ≤ min_descent · θ̂ᵀ(M + γ)θ̂`` is recomputed
            by PCG from 0 (which descends: ``θ̂ · ĝ = θ̂ᵀ(M + γ)θ̂``); 0 restarts only directions
            that point uphill. ``LNBState.restarts`` counts them.
    """
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"EMA rates must lie in [0, 1); got b1={b1}, b2={b2}")
    if int(cg_iterations) != cg_iterations or cg_iterations < 1:
        raise ValueError(f"cg_iterations must be an integer >= 1, got {cg_iterations}")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    for name, value in (("weight_decay", weight_decay), ("ridge", ridge), ("z0", z0)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if step_norm not in STEP_NORMS:
        raise ValueError(f"step_norm must be one of {STEP_NORMS}, got {step_norm!r}")
    if not 0.0 <= min_descent <= 1.0:
        raise ValueError(f"min_descent must lie in [0, 1], got {min_descent!r}")
    if int(refresh_every) != refresh_every or refresh_every < 1:
        raise ValueError(f"refresh_every must be an integer >= 1, got {refresh_every}")
    check_strategy(strategy)
    if neurons is not None and not isinstance(neurons, NeuronTable):
        raise TypeError(
            "neurons must be a lnb_fast.NeuronTable (lnb_fast.value_and_grad(loss).table(params, "
            f"batch)), got {type(neurons).__name__}"
        )
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
    if int(covariance_every) != covariance_every or covariance_every < 1:
        raise ValueError(f"covariance_every must be an integer >= 1, got {covariance_every}")
    options = {
        "cg_iterations": cg_iterations,
        "refresh_every": refresh_every,
        "covariance_every": covariance_every,
    }
    wants_covariance = "covariance" in (
        strategy.values() if isinstance(strategy, dict) else [strategy]
    )
    if wants_covariance and neurons is None:
        raise ValueError(
            "strategy 'covariance' keeps a (G, D, D) matrix per neuron in the state, so "
            "lnb_fast.lnb needs the neurons up front: pass "
            "neurons=lnb_fast.value_and_grad(loss).table(params, batch)"
        )
    choices = plan(neurons, strategy, **options) if neurons is not None else None
    # With the neurons known up front the moments μ, χ are stored compactly, one (G, d) row per
    # group instead of broadcast over the weight's rows (they are equal across rows), and a
    # covariance neuron, which needs none, stores empty ones: see _compact_layouts.
    compact = _compact_layouts(neurons, choices) if neurons is not None else {}

    def init(params) -> LNBState:
        # A fresh buffer per field, so that a step may donate the state (no buffer twice).
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        covariance = ()
        if choices is not None:
            dtype = jnp.result_type(*jax.tree.leaves(params))
            covariance = tuple(
                tuple(jnp.zeros((c.layout.groups, c.layout.aug, c.layout.aug), dtype) for _ in "AB")
                if c.name == "covariance"
                else None
                for c in choices
            )
        moments = [zeros(), zeros()]
        if neurons is not None:
            flat = [jax.tree.leaves(m) for m in moments]
            treedef = jax.tree.structure(params)
            for j, neuron in enumerate(neurons.neurons):
                shape = None
                if choices[j].name == "covariance":
                    shape = (0,)
                elif j in compact:
                    shape = (compact[j].groups, compact[j].cols)
                if shape is not None:
                    for leaves in flat:
                        leaves[neuron.weight] = jnp.zeros(shape, leaves[neuron.weight].dtype)
            moments = [jax.tree.unflatten(treedef, leaves) for leaves in flat]
        return LNBState(
            count=jnp.zeros([], jnp.int32),
            grad_ema=zeros() if b1 else None,
            mean=moments[0],
            second_moment=moments[1],
            direction=zeros(),
            skipped=jnp.zeros([], jnp.int32),
            covariance=covariance,
            restarts=jnp.zeros([], jnp.int32),
        )

    def update(grads, state: LNBState, params=None, *, features: Features | None = None, **_):
        if not isinstance(features, Features):
            raise TypeError(
                "lnb_fast.lnb needs the neurons' input features: call "
                "opt.update(grads, state, params, features=features) with the features returned "
                f"by lnb_fast.value_and_grad(loss_fn)(params, batch); got {type(features).__name__}"
            )
        table = features.table
        if neurons is not None and [n.weight_path for n in neurons.neurons] != [
            n.weight_path for n in table.neurons
        ]:
            raise StructureError(
                "the features' neurons are not those lnb_fast.lnb(neurons=...) was built for: "
                f"{[n.weight_path for n in table.neurons]} vs "
                f"{[n.weight_path for n in neurons.neurons]}"
            )
        # Planned on this trace's table: its layouts know this batch's n_i (the table given as
        # neurons= may have been traced for another batch size; covariance is never auto-chosen,
        # so which neurons are covariance, hence the state's layout, does not change).
        step_choices = plan(table, strategy, **options)
        g_leaves, treedef = jax.tree.flatten(grads)
        _check_structure(table, treedef, g_leaves, "gradients")
        p_leaves = None
        if params is not None:
            p_leaves = jax.tree.leaves(params)
            _check_structure(table, treedef, p_leaves, "parameters")
        elif weight_decay:
            raise ValueError("weight_decay needs the parameters: opt.update(grads, state, params)")

        bad = _nonfinite_flags(g_leaves, features)
        if nonfinite == "raise":
            _raise_if_nonfinite(table, bad)

        mu_leaves = jax.tree.leaves(state.mean)
        chi_leaves, d_leaves = (
            jax.tree.leaves(state.second_moment),
            jax.tree.leaves(state.direction),
        )

        t = state.count + 1
        dtype = jnp.result_type(*g_leaves) if g_leaves else jnp.float32
        c1 = 1 - jnp.asarray(b1, dtype) ** t
        c2 = 1 - jnp.asarray(b2, dtype) ** t
        if b1:
            m_leaves = jax.tree.leaves(state.grad_ema)
            m_new = [b1 * m + (1 - b1) * g for m, g in zip(m_leaves, g_leaves, strict=True)]
            g_hat = [m / c1 for m in m_new]
        else:
            m_new, g_hat = None, list(g_leaves)

        directions = list(g_hat)  # identity metric unless a neuron says otherwise
        mu_new, chi_new = list(mu_leaves), list(chi_leaves)
        covariance = list(state.covariance)
        # Per neuron: θ̂·ĝ and θ̂ᵀ(M + γ)θ̂ (identity-metric leaves: ĝ·ĝ both, added below).
        dots, norms, restarts = [], [], jnp.zeros([], jnp.int32)
        in_neuron = set()
        for j, (neuron, X) in enumerate(zip(table.neurons, features.values, strict=True)):
            choice = step_choices[j]
            g_j = neuron.params_of(g_hat)
            in_neuron.update(i for i in (neuron.weight, neuron.bias) if i is not None)
            if choice.name == "covariance":
                # §3.5's second option: exact solve against the stale EMA metric, so the step's
                # norm in that metric is θ̂ · ĝ (to rounding).
                covariance[j], d = covariance_direction(
                    choice.layout,
                    neuron,
                    X,
                    state.covariance[j],
                    state.count,
                    b2,
                    ridge,
                    refresh_every,
                    covariance_every,
                    g_j,
                    relative_ridge,
                )
                neuron.put_params(directions, d)
                dots.append(tree_vdot(d, g_j))
                norms.append(dots[-1])
                continue
            mean, second = neuron.moments(X)
            i = neuron.weight
            layout = compact.get(j)
            if layout is not None:  # compact: one row per group, (G, d)
                mean, second = (layout.to_rows(m)[:, 0, :] for m in (mean, second))
            mu_new[i] = b2 * mu_leaves[i] + (1 - b2) * mean
            chi_new[i] = b2 * chi_leaves[i] + (1 - b2) * second
            mu_hat, chi_hat = mu_new[i] / c2, chi_new[i] / c2
            if layout is not None:  # broadcast over the rows again, for this step only
                mu_hat, chi_hat = (_broadcast_rows(layout, m) for m in (mu_hat, chi_hat))
            gamma = ridge
            if relative_ridge:  # per weight entry: γ·Var of its input feature
                gamma = relative_ridge_of(mu_hat, chi_hat, ridge, neuron.bias is not None)
            P = neuron.preconditioner(mu_hat, chi_hat, gamma) if precondition else None
            x0 = neuron.params_of(d_leaves) if warm_start else None
            if choice.name == "gram":  # the same PCG, products on the minibatch's Gram
                C, mu_g = gram(choice.layout, X, neuron.n_samples)
                gamma_rows = gamma if jnp.ndim(gamma) == 0 else choice.layout.to_rows(gamma)
                matvec = lambda v, ly=choice.layout, C=C, mu=mu_g, r=gamma_rows: gram_matvec(  # noqa: E731
                    ly, C, mu, v, r
                )
            else:
                matvec = lambda v, neuron=neuron, X=X, r=gamma: neuron.metric_matvec(X, v, r)  # noqa: E731
            solve = lambda start, matvec=matvec, g=g_j, P=P: pcg(  # noqa: E731
                matvec, g, cg_iterations, precondition=P, x0=start
            )
            result = solve(x0)
            x, dot, norm = result.x, tree_vdot(result.x, g_j), metric_norm(result, g_j)
            if warm_start:  # descent: PCG from 0 when the warm start's θ̂ barely descends
                again = ~(dot > min_descent * norm)

                def cold(solve=solve, g=g_j):
                    r = solve(None)
                    return r.x, tree_vdot(r.x, g), metric_norm(r, g)

                x, dot, norm = jax.lax.cond(again, cold, lambda x=x, d=dot, n=norm: (x, d, n))
                restarts = restarts + again.astype(jnp.int32)
            neuron.put_params(directions, x)
            dots.append(dot)
            norms.append(norm)

        identity = [i for i in range(len(directions)) if i not in in_neuron]
        rest = sum((jnp.vdot(g_hat[i], g_hat[i]) for i in identity), jnp.zeros([], dtype))
        raw_z = sum(norms if step_norm == "metric" else dots, rest)
        z = jnp.maximum(z0, raw_z)
        eps = jnp.asarray(schedule(state.count), dtype)
        scale = jnp.where(z > 0, jnp.sqrt(eps / jnp.where(z > 0, z, 1)), 0)
        decay = jnp.sqrt(eps) * weight_decay
        updates = []
        for i, d in enumerate(directions):
            u = -scale * d
            if weight_decay:
                u = u - decay * p_leaves[i]
            updates.append(u.astype(g_leaves[i].dtype))

        unflat = lambda leaves: jax.tree.unflatten(treedef, leaves)  # noqa: E731
        new_state = LNBState(
            count=t,
            grad_ema=None if m_new is None else unflat(m_new),
            mean=unflat(mu_new),
            second_moment=unflat(chi_new),
            direction=unflat(directions),
            skipped=state.skipped,
            covariance=tuple(covariance),
            restarts=state.restarts + restarts,
        )
        updates = unflat(updates)
        if nonfinite == "skip":
            ok = ~jnp.any(bad)
            keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
            updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
            new_state = jax.tree.map(keep, new_state, state)
            new_state = new_state._replace(skipped=state.skipped + (~ok).astype(jnp.int32))
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _compact_layouts(neurons: NeuronTable, choices) -> dict:
    """neuron index -> :class:`~lnb_fast.covariance.GramLayout` for every non-covariance neuron
    whose weight maps onto design rows: its moments are stored as ``(G, d)``."""
    out = {}
    for j, (neuron, choice) in enumerate(zip(neurons.neurons, choices, strict=True)):
        layout = gram_layout(neuron)
        if choice.name != "covariance" and not isinstance(layout, str):
            out[j] = layout
    return out


def _broadcast_rows(layout, m):
    """``(G, d)`` -> weight-shaped, every output row a copy of its group's row."""
    G, d = m.shape
    return layout.from_rows(jnp.broadcast_to(m[:, None, :], (G, layout.rows, d)))


def _check_structure(table, treedef, leaves, what: str) -> None:
    if treedef != table.treedef:
        raise StructureError(
            f"the {what} tree does not match the parameters the features were captured for:\n"
            f"  {what}: {treedef}\n  features: {table.treedef}"
        )
    for leaf, path, shape in zip(leaves, table.paths, table.shapes, strict=True):
        if tuple(jnp.shape(leaf)) != tuple(shape):
            raise StructureError(
                f"{what} {path}: shape {tuple(jnp.shape(leaf))}, but the features were captured "
                f"for shape {tuple(shape)}"
            )


def _nonfinite_flags(g_leaves, features: Features):
    """One flag per gradient leaf, then one per neuron's features: does it hold a NaN/Inf?
    (The order :func:`_raise_if_nonfinite` names them in.)"""
    flags = [~jnp.all(jnp.isfinite(g)) for g in g_leaves]
    flags += [
        jnp.any(jnp.stack([~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(v)]))
        for v in features.values
    ]
    return jnp.stack(flags) if flags else jnp.zeros([0], bool)


def _describe_flag(table, index: int) -> str:
    n = len(table.paths)
    if index < n:
        return f"the gradient of parameter {table.paths[index]}"
    neuron = table.neurons[index - n]
    return f"the input features of the neuron of {neuron.weight_path}"


def _raise_if_nonfinite(table, bad) -> None:
    """Raise :class:`NonFiniteError` naming the first offending leaf; works under ``jit`` (via
    ``jax.debug.callback``, so the error surfaces when the step's result is read)."""

    def check(flags):
        flags = np.asarray(flags)
        if flags.any():
            names = [_describe_flag(table, int(i)) for i in np.flatnonzero(flags)]
            raise NonFiniteError(
                "NaN or Inf in " + "; ".join(names) + ". Refusing to take the step (use "
                "lnb_fast.lnb(..., nonfinite='skip') to skip such steps instead)"
            )

    if isinstance(bad, jax.core.Tracer):
        jax.debug.callback(check, bad)
    else:
        check(bad)
