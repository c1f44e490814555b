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

from .capture import Features
from .neuron import Neuron
from .transform import _check_structure, _nonfinite_flags, _raise_if_nonfinite

#: φ for each ``Neuron.transfer`` (all with ``0 ≤ φ' ≤ 1``).
TRANSFERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda z: z,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": lambda z: jnp.maximum(z, 0),
}


class LocalState(NamedTuple):
    """State of :func:`locoprop_s`, :func:`locoprop_m` and :func:`lnb_fast.proxprop`: the step
    count (for a schedule) and the steps skipped for non-finite values (``nonfinite="skip"``)."""

    count: jax.Array
    skipped: jax.Array


def _zeros_like_params(neuron: Neuron, dtype) -> tuple:
    shapes = [neuron.weight_shape] + ([neuron.bias_shape] if neuron.bias is not None else [])
    return tuple(jnp.zeros(s, dtype) for s in shapes)


def _pullback(neuron: Neuron, X, dtype) -> Callable[[Any], tuple]:
    """``u ↦ Jᵀu = Φᵀu / n_i`` (the VJP of the neuron's map, linear in its parameters)."""
    _, vjp = jax.vjp(lambda th: neuron.apply(X, *th), _zeros_like_params(neuron, dtype))
    return lambda u: tuple(p / neuron.n_samples for p in vjp(u)[0])


def metric_bound(neuron: Neuron, X, dtype=None):
    """``B = max (M(|X|) 1) ≥ λ_max(M)``: Gershgorin's bound, one metric product on ``|X|``
    (``|Φ(X)| = Φ(|X|)``: design entries are input entries, zeros of a padding, or the bias 1)."""
    dtype = dtype or neuron.x_dtype
    ones = tuple(jnp.ones_like(z) for z in _zeros_like_params(neuron, dtype))
    Mv = neuron.metric_matvec(jax.tree.map(jnp.abs, X), ones, 0.0)
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
) -> tuple:
    """``Δ_J`` after ``inner_steps`` steps ``Δ ← Δ − ρ ∇L(Δ)`` from 0 on one neuron's local loss
    (module docstring); ``transfer="identity"`` is LocoProp-S."""
    dtype = jnp.result_type(*grad)
    rho = (
        1.0 / (metric_bound(neuron, X, dtype) + proximity)
        if inner_learning_rate == "auto"
        else jnp.asarray(inner_learning_rate, dtype)
    )

    def plus_prox_and_target(a, delta):
        """``a + κΔ + ηg``, leaf by leaf."""
        return tuple(
            x + proximity * d + learning_rate * g for x, d, g in zip(a, delta, grad, strict=True)
        )

    if transfer == "identity":  # ∇L_S = (M + κI)Δ + ηg

        def gradient(delta):
            return plus_prox_and_target(neuron.metric_matvec(X, delta, 0.0), delta)
    else:  # ∇L_M = Jᵀ[φ(f(X; θ_k + Δ)) − φ(z_k)] + ηg + κΔ
        phi = TRANSFERS[transfer]
        pull = _pullback(neuron, X, dtype)
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
    nonfinite: str,
) -> optax.GradientTransformationExtraArgs:
    """The optax plumbing shared by LocoProp and ProxProp: checks, identity-metric parameters
    (``−η g``), ``per_neuron(neuron, X, θ_k, g, η) -> Δ`` for each neuron, ``nonfinite``."""
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def init(params) -> LocalState:
        del params
        return LocalState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

    def update(grads, state: LocalState, params=None, *, features: Features | None = None, **_):
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
        g_leaves, treedef = jax.tree.flatten(grads)
        _check_structure(table, treedef, g_leaves, "gradients")
        p_leaves = jax.tree.leaves(params)
        _check_structure(table, treedef, p_leaves, "parameters")
        bad = _nonfinite_flags(g_leaves, features)
        if nonfinite == "raise":
            _raise_if_nonfinite(table, bad)

        dtype = jnp.result_type(*g_leaves) if g_leaves else jnp.float32
        eta = jnp.asarray(schedule(state.count), dtype)
        updates = [-eta * g for g in g_leaves]  # identity metric unless a neuron says otherwise
        for neuron, X in zip(table.neurons, features.values, strict=True):
            theta, grad = neuron.params_of(p_leaves), neuron.params_of(g_leaves)
            neuron.put_params(updates, per_neuron(neuron, X, theta, grad, eta))
        updates = [u.astype(g.dtype) for u, g in zip(updates, g_leaves, strict=True)]
        updates = jax.tree.unflatten(treedef, updates)
        new_state = LocalState(state.count + 1, state.skipped)
        if nonfinite == "skip":
            ok = ~jnp.any(bad)
            updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
            new_state = LocalState(
                jnp.where(ok, new_state.count, state.count),
                state.skipped + (~ok).astype(jnp.int32),
            )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _check_args(learning_rate, proximity, inner_steps, inner_learning_rate) -> None:
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive or a schedule, got {learning_rate!r}")
    if not proximity >= 0:
        raise ValueError(f"proximity must be >= 0, got {proximity!r}")
    if int(inner_steps) != inner_steps or inner_steps < 1:
        raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}")
    if inner_learning_rate != "auto" and not (
        isinstance(inner_learning_rate, (int, float)) and inner_learning_rate > 0
    ):
        raise ValueError(
            f"inner_learning_rate must be 'auto' or a positive number, got {inner_learning_rate!r}"
        )


def _locoprop(name, matched, learning_rate, proximity, inner_steps, inner_learning_rate, nonfinite):
    _check_args(learning_rate, proximity, inner_steps, inner_learning_rate)

    def per_neuron(neuron, X, theta, grad, eta):
        transfer = neuron.transfer if matched else "identity"
        return local_step(
            neuron, X, theta, grad, eta, proximity, int(inner_steps), inner_learning_rate, transfer
        )

    return local_transformation(name, learning_rate, per_neuron, nonfinite)


def locoprop_s(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    proximity: float = 1e-3,
    *,
    inner_steps: int = 5,
    inner_learning_rate: float | str = "auto",
    nonfinite: str = "raise",
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
        inner_steps: J ≥ 1, gradient steps on the local loss.
        inner_learning_rate: ρ: ``"auto"`` (``1/(B + κ)``, module docstring) or a number.
        nonfinite: ``"raise"`` (:class:`~lnb_fast.errors.NonFiniteError` naming the parameter)
            or ``"skip"`` (zero updates, ``skipped`` incremented).
    """
    return _locoprop(
        "locoprop_s", False, learning_rate, proximity, inner_steps, inner_learning_rate, nonfinite
    )


def locoprop_m(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    proximity: float = 1e-3,
    *,
    inner_steps: int = 5,
    inner_learning_rate: float | str = "auto",
    nonfinite: str = "raise",
) -> optax.GradientTransformationExtraArgs:
    """LocoProp-M: as :func:`locoprop_s`, but each neuron's local loss is the Bregman divergence
    matched to its transfer φ (``Neuron.transfer``, found at discovery: a tanh, sigmoid or relu
    that is the only reader of the neuron's output; otherwise identity, i.e. LocoProp-S for that
    neuron). Gradient ``Jᵀ[φ(f(X; θ_k + Δ)) − φ(z_k)] + ηg + κΔ``; same arguments."""
    return _locoprop(
        "locoprop_m", True, learning_rate, proximity, inner_steps, inner_learning_rate, nonfinite
    )
