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

**Ridge.** By default the paper's absolute ``γ`` on every non-bias entry: it freezes features
whose variance is far below γ (dead ReLU channels, rare pixels), at the price of the invariance to
per-feature *scales* (maps with ``|a_j| = 1``, such as ``x ↦ 1 − x``, keep it).
``relative_ridge=True`` adds ``γ·Var(x_j)`` per input feature instead (from the EMA moments; for
``"covariance"`` from its own metric), which keeps the invariance to every per-feature affine map
exactly (:func:`lnb_ref.metric.relative_ridge` derives it) and gives up that protection;
``docs/design-choices.md`` has the measurements behind the default.

How ``θ̂_i`` is computed is the neuron's *strategy* (:mod:`lnb_fast.strategy`): PCG with
matrix-free products (the paper's), the same PCG with products on the design Gram ``C_i``
(``"gram"``; same iterates to rounding, cheaper when ``d`` is small next to ``n_i``), or an exact
solve against a stale EMA of ``C_i`` (``"covariance"``, opt-in: a different algorithm).

Reference: Munoz, *Simple Linear Neuron Boosting* (2025), Algorithm 2 and §3.4–3.5; the NumPy
oracles are :class:`lnb_ref.lnb.OnlineLNB` (matrix-free, gram), which the test suite matches to
1e-9, and :class:`lnb_ref.covariance.CovarianceLNB` (covariance).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .capture import Features
from .covariance import covariance_direction, gram, gram_layout, gram_matvec
from .covariance import relative_ridge as relative_ridge_of
from .discovery import NeuronTable
from .errors import StructureError
from .pcg import metric_norm, pcg, tree_vdot, vdot
from .plumbing import (
    FEATURES,
    GRADIENT,
    RATE,
    STEP,
    Aligned,
    Guard,
    NonFiniteRecord,
    active_neurons,
    check_interval,
    check_rate,
    every,
    is_zero,
    nonfinite_option,
    rate_at,
    refuse_multisteps,
    schedule_of,
    static_int,
)
from .spmd import (
    Symmetric,
    axis_tuple,
    check_axes,
    check_flag,
    check_sync,
    covariance_reducers,
    covariance_state,
    shared,
    split_plan,
    unwrapped,
    whole,
)
from .strategy import check_strategy, plan, plan_active

STEP_NORMS = ("metric", "paper")
"""``step_norm`` options, as :data:`lnb_ref.lnb.STEP_NORMS`."""


class LNBState(NamedTuple):
    """The state of :func:`lnb`; ``grad_ema``, ``mean``, ``second_moment`` and ``direction`` are
    shaped like the params (``optax.MaskedNode`` where a mask leaves a parameter out).

    Attributes:
        count: steps taken (``t``; the schedule reads ε at ``count``).
        grad_ema: EMA of the gradients (β₁); ``None`` when ``b1 = 0`` (no EMA: ``ĝ = g``, and
            one parameter-sized tree less in memory).
        mean, second_moment: EMAs (β₂) of each neuron's design-column moments ``μ`` and ``χ``,
            stored broadcast over the weight's output rows (zeros for other leaves); with
            ``neurons=``, one ``(G, d)`` row per group, and a ``(1,)`` placeholder for a
            covariance neuron.
        direction: the previous θ̂ (PCG's warm start).
        skipped: steps skipped for non-finite values (``nonfinite="skip"``).
        covariance: one entry per neuron of ``neurons=``: ``None``, or for a neuron with the
            ``"covariance"`` strategy ``(A, A_inv)``, the EMA of its augmented second moment
            (Eq. 12) and the damped inverse last refreshed, each ``(G, D, D)``.
        restarts: how many times, over all steps and neurons, a warm-started PCG direction
            failed the descent test and was recomputed from 0 (``min_descent``).
        nonfinite: the first non-finite value met (:class:`~lnb_fast.plumbing.NonFiniteRecord`),
            read by :func:`lnb_fast.check_finite`.

    The EMAs (``grad_ema``, ``mean``, ``second_moment``, ``covariance``) are kept in float32 at
    least: with bf16 parameters an EMA of rate 0.99 stored in bf16 stops moving once its
    increments fall below half a bf16 ulp.
    """

    count: jax.Array
    grad_ema: Any
    mean: Any
    second_moment: Any
    direction: Any
    skipped: jax.Array
    covariance: tuple = ()
    restarts: jax.Array = None
    nonfinite: NonFiniteRecord = None


def lnb(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    weight_decay: float = 0.0,
    *,
    ridge: float = 1e-3,
    z0: float = 0.0,
    b1: float = 0.0,
    b2: float = 0.99,
    cg_iterations: int | None = None,
    precondition: bool = True,
    warm_start: bool = True,
    nonfinite: str | None = "skip",
    strategy: str | dict = "auto",
    refresh_every: int = 10,
    covariance_every: int = 1,
    neurons: NeuronTable | None = None,
    relative_ridge: bool = False,
    step_norm: str = "metric",
    min_descent: float = 0.5,
    axis_name: str | tuple[str, ...] | None = None,
    covariance_sync: str = "step",
    split_refresh: bool = False,
    whole_directions: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Online Linear Neuron Boosting (Algorithm 2) as an optax transformation.

    Use with :func:`lnb_fast.value_and_grad`, which returns the features ``update`` needs::

        opt = lnb_fast.lnb(learning_rate=0.01)
        state = opt.init(params)
        loss, grads, features = value_grad_features(params, batch)
        updates, state = opt.update(grads, state, params, features=features)
        params = optax.apply_updates(params, updates)

    It composes like any optax transformation: ``optax.chain``, ``optax.masked`` and
    ``optax.partition`` (masked parameters are not updated and their neurons are skipped; a
    neuron whose bias alone is masked is solved without it), ``optax.inject_hyperparams``
    (every numeric argument but ``cg_iterations`` may be injected), ``optax.apply_if_finite``,
    ``jax.vmap`` and ``lax.scan`` over steps. ``optax.MultiSteps`` is refused
    (:class:`~lnb_fast.errors.CompositionError`): it would pass the features of its last
    micro-batch only.

    Args:
        learning_rate: ``ε``, the squared length of the step *in function space* (Eq. 1–2): a
            number ``>= 0`` or an optax schedule ``count ↦ ε``.
        weight_decay: ``ρ``; parameters shrink by ``1 − √ε·ρ`` per step, biases included.
        ridge: ``γ``, added to the non-bias diagonal of every ``M_i`` and to ``P_i`` (§3.4):
            ``γ`` (default), or ``γ·Var(x_j)`` per input feature with ``relative_ridge``.
            Default 1e-3 (``lnb_ref`` uses 0): with γ = 0 a neuron whose inputs do not span its
            weights (a convolution with few output pixels) has a singular metric.
        z0: lower bound of the norm ``z`` (Alg. 2, line 13).
        b1: EMA rate of the gradient; default 0, i.e. no EMA (``lnb_ref`` uses 0.9): every
            sweep we ran (matrix factorization, digits MLP and CNN) converged faster with 0.
        b2: EMA rate of the feature moments.
        cg_iterations: PCG iterations per step (None: 2, the paper's). Unrolled at trace time,
            so a Python integer (None as default keeps it out of ``inject_hyperparams``).
        precondition: use the §3.5 preconditioners (False: plain CG).
        warm_start: start PCG from the previous θ̂ (False: from 0).
        nonfinite: what a NaN/Inf in a gradient, a neuron's features or the learning rate (or
            in the step norm ``z``) does. ``"skip"`` (default): the step is skipped *in the graph*
            (zero updates, state unchanged but ``skipped`` incremented, the first offender
            recorded in ``state.nonfinite``), with no host round trip;
            :func:`lnb_fast.check_finite` ``(opt_state, params)`` raises
            :class:`~lnb_fast.errors.NonFiniteError` naming it when you call it. ``"raise"``:
            eager (un-jitted) updates raise ``NonFiniteError`` at once; under ``jit``/``vmap``/
            ``scan`` it is a ``ValueError`` at trace time (raising from the graph would cost a
            host round trip per step). None: no check. Overhead of ``"skip"`` against None:
            1.01× (auto) and 1.04× (covariance) per jitted step of the 784-800-800-10 MLP,
            measured by ``.venv/bin/python benchmarks/nonfinite_overhead.py [--strategy
            covariance]`` (docs/fast.md, "Non-finite values").
        strategy: how each neuron's θ̂ is computed (:mod:`lnb_fast.strategy`): ``"auto"``
            (the cheaper of the next two by the cost model), ``"matrix-free"`` (PCG with a
            forward and a VJP per product), ``"gram"`` (the same PCG on the minibatch's design
            Gram), ``"covariance"`` (exact solve against an EMA of the second moment, inverse
            refreshed every ``refresh_every`` steps; needs ``neurons``), ``"prefer-covariance"``
            (covariance on every neuron with a design, matrix-free on the others; the
            :data:`lnb_fast.SPEED` preset's), or a dict mapping a
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
            allocate the per-neuron ``(G, D, D)`` matrices of the covariance strategy. A table
            of another model is a :class:`~lnb_fast.errors.StructureError`.
        relative_ridge: ``γ`` relative to each input feature's variance (keeps the invariance to
            per-feature affine maps exactly, but no longer damps nearly constant features) or,
            by default, absolute (module docstring).
        step_norm: ``"metric"`` (default): ``z = Σ θ̂ᵀ(M + γ)θ̂``, the step's measured squared
            length, so every step is ε long; ``"paper"``: ``z = Σ θ̂ · ĝ`` (Alg. 2, line 13),
            equal only when PCG has converged.
        min_descent: a warm-started θ̂ with ``θ̂ · ĝ ≤ min_descent · θ̂ᵀ(M + γ)θ̂`` is recomputed
            by PCG from 0 (which descends: ``θ̂ · ĝ = θ̂ᵀ(M + γ)θ̂``); 0 restarts only directions
            that point uphill. ``LNBState.restarts`` counts them.
        axis_name: the mesh axis (or tuple of axes) the batch is split over when ``update``
            runs inside ``jax.shard_map`` or ``pmap`` (data parallelism): the gradients, the
            feature moments, the Grams and the metric products are averaged over it
            (``jax.lax.pmean``), so every replica takes the step of the global batch
            (:mod:`lnb_fast.spmd`; docs/scaling.md). None (default): no mapped axis; under
            ``jax.jit`` with a sharded batch XLA reduces by itself. Running under a mapped axis
            the batch varies over without naming it is an error, not a silent drift.
        covariance_sync: with ``axis_name``, when the covariance strategy's second moments are
            averaged over the replicas: ``"step"`` (default; each step's Gram, the state stays
            replicated) or ``"refresh"`` (each replica keeps the EMA of its shard, averaged
            only on refresh steps: an EMA is linear, so the step is the same, and
            1/``refresh_every`` of the bytes; the state's ``A`` is then per replica, see
            :func:`lnb_fast.spmd.state_specs`).
        split_refresh: with ``axis_name``, the covariance strategy's refresh shares out its
            inversions (:func:`lnb_fast.spmd.refresh_plan`): a metric whose inverse costs more
            than an even share of the refresh is factored by every replica, each solving for
            its share of the columns; every other one is inverted on one replica only (the
            costliest first, each to the least loaded) and shared in one all-reduce of its
            upper triangle. The refresh's work is divided among the replicas, for the bytes
            of the inverses on refresh steps (docs/scaling.md). The step is the same.
            False (default): every replica inverts every metric, with no communication.
        whole_directions: under ``jax.jit`` on a context mesh (``jax.set_mesh``) with weights
            split over the batch's axis (FSDP), run the ``"gram"`` neurons' PCG (the ``auto``
            choice for most hidden layers) on whole vectors: ĝ is gathered once per step and
            the products ``V·C``, local once the Gram is reduced, gather nothing, where by
            default XLA gathers the direction for every product (``cg_iterations + 1`` per
            step). Fewer bytes, for more work and memory: every device then computes the whole
            products (``2·d²·K`` instead of a share) and keeps the whole θ̂ in its state
            (docs/scaling.md, FSDP). No effect without a context mesh, under ``axis_name``, or
            on matrix-free and covariance neurons; with tensor-parallel weights it would gather
            their shards too, so leave it off there. The step is the same.

    Python numbers are validated here (arrays, which ``inject_hyperparams`` passes, go through):
    a negative, NaN or infinite ``learning_rate``, ``weight_decay``, ``ridge`` or ``z0`` is a
    ``ValueError``; a schedule that returns None is a ``TypeError`` naming
    it, one that returns NaN or a negative value is a non-finite step (above).
    """
    check_interval("b1", b1, 0.0, 1.0, high_open=True)
    check_interval("b2", b2, 0.0, 1.0, high_open=True)
    cg_iterations = static_int("cg_iterations", 2 if cg_iterations is None else cg_iterations)
    nonfinite = nonfinite_option(nonfinite)
    check_rate("learning_rate", learning_rate)
    for name, value in (("weight_decay", weight_decay), ("ridge", ridge), ("z0", z0)):
        check_rate(name, value, schedule_ok=False)
    if step_norm not in STEP_NORMS:
        raise ValueError(f"step_norm must be one of {STEP_NORMS}, got {step_norm!r}")
    check_interval("min_descent", min_descent, 0.0, 1.0)
    refresh_every = every("refresh_every", refresh_every)
    covariance_every = every("covariance_every", covariance_every)
    check_strategy(strategy)
    axis_tuple(axis_name)  # a clear TypeError now rather than in update
    check_sync(covariance_sync)
    check_flag(split_refresh, "split_refresh")
    check_flag(whole_directions, "whole_directions")
    if neurons is not None and not isinstance(neurons, NeuronTable):
        raise TypeError(
            "neurons must be a lnb_fast.NeuronTable (lnb_fast.value_and_grad(loss).table(params, "
            f"batch)), got {type(neurons).__name__}"
        )
    schedule, rate_label = schedule_of(learning_rate)
    options = {
        "cg_iterations": cg_iterations,
        "refresh_every": refresh_every,
        "covariance_every": covariance_every,
    }
    wants_covariance = bool(
        {"covariance", "prefer-covariance"}
        & set(strategy.values() if isinstance(strategy, dict) else [strategy])
    )
    if wants_covariance and neurons is None:
        raise ValueError(
            "strategy 'covariance' keeps a (G, D, D) matrix per neuron in the state, so "
            "lnb_fast.lnb needs the neurons up front: pass "
            "neurons=lnb_fast.value_and_grad(loss).table(params, batch)"
        )
    if neurons is not None:
        plan(neurons, strategy, **options)  # a forced strategy a neuron cannot take raises here
    # With the neurons known up front the moments μ, χ are stored compactly, one (G, d) row per
    # group instead of broadcast over the weight's rows (they are equal across rows), and a
    # covariance neuron, which needs none, stores a (1,) placeholder: see _compact_layouts.
    # Which neurons are updated (a mask may leave some out) is known in init and update only.

    def init(params) -> LNBState:
        refuse_multisteps("lnb")
        # A fresh buffer per field, so that a step may donate the state (no buffer twice).
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        wide = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, _wide(p.dtype)), params)  # noqa: E731
        covariance = ()
        moments = [wide(), wide()]
        if neurons is not None:
            aligned = Aligned(params, neurons, "parameters", source="the neurons= table has")
            active = active_neurons(neurons, aligned.present)
            choices = plan_active(neurons, active, strategy, **options)
            compact = _compact_layouts(active, choices)
            dtype = _wide(jnp.result_type(*[x for x in aligned.leaves if x is not None]))
            covariance = tuple(
                covariance_state(
                    tuple(
                        jnp.zeros((c.layout.groups, c.layout.aug, c.layout.aug), dtype)
                        for _ in "AB"
                    ),
                    covariance_sync,
                    axis_name,
                )
                if c is not None and c.name == "covariance"
                else None
                for c in choices
            )
            for m in range(2):
                leaves = list(Aligned(moments[m], neurons, "state", shapes=False).leaves)
                for j, neuron in enumerate(active):
                    shape = None
                    if neuron is None:
                        continue
                    if choices[j].name == "covariance":
                        shape = (1,)  # a placeholder checkpointers can save (not size 0)
                    elif j in compact:
                        shape = (compact[j].groups, compact[j].cols)
                    if shape is not None:
                        leaves[neuron.weight] = jnp.zeros(shape, leaves[neuron.weight].dtype)
                moments[m] = aligned.rebuild(leaves)
        return LNBState(
            count=jnp.zeros([], jnp.int32),
            grad_ema=None if is_zero(b1) else wide(),
            mean=moments[0],
            second_moment=moments[1],
            direction=zeros(),
            skipped=jnp.zeros([], jnp.int32),
            covariance=covariance,
            restarts=jnp.zeros([], jnp.int32),
            nonfinite=NonFiniteRecord.empty(rate_label),
        )

    def update(grads, state: LNBState, params=None, *, features: Features | None = None, **_):
        refuse_multisteps("lnb")
        if not isinstance(features, Features):
            raise TypeError(
                "lnb_fast.lnb needs the neurons' input features: call "
                "opt.update(grads, state, params, features=features) with the features returned "
                f"by lnb_fast.value_and_grad(loss_fn)(params, batch); got {type(features).__name__}"
            )
        table = features.table
        if neurons is not None:
            same_model(neurons, table, "lnb_fast.lnb(neurons=...)")
        g = Aligned(grads, table, "gradients")
        present = [i for i, x in enumerate(g.leaves) if x is not None]
        reduce = check_axes("lnb", axis_name, ([g.leaves[i] for i in present], features.values))
        p_leaves = None
        if params is not None:
            p_leaves = Aligned(params, table, "parameters").leaves
        elif not is_zero(weight_decay):
            raise ValueError(
                "weight_decay needs the parameters: opt.update(grads, state, params) (a "
                "weight_decay injected by optax.inject_hyperparams counts as nonzero)"
            )
        # Planned on this trace's table: its layouts know this batch's n_i (the table given as
        # neurons= may have been traced for another batch size; covariance is never auto-chosen,
        # so which neurons are covariance, hence the state's layout, does not change).
        active = active_neurons(table, g.present)
        step_choices = plan_active(table, active, strategy, **options, replicas=reduce.size)
        compact = _compact_layouts(active, step_choices) if neurons is not None else {}
        splits = split_plan(
            reduce,
            {
                j: step_choices[j].layout
                for j, neuron in enumerate(active)
                if neuron is not None and step_choices[j].name == "covariance"
            },
            split_refresh,
        )
        guard = Guard(nonfinite, "lnb", rate_label, table)
        for i in present:
            guard.add(GRADIENT, i, g.leaves[i])
        for neuron, X in zip(active, features.values, strict=True):
            if neuron is not None:
                guard.add(FEATURES, neuron.weight, X)
        # This batch's statistics of every non-covariance neuron: the feature moments (l. 6–7)
        # and, for "gram", the Gram and mean (Eq. 11–12). Means over the design rows: with
        # axis_name they are averaged over the replicas together with the gradients and the
        # non-finite flags, in one all-reduce (lnb_fast.spmd).
        stats = [None] * len(active)
        for j, (neuron, X) in enumerate(zip(active, features.values, strict=True)):
            if neuron is not None and step_choices[j].name != "covariance":
                mean, second = neuron.moments(X)
                if j in compact:  # one row per group, (G, d)
                    mean, second = (compact[j].to_rows(m)[:, 0, :] for m in (mean, second))
                stats[j] = (mean, second)
                if step_choices[j].name == "gram":  # C is symmetric: half of it travels
                    C, mu_g = gram(step_choices[j].layout, X, neuron.n_samples)
                    stats[j] += (Symmetric(C) if reduce else C, mu_g)
        g_leaves, stats = _shared(reduce, guard, list(g.leaves), stats)

        read = lambda tree: Aligned(tree, table, "state", shapes=False).leaves  # noqa: E731
        mu_leaves, chi_leaves = read(state.mean), read(state.second_moment)
        d_leaves = read(state.direction)

        t = state.count + 1
        dtype = jnp.result_type(*[g_leaves[i] for i in present]) if present else jnp.float32
        wide = _wide(dtype)  # the scalars z, ε and the EMAs' weights: float32 at least
        c1 = 1 - jnp.asarray(b1, wide) ** t
        c2 = 1 - jnp.asarray(b2, wide) ** t
        w1, w2 = _ema_weight(b1, wide), _ema_weight(b2, wide)
        eps = rate_at(schedule, rate_label, state.count, wide)
        guard.add(RATE, -1, eps)
        ok = guard.inputs_ok()  # None without a check; gates the covariance matrices
        m_new = None
        g_hat = list(g_leaves)
        if not is_zero(b1):
            m_leaves = read(state.grad_ema)
            m_new = list(m_leaves)
            for i in present:
                m_new[i] = w1 * m_leaves[i] + (1 - w1) * g_leaves[i].astype(m_leaves[i].dtype)
                g_hat[i] = (m_new[i] / c1).astype(g_leaves[i].dtype)

        directions = list(g_hat)  # identity metric unless a neuron says otherwise
        mu_new, chi_new = list(mu_leaves), list(chi_leaves)
        covariance = list(state.covariance)
        # Per neuron: θ̂·ĝ and θ̂ᵀ(M + γ)θ̂ (identity-metric leaves: ĝ·ĝ both, added below).
        dots, norms, restarts = [], [], jnp.zeros([], jnp.int32)
        in_neuron = set()
        for j, (neuron, X) in enumerate(zip(active, features.values, strict=True)):
            if neuron is None:  # masked out: not updated, not solved for
                continue
            choice = step_choices[j]
            g_j = neuron.params_of(g_hat)
            in_neuron.update(i for i in (neuron.weight, neuron.bias) if i is not None)
            if choice.name == "covariance":
                # §3.5's second option: exact solve against the stale EMA metric, so the step's
                # norm in that metric is θ̂ · ĝ (to rounding).
                pair, marked = unwrapped(state.covariance[j])
                covariance[j], d = covariance_direction(
                    choice.layout,
                    neuron,
                    X,
                    pair,
                    state.count,
                    b2,
                    ridge,
                    refresh_every,
                    covariance_every,
                    g_j,
                    relative_ridge,
                    ok,
                    **covariance_reducers(reduce, covariance_sync),
                    **splits.get(j, {}),
                )
                covariance[j] = marked(covariance[j])
                neuron.put_params(directions, d)
                dots.append(tree_vdot(d, g_j).astype(wide))
                norms.append(dots[-1])
                continue
            mean, second = stats[j][:2]
            i = neuron.weight
            layout = compact.get(j)
            store = mu_leaves[i].dtype
            mu_new[i] = w2 * mu_leaves[i] + (1 - w2) * mean.astype(store)
            chi_new[i] = w2 * chi_leaves[i] + (1 - w2) * second.astype(store)
            # bias-corrected in the EMA's precision, then in the parameters' for PCG
            mu_hat, chi_hat = ((m / c2).astype(g_j[0].dtype) for m in (mu_new[i], chi_new[i]))
            if layout is not None:  # broadcast over the rows again, for this step only
                mu_hat, chi_hat = (_broadcast_rows(layout, m) for m in (mu_hat, chi_hat))
            gamma = ridge
            if relative_ridge:  # per weight entry: γ·Var of its input feature
                gamma = relative_ridge_of(mu_hat, chi_hat, ridge, neuron.bias is not None)
            P = neuron.preconditioner(mu_hat, chi_hat, gamma) if precondition else None
            x0 = neuron.params_of(d_leaves) if warm_start else None
            if choice.name == "gram":  # the same PCG, products on the minibatch's Gram
                C, mu_g = stats[j][2:]
                gamma_rows = gamma if jnp.ndim(gamma) == 0 else choice.layout.to_rows(gamma)
                matvec = lambda v, ly=choice.layout, C=C, mu=mu_g, r=gamma_rows: gram_matvec(  # noqa: E731
                    ly, C, mu, v, r
                )
            elif reduce:  # the replicas' products averaged: the global batch's M v
                matvec = lambda v, neuron=neuron, X=X, r=gamma: tuple(  # noqa: E731
                    reduce.mean(neuron.metric_matvec(X, v, r))
                )
            else:
                matvec = lambda v, neuron=neuron, X=X, r=gamma: neuron.metric_matvec(X, v, r)  # noqa: E731
            if whole_directions and choice.name == "gram" and not reduce:
                # PCG on whole vectors (a no-op without a context mesh): ĝ and the warm start
                # are gathered once, and the products V·C, local once C is reduced, need none
                g_j = whole(g_j)
                x0 = whole(x0) if x0 is not None else None
                matvec = lambda v, mv=matvec: whole(mv(whole(v)))  # noqa: E731
                if P is not None:
                    P = lambda v, p=P: whole(p(whole(v)))  # noqa: E731
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
            dots.append(dot.astype(wide))
            norms.append(norm.astype(wide))

        identity = [i for i in present if i not in in_neuron]
        rest = sum((vdot(g_hat[i], g_hat[i]).astype(wide) for i in identity), jnp.zeros([], wide))
        raw_z = sum(norms if step_norm == "metric" else dots, rest)
        z = jnp.maximum(z0, raw_z)
        guard.add(STEP, -1, z)  # non-finite from finite inputs: a direction overflowed
        scale = jnp.where(z > 0, jnp.sqrt(eps / jnp.where(z > 0, z, 1)), 0)
        decay = jnp.sqrt(eps) * weight_decay
        updates = [None] * len(g_leaves)
        for i in present:
            u = -scale * directions[i]
            if not is_zero(weight_decay):
                u = u - decay * p_leaves[i]
            updates[i] = u.astype(g_leaves[i].dtype)

        written = lambda tree, leaves: Aligned(tree, table, "state", shapes=False).rebuild(leaves)  # noqa: E731
        new_state = LNBState(
            count=t,
            grad_ema=None if m_new is None else written(state.grad_ema, m_new),
            mean=written(state.mean, mu_new),
            second_moment=written(state.second_moment, chi_new),
            direction=written(state.direction, directions),
            skipped=state.skipped,
            covariance=tuple(covariance),
            restarts=state.restarts + restarts,
            nonfinite=state.nonfinite,
        )
        # the state keeps its dtypes step after step (scan carries, donation)
        new_state = jax.tree.map(lambda n, o: jnp.asarray(n, o.dtype), new_state, state)
        return guard.finish(g.rebuild(updates), new_state, state, t, table, gated=["covariance"])

    return optax.GradientTransformationExtraArgs(init, update)


def scale_by_lnb(**options) -> optax.GradientTransformationExtraArgs:
    """LNB's direction in optax's shape: ``θ̂ / √z``, of squared length 1 in the metric (the
    solve, the moments, the gradient EMA and the non-finite guard of :func:`lnb`; state
    :class:`LNBState`). Scale it as any ``scale_by_*``::

        lnb(ε, ρ)  ==  optax.chain(scale_by_lnb(...), optax.add_decayed_weights(ρ),
                                   optax.scale(-√ε))

    (for a schedule, ``optax.scale_by_schedule(lambda t: -jnp.sqrt(ε(t)))``): ``θ ← (1 − √ε·ρ)θ
    − √(ε/z)·θ̂`` either way, to rounding (``tests/test_optax_composition.py``). :func:`lnb`
    itself stays one transformation so that ε is checked with the inputs of the step (a NaN
    learning rate skips the step instead of reaching the parameters). Keyword arguments:
    :func:`lnb`'s, but ``learning_rate`` and ``weight_decay`` (its signature is built from
    :func:`lnb`'s, so the two cannot drift apart)."""
    fixed = sorted(set(options) & {"learning_rate", "weight_decay"})
    if fixed:
        raise TypeError(
            f"scale_by_lnb takes no {' or '.join(fixed)}: scale its direction in the chain "
            "(optax.add_decayed_weights(ρ), optax.scale(-√ε)), or use lnb_fast.lnb(ε, ρ)"
        )
    inner = lnb(1.0, 0.0, **options)

    def update(grads, state: LNBState, params=None, **extra_args):
        updates, state = inner.update(grads, state, params, **extra_args)
        return jax.tree.map(jnp.negative, updates), state  # lnb(1, 0) steps along −θ̂/√z

    return optax.GradientTransformationExtraArgs(inner.init, update)


scale_by_lnb.__signature__ = inspect.signature(lnb).replace(
    parameters=[
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in inspect.signature(lnb).parameters.items()
        if name not in ("learning_rate", "weight_decay")
    ]
)


def _wide(dtype):
    """float32 at least: where EMAs, bias corrections and the step's scalars are computed."""
    return jnp.promote_types(dtype, jnp.float32)


def _ema_weight(b, dtype):
    """The EMA weight ``b`` as the bias correction ``1 − bᵗ`` uses it: a Python number stays
    one (exact in float64, as before), an array is cast to ``dtype``."""
    return b if isinstance(b, (int, float)) else jnp.asarray(b, dtype)


def same_model(neurons: NeuronTable, table: NeuronTable, who: str) -> None:
    """A :class:`StructureError` when the features come from another model than ``neurons``."""
    if neurons is table:
        return
    if [n.weight_path for n in neurons.neurons] != [n.weight_path for n in table.neurons]:
        raise StructureError(
            f"the features' neurons are not those {who} was built for: "
            f"{[n.weight_path for n in table.neurons]} vs "
            f"{[n.weight_path for n in neurons.neurons]}"
        )
    if neurons.treedef != table.treedef:
        raise StructureError(
            f"the features' parameter tree is not the one {who} was built for:\n"
            f"  features: {table.treedef}\n  neurons=: {neurons.treedef}"
        )
    for path, mine, theirs in zip(table.paths, table.shapes, neurons.shapes, strict=True):
        if tuple(mine) != tuple(theirs):
            raise StructureError(
                f"parameter {path}: shape {tuple(mine)} in the features, but {tuple(theirs)} in "
                f"the neurons= table {who} was built for (a table of another model?)"
            )


def _compact_layouts(active, choices) -> dict:
    """neuron index -> :class:`~lnb_fast.covariance.GramLayout` for every updated
    non-covariance neuron whose weight maps onto design rows: its moments are stored as
    ``(G, d)``."""
    out = {}
    for j, (neuron, choice) in enumerate(zip(active, choices, strict=True)):
        if neuron is None:
            continue
        layout = gram_layout(neuron)
        if choice.name != "covariance" and not isinstance(layout, str):
            out[j] = layout
    return out


def _broadcast_rows(layout, m):
    """``(G, d)`` -> weight-shaped, every output row a copy of its group's row."""
    G, d = m.shape
    return layout.from_rows(jnp.broadcast_to(m[:, None, :], (G, layout.rows, d)))


def _shared(reduce, guard, g_leaves: list, stats: list):
    """``(g_leaves, stats)`` averaged over ``reduce``'s axes, and ``guard``'s flags so far made
    the same on every replica (any replica's non-finite value counts), all in one all-reduce
    (:meth:`lnb_fast.spmd.Reducer.mean`). Without an axis: unchanged."""
    if not reduce:
        return g_leaves, stats
    sizes = [0 if s is None else len(s) for s in stats]
    flat = [x for s in stats if s is not None for x in s]
    out = shared(reduce, guard, g_leaves, flat)
    g_leaves, flat = out[: len(g_leaves)], out[len(g_leaves) :]
    stats, k = [], 0
    for size in sizes:
        stats.append(tuple(flat[k : k + size]) if size else None)
        k += size
    return g_leaves, stats
