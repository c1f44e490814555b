"""``locoprop_s`` / ``locoprop_m``: LocoProp (Amid, Anil & Warmuth, 2022) as optax transformations.

Per neuron ``i`` found by :func:`lnb_fast.value_and_grad` (design Φ with ``n_i`` rows, current
parameters θ_k, gradient ``g = Φᵀλ_i`` of the mean loss; ``Jᵀu := Φᵀu/n_i``, the mean pull-back,
so ``M = ΦᵀΦ/n_i`` is the metric of Eq. 11), with ``Δ = θ − θ_k``, ``inner_steps`` gradient steps
of size ρ from ``Δ₀ = 0`` on a *local* loss:

* **LocoProp-S**, targets ``t = z_k − η n_i λ_i``, local loss
  ``½·mean_rows‖f(X; θ) − t‖² + κ/2‖Δ‖²``, gradient ``(M + κI)Δ + ηg``;
* **LocoProp-M**, targets ``φ(z_k) − η n_i λ_i`` in the space of the transfer φ that follows the
  neuron (``Neuron.transfer``: tanh, sigmoid, relu, else identity) and the matched (Bregman)
  loss, gradient ``Jᵀ[φ(f(X; θ_k + Δ)) − φ(z_k)] + ηg + κΔ``.

The target term is exactly ``ηg``: only X, θ_k, g and φ are needed (not λ), which is why these
transformations read the parameters and the features but nothing else. Then ``θ ← θ_k + Δ_J``.

* First inner step: ``Δ₁ = −ρη g``, **the plain gradient step**.
* LocoProp-S converged: ``Δ* = −η (M + κI)⁻¹ g`` — **−η times LNB's θ̂ (Eq. 10) with a ridge κ on
  every diagonal entry, the bias entries included** (:func:`lnb_fast.lnb`'s ridge skips biases;
  for a neuron without bias the two coincide). This is the reduction to LNB of paper §4.1.
* ρ = ``"auto"``: ``1/(B + κ)`` with ``B = max (M(|X|) 1) ≥ λ_max(M)`` (Gershgorin on the metric
  built from ``|X|``, one metric product): a contraction for S, and a monotone decrease of the
  local loss for M with every transfer here (``φ' ≤ 1``; for the sigmoid ``φ' ≤ 1/4``, so the
  step is merely smaller than needed). See :mod:`lnb_ref.locoprop`, the NumPy oracle these match.

Parameters that belong to no neuron (identity metric) take the gradient step ``−η g``.

Reference: E. Amid, R. Anil, M. K. Warmuth, *LocoProp: Enhancing BackProp via Local Loss
Optimization*, AISTATS 2022; Munoz (2025) §4.1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._jax_compat import varying_like
from .capture import Features
from .neuron import Neuron
from .plumbing import (
    FEATURES,
    GRADIENT,
    RATE,
    Aligned,
    Guard,
    NonFiniteRecord,
    active_neurons,
    check_rate,
    nonfinite_option,
    rate_at,
    refuse_multisteps,
    schedule_of,
    static_int,
)
from .spmd import Reducer, axis_tuple, check_axes, shared

#: φ for each ``Neuron.transfer`` (all with ``0 ≤ φ' ≤ 1``).
TRANSFERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda z: z,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": lambda z: jnp.maximum(z, 0),
}


class LocalState(NamedTuple):
    """State of :func:`locoprop_s`, :func:`locoprop_m` and :func:`lnb_fast.proxprop`: the step
    count (for a schedule), the steps skipped for non-finite values (``nonfinite="skip"``) and
    the first non-finite value met (for :func:`lnb_fast.check_finite`)."""

    count: jax.Array
    skipped: jax.Array
    nonfinite: NonFiniteRecord = None


def _zeros_like_params(neuron: Neuron, dtype) -> tuple:
    shapes = [neuron.weight_shape] + ([neuron.bias_shape] if neuron.bias is not None else [])
    return tuple(jnp.zeros(s, dtype) for s in shapes)


NO_AXIS = Reducer(())


def _pullback(neuron: Neuron, X, dtype, reduce: Reducer = NO_AXIS) -> Callable[[Any], tuple]:
    """``u ↦ Jᵀu = Φᵀu / n_i`` (the VJP of the neuron's map, linear in its parameters); with
    an axis, averaged over the replicas (the global batch's mean pull-back)."""
    zeros = varying_like(_zeros_like_params(neuron, dtype), X)  # the replica's own (spmd)
    _, vjp = jax.vjp(lambda th: neuron.apply(X, *th), zeros)
    return lambda u: tuple(reduce.mean([p / neuron.n_samples for p in vjp(u)[0]]))


def metric_product(neuron: Neuron, X, v, ridge=0.0, reduce: Reducer = NO_AXIS) -> tuple:
    """``M v`` (:meth:`Neuron.metric_matvec`), averaged over ``reduce``'s axes: the global
    batch's metric when each replica holds a shard (:mod:`lnb_fast.spmd`)."""
    return tuple(reduce.mean(neuron.metric_matvec(X, v, ridge)))


def metric_bound(neuron: Neuron, X, dtype=None, reduce: Reducer = NO_AXIS):
    """``B = max (M(|X|) 1) ≥ λ_max(M)``: Gershgorin's bound, one metric product on ``|X|``
    (``|Φ(X)| = Φ(|X|)``: design entries are input entries, zeros of a padding, or the bias 1)."""
    dtype = dtype or neuron.x_dtype
    ones = tuple(jnp.ones_like(z) for z in _zeros_like_params(neuron, dtype))
    Mv = metric_product(neuron, jax.tree.map(jnp.abs, X), ones, 0.0, reduce)
    return jnp.max(jnp.stack([jnp.max(m) for m in Mv]))


def local_step(
    neuron: Neuron,
    X,
    theta: tuple,
    grad: tuple,
    learning_rate,
    proximity: float,
    inner_steps: int,
    inner_learning_rate: float | str = "auto",
    transfer: str = "identity",
    reduce: Reducer = NO_AXIS,
) -> tuple:
    """``Δ_J`` after ``inner_steps`` steps ``Δ ← Δ − ρ ∇L(Δ)`` from 0 on one neuron's local loss
    (module docstring); ``transfer="identity"`` is LocoProp-S."""
    dtype = jnp.result_type(*grad)
    rho = (
        1.0 / (metric_bound(neuron, X, dtype, reduce) + proximity)
        if isinstance(inner_learning_rate, str)
        else jnp.asarray(inner_learning_rate, dtype)
    )

    def plus_prox_and_target(a, delta):
        """``a + κΔ + ηg``, leaf by leaf."""
        return tuple(
            x + proximity * d + learning_rate * g for x, d, g in zip(a, delta, grad, strict=True)
        )

    if transfer == "identity":  # ∇L_S = (M + κI)Δ + ηg

        def gradient(delta):
            return plus_prox_and_target(metric_product(neuron, X, delta, 0.0, reduce), delta)
    else:  # ∇L_M = Jᵀ[φ(f(X; θ_k + Δ)) − φ(z_k)] + ηg + κΔ
        phi = TRANSFERS[transfer]
        pull = _pullback(neuron, X, dtype, reduce)
        phi_k = phi(neuron.apply(X, *theta))

        def gradient(delta):
            moved = neuron.apply(X, *(t + d for t, d in zip(theta, delta, strict=True)))
            return plus_prox_and_target(pull(phi(moved) - phi_k), delta)

    # Δ₁ = −ρηg exactly (the local gradient at Δ = 0 is ηg for S and M alike), then the rest,
    # unrolled at trace time like lnb_fast.pcg: inner_steps is small, and a lax.fori_loop
    # around the neuron's products (convolutions especially) ran several times slower on CPU.
    delta = tuple(-rho * (learning_rate * g) for g in grad)
    for _ in range(inner_steps - 1):
        delta = tuple(d - rho * s for d, s in zip(delta, gradient(delta), strict=True))
    return delta


def local_transformation(
    name: str,
    learning_rate,
    per_neuron: Callable[[Neuron, Any, tuple, tuple, jax.Array], tuple],
    nonfinite: str | None,
    rate_name: str = "learning_rate",
    axis_name=None,
) -> optax.GradientTransformationExtraArgs:
    """The optax plumbing shared by LocoProp and ProxProp: checks, identity-metric parameters
    (``−η g``), ``per_neuron(neuron, X, θ_k, g, η, reduce) -> Δ`` for each neuron, ``nonfinite``;
    with ``axis_name`` (:mod:`lnb_fast.spmd`) the gradients are averaged over it and ``reduce``
    averages the neuron's products.
    Masked parameters (``optax.masked``/``partition``) are not updated and their neurons
    skipped; a neuron whose bias alone is masked is solved without it."""
    nonfinite = nonfinite_option(nonfinite)
    axis_tuple(axis_name)
    schedule, rate_label = schedule_of(learning_rate, rate_name)

    def init(params) -> LocalState:
        refuse_multisteps(name)
        del params
        return LocalState(
            jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), NonFiniteRecord.empty(rate_label)
        )

    def update(grads, state: LocalState, params=None, *, features: Features | None = None, **_):
        refuse_multisteps(name)
        if not isinstance(features, Features):
            raise TypeError(
                f"lnb_fast.{name} needs the neurons' input features: call "
                "opt.update(grads, state, params, features=features) with the features returned "
                f"by lnb_fast.value_and_grad(loss_fn)(params, batch); got {type(features).__name__}"
            )
        if params is None:
            raise ValueError(
                f"lnb_fast.{name} needs the parameters θ_k (its local problems start from the "
                "current outputs f(X; θ_k)): call opt.update(grads, state, params, features=...)"
            )
        table = features.table
        g = Aligned(grads, table, "gradients")
        g_leaves = g.leaves
        p_leaves = Aligned(params, table, "parameters").leaves
        present = [i for i, x in enumerate(g_leaves) if x is not None]
        reduce = check_axes(name, axis_name, ([g_leaves[i] for i in present], features.values))
        guard = Guard(nonfinite, name, rate_label, table)
        for i in present:
            guard.add(GRADIENT, i, g_leaves[i])

        active = active_neurons(table, g.present)
        for neuron, X in zip(active, features.values, strict=True):
            if neuron is not None:
                guard.add(FEATURES, neuron.weight, X)
        if reduce:  # the mean gradient, and one replica's NaN skips the step on all
            g_leaves = shared(reduce, guard, g_leaves)
        dtype = jnp.result_type(*[g_leaves[i] for i in present]) if present else jnp.float32
        eta = rate_at(schedule, rate_label, state.count, dtype)
        guard.add(RATE, -1, eta)
        guard.inputs_ok()
        # identity metric unless a neuron says otherwise
        updates = [None if x is None else -eta * x for x in g_leaves]
        for neuron, X in zip(active, features.values, strict=True):
            if neuron is None:
                continue
            theta, grad = neuron.params_of(p_leaves), neuron.params_of(g_leaves)
            neuron.put_params(updates, per_neuron(neuron, X, theta, grad, eta, reduce))
        for i in present:
            updates[i] = updates[i].astype(g_leaves[i].dtype)
        new_state = LocalState(state.count + 1, state.skipped, state.nonfinite)
        return guard.finish(g.rebuild(updates), new_state, state, state.count + 1, table)

    return optax.GradientTransformationExtraArgs(init, update)


def _check_args(learning_rate, proximity, inner_steps, inner_learning_rate) -> int:
    check_rate("learning_rate", learning_rate, positive=True)
    check_rate("proximity", proximity, schedule_ok=False)
    inner_steps = static_int("inner_steps", 5 if inner_steps is None else inner_steps)
    if inner_learning_rate != "auto":
        v = inner_learning_rate if isinstance(inner_learning_rate, int | float) else None
        if isinstance(inner_learning_rate, str) or (v is not None and not v > 0):
            raise ValueError(
                "inner_learning_rate must be 'auto' or a positive number, got "
                f"{inner_learning_rate!r}"
            )
    return inner_steps


def _locoprop(
    name, matched, learning_rate, proximity, inner_steps, inner_learning_rate, nonfinite, axis_name
):
    inner_steps = _check_args(learning_rate, proximity, inner_steps, inner_learning_rate)

    def per_neuron(neuron, X, theta, grad, eta, reduce):
        transfer = neuron.transfer if matched else "identity"
        return local_step(
            neuron,
            X,
            theta,
            grad,
            eta,
            proximity,
            inner_steps,
            inner_learning_rate,
            transfer,
            reduce,
        )

    return local_transformation(name, learning_rate, per_neuron, nonfinite, axis_name=axis_name)


def locoprop_s(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    proximity: float = 1e-3,
    *,
    inner_steps: int | None = None,
    inner_learning_rate: float | str = "auto",
    nonfinite: str | None = "skip",
    axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """LocoProp-S: ``inner_steps`` gradient steps on each neuron's squared local loss toward the
    targets ``z_k − η n_i λ_i`` (module docstring); converged, ``−η(M + κI)⁻¹g``.

    Use like :func:`lnb_fast.lnb` (the parameters are required)::

        opt = lnb_fast.locoprop_s(learning_rate=0.5)
        loss, grads, features = lnb_fast.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params, features=features)

    Args:
        learning_rate: η, the step on the outputs that sets the local targets (a number or an
            optax schedule ``count ↦ η``). The converged step is ``−η(M + κI)⁻¹g`` with ``g``
            the gradient of the *mean* loss, so η is large next to SGD's rates: η = 10 was the
            best of 3, 10, 30 for S and M on the digits MLP and CNN of
            ``benchmarks/convergence.py --related`` (docs/results.md).
        proximity: κ ≥ 0, the weight of ``½‖θ − θ_k‖²`` (LocoProp's ``1/η_W``), on every entry.
        inner_steps: J ≥ 1, gradient steps on the local loss (None: 5). Unrolled at trace time,
            so a Python integer (None as default keeps it out of ``inject_hyperparams``).
        inner_learning_rate: ρ: ``"auto"`` (``1/(B + κ)``, module docstring) or a number.
        nonfinite: ``"skip"`` (default: zero updates in the graph, ``skipped`` incremented, the
            first offender recorded for :func:`lnb_fast.check_finite`), ``"raise"`` (eager
            updates only: :class:`~lnb_fast.errors.NonFiniteError` naming the parameter) or
            None, as :func:`lnb_fast.lnb`.
        axis_name: the mesh axis (or axes) the batch is split over inside ``shard_map``/``pmap``:
            the gradients, metric products and pull-backs are averaged over it, as
            :func:`lnb_fast.lnb`.
    """
    return _locoprop(
        "locoprop_s",
        False,
        learning_rate,
        proximity,
        inner_steps,
        inner_learning_rate,
        nonfinite,
        axis_name,
    )


def locoprop_m(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    proximity: float = 1e-3,
    *,
    inner_steps: int | None = None,
    inner_learning_rate: float | str = "auto",
    nonfinite: str | None = "skip",
    axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """LocoProp-M: as :func:`locoprop_s`, but each neuron's local loss is the Bregman divergence
    matched to its transfer φ (``Neuron.transfer``, found at discovery: a tanh, sigmoid or relu
    that is the only reader of the neuron's output; otherwise identity, i.e. LocoProp-S for that
    neuron). Gradient ``Jᵀ[φ(f(X; θ_k + Δ)) − φ(z_k)] + ηg + κΔ``; same arguments."""
    return _locoprop(
        "locoprop_m",
        True,
        learning_rate,
        proximity,
        inner_steps,
        inner_learning_rate,
        nonfinite,
        axis_name,
    )
