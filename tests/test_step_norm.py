"""The trust-region step of Eq. 1–2, tested as properties of the maths, in every backend.

Each step must (1) have squared length exactly ε in the metric its solve used and (2) go downhill
(θ̂ · ĝ > 0). Both are asserted against *definitions computed here*, never against another
backend: the squared length is ``Σ_i ‖f_i(X_i; Δθ_i)‖² / n_i + Σ γ_ij Δw_ij²`` — the neuron's
own output for the parameter change (a forward of the linear map, written out in this file),
plus the ridge, with ``γ_ij = γ·Var(x_j)`` (relative) computed from the features here — and the
descent from the gradient the test itself computed.

The data are random features and random "backpropagated errors" ``E_i`` per step (the loss
``Σ_i ⟨f_i(X_i; θ_i), E_i⟩``, whose gradient is ``J_iᵀ E_i``): the gradient direction changes
every step, so the warm start of PCG is as bad as it gets and the descent restart is exercised.

Conditions under which the properties hold, stated once: b1 = 0 (ĝ = g, so descent is about
the gradient of this step), b2 = 0 (the EMA moments, hence the relative ridge and the
covariance strategy's metric, are this step's, which the test can compute), z0 = 0 and no
weight decay (Δθ = −√(ε/z)·θ̂ exactly). For the covariance strategy with a refresh every k > 1
steps the metric is the one of the last refresh's batch, which the test keeps.

Tolerance 1e-8 relative (float64): the step norm comes from PCG's recursive residual, which
differs from ``b − A x`` by rounding over 2 iterations (``~k·κ·eps`` with κ ≤ 1e4 here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import lnb_fast
import lnb_fast.xp as lnbxp
from lnb.testing.tolerances import RECURRENCE_RTOL
from lnb_ref.lnb import ExactLNB, OnlineLNB
from lnb_ref.neurons import Dense

pytestmark = pytest.mark.x64  # step lengths are compared at float64 rounding (see above)

STEPS = 6


def features(rng, n, d, scale=True):
    """Non-centred, unequally scaled, correlated columns: the case preconditioning is for."""
    X = rng.normal(size=(n, d)) @ (np.eye(d) + 0.5 * rng.normal(size=(d, d)))
    if scale:
        X = X * np.exp(rng.uniform(-2, 2, size=d)) + rng.normal(size=d) * 3
    return X


def ridge_per_column(X2d, gamma, relative, bias):
    """γ_j of the definition: ``γ·Var(x_j)`` (``γ·E[x_j²]`` without a bias) or ``γ``."""
    if not relative:
        return np.full(X2d.shape[1], gamma)
    second = np.mean(X2d**2, axis=0)
    var = np.var(X2d, axis=0) if bias else second
    return gamma * np.where(var > 0, var, np.where(second > 0, second, 1.0))


def dense_length(X, dw, db, gamma_j):
    """``‖X Δw + Δb‖² / n + Σ_j γ_j ‖Δw_j‖²`` for ``Δw`` of shape (d, K)."""
    out = X @ dw + (0 if db is None else db)
    return np.sum(out**2) / X.shape[0] + np.sum(gamma_j[:, None] * dw**2)


# --- lnb_fast: two dense neurons and a convolution, every strategy ----------------------------
D1, D2, K1, K2, N = 5, 4, 3, 2, 24


def dense_model_loss(params, batch):
    X1, X2, E1, E2 = batch
    f1 = X1 @ params["a"]["w"] + params["a"]["b"]  # with bias
    f2 = X2 @ params["c"]["w"]  # without
    return jnp.vdot(f1, E1) + jnp.vdot(f2, E2)


CONV = dict(window_strides=(1, 1), padding=[(1, 1), (1, 1)])


def conv_model_loss(params, batch):
    X, E = batch
    f = (
        lax.conv_general_dilated(X, params["k"]["w"], **CONV)
        + params["k"]["b"][None, :, None, None]
    )
    return jnp.vdot(f, E)


def fast_steps(loss, params, batches, **options):
    vgf = lnb_fast.value_and_grad(loss)
    table = vgf.table(params, batches[0])
    opt = lnb_fast.lnb(b1=0.0, b2=0.0, z0=0.0, neurons=table, **options)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        _, grads, feats = vgf(params, batch)
        updates, state = opt.update(grads, state, params, features=feats)
        return optax.apply_updates(params, updates), state, grads

    out = []
    for batch in batches:
        new, state, grads = step(params, state, batch)
        out.append((params, new, grads))
        params = new
    return out, state


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    strategy=st.sampled_from(["matrix-free", "gram", "covariance"]),
    gamma=st.sampled_from([0.0, 1e-3, 0.1]),
    relative=st.booleans(),
    epsilon=st.sampled_from([1e-3, 0.05, 1.0]),
)
def test_fast_step_is_epsilon_long_and_descends(seed, strategy, gamma, relative, epsilon):
    rng = np.random.default_rng(seed)
    if strategy == "covariance" and gamma == 0.0:
        gamma = 1e-3  # an exact inverse needs a nonsingular metric
    params = {
        "a": {"w": jnp.asarray(rng.normal(size=(D1, K1))), "b": jnp.zeros(K1)},
        "c": {"w": jnp.asarray(rng.normal(size=(D2, K2)))},
    }
    batches = [
        tuple(
            jnp.asarray(a)
            for a in (
                features(rng, N, D1),
                features(rng, N, D2),
                rng.normal(size=(N, K1)),
                rng.normal(size=(N, K2)),
            )
        )
        for _ in range(STEPS)
    ]
    steps, state = fast_steps(
        dense_model_loss,
        params,
        batches,
        learning_rate=epsilon,
        ridge=gamma,
        relative_ridge=relative,
        strategy=strategy,
        refresh_every=1,
    )
    for (old, new, grads), batch in zip(steps, batches, strict=True):
        X1, X2 = np.asarray(batch[0]), np.asarray(batch[1])
        da = np.asarray(new["a"]["w"] - old["a"]["w"]), np.asarray(new["a"]["b"] - old["a"]["b"])
        dc = np.asarray(new["c"]["w"] - old["c"]["w"])
        length = dense_length(X1, *da, ridge_per_column(X1, gamma, relative, True))
        length += dense_length(X2, dc, None, ridge_per_column(X2, gamma, relative, False))
        assert length == pytest.approx(epsilon, rel=RECURRENCE_RTOL)
        # descent, per neuron: Δθ · g < 0 (Δθ = −√(ε/z)·θ̂, so θ̂ · ĝ > 0)
        ga, gc = grads["a"], grads["c"]
        assert np.vdot(da[0], ga["w"]) + np.vdot(da[1], ga["b"]) < 0
        assert np.vdot(dc, gc["w"]) < 0
    if strategy != "covariance":
        assert int(state.restarts) >= 0  # counted (how many depends on the draw)


def conv_patches(X):
    """Each output pixel's 3×3 patch (the design rows of the convolution), ``(n·h·w, c·9)``."""
    p = lax.conv_general_dilated_patches(jnp.asarray(X), (3, 3), (1, 1), [(1, 1), (1, 1)])
    return np.asarray(p).transpose(0, 2, 3, 1).reshape(-1, p.shape[1])


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    strategy=st.sampled_from(["matrix-free", "gram", "covariance"]),
    relative=st.booleans(),
)
def test_fast_conv_step_is_epsilon_long_and_descends(seed, strategy, relative):
    """The same on a convolution (bias, padding): its length is computed with the patches."""
    rng = np.random.default_rng(seed)
    gamma, epsilon = 1e-2, 0.1
    params = {"k": {"w": jnp.asarray(rng.normal(size=(3, 2, 3, 3))), "b": jnp.zeros(3)}}
    batches = [
        (
            jnp.asarray(rng.normal(size=(2, 2, 5, 5)) * [[[[3.0]], [[0.2]]]] + 1.0),
            jnp.asarray(rng.normal(size=(2, 3, 5, 5))),
        )
        for _ in range(STEPS)
    ]
    steps, _ = fast_steps(
        conv_model_loss,
        params,
        batches,
        learning_rate=epsilon,
        ridge=gamma,
        relative_ridge=relative,
        strategy=strategy,
        refresh_every=1,
    )
    for (old, new, grads), (X, _) in zip(steps, batches, strict=True):
        Phi = conv_patches(X)  # (n_i, c·9) in OIHW's (c, kh, kw) order
        dw = np.asarray(new["k"]["w"] - old["k"]["w"]).reshape(3, -1).T  # (c·9, O)
        db = np.asarray(new["k"]["b"] - old["k"]["b"])
        length = dense_length(Phi, dw, db, ridge_per_column(Phi, gamma, relative, True))
        assert length == pytest.approx(epsilon, rel=RECURRENCE_RTOL)
        step_dot_g = np.vdot(dw.T.reshape(3, 2, 3, 3), grads["k"]["w"]) + np.vdot(
            db, grads["k"]["b"]
        )
        assert step_dot_g < 0


def linear_loss(p, batch):
    """``⟨X W, E⟩``: one bias-free dense neuron whose backpropagated errors are ``E``."""
    X, E = batch
    return jnp.vdot(X @ p["c"]["w"], E)


def test_fast_stale_covariance_step_is_epsilon_long_in_its_own_metric():
    """With a refresh every 3 steps the covariance strategy solves against the metric of the last
    refresh's batch (b2 = 0): the step has length ε in *that* metric, computed here."""
    rng = np.random.default_rng(3)
    params = {"c": {"w": jnp.asarray(rng.normal(size=(D2, K2)))}}
    batches = [
        (jnp.asarray(features(rng, N, D2)), jnp.asarray(rng.normal(size=(N, K2)))) for _ in range(7)
    ]
    steps, _ = fast_steps(
        linear_loss,
        params,
        batches,
        learning_rate=0.3,
        ridge=1e-2,
        relative_ridge=True,
        strategy="covariance",
        refresh_every=3,
    )
    for t, ((old, new, _), _) in enumerate(zip(steps, batches, strict=True)):
        X = np.asarray(batches[t - t % 3][0])  # the batch of the last refresh
        dw = np.asarray(new["c"]["w"] - old["c"]["w"])
        length = dense_length(X, dw, None, ridge_per_column(X, 1e-2, True, False))
        assert length == pytest.approx(0.3, rel=RECURRENCE_RTOL)


def test_fast_paper_rule_is_not_epsilon_long_with_a_warm_start():
    """The paper's z = Σ θ̂·ĝ (``step_norm="paper"``) makes steps of another length when the warm
    start leaves θ̂ far from M⁻¹ĝ — the failure the default fixes — and equal ones without it."""
    rng = np.random.default_rng(0)
    params = {"c": {"w": jnp.asarray(rng.normal(size=(D2, K2)))}}
    batches = [
        (jnp.asarray(features(rng, N, D2)), jnp.asarray(rng.normal(size=(N, K2))))
        for _ in range(STEPS)
    ]
    ratios = {}
    for warm in (True, False):
        steps, _ = fast_steps(
            linear_loss,
            params,
            batches,
            learning_rate=1.0,
            ridge=0.0,
            strategy="matrix-free",
            step_norm="paper",
            min_descent=0.0,
            warm_start=warm,
        )
        deltas = [np.asarray(n["c"]["w"] - o["c"]["w"]) for o, n, _ in steps]
        ratios[warm] = [
            dense_length(np.asarray(b[0]), dw, None, np.zeros(D2))
            for dw, b in zip(deltas, batches, strict=True)
        ]
    # From 0, PCG's θ̂ has θ̂·ĝ = θ̂ᵀMθ̂ (Galerkin), so the paper's rule is exact too.
    np.testing.assert_allclose(ratios[False], 1.0, rtol=RECURRENCE_RTOL)
    # With the warm start some step is off by far more than rounding (seen: 36%).
    assert max(abs(np.log(r)) for r in ratios[True][1:]) > 0.1


# --- lnb_ref and lnb_fast.xp: Algorithm 2 on explicit dense neurons ----------------------------
def reference_problem(seed):
    rng = np.random.default_rng(seed)
    neurons = [Dense("a", D1, K1, bias=True), Dense("c", D2, K2, bias=False)]
    params = [rng.normal(size=n.theta_shape) for n in neurons]
    data = [
        (
            [features(rng, N, D1), features(rng, N, D2)],
            [rng.normal(size=(N, K1)), rng.normal(size=(N, K2))],
        )
        for _ in range(STEPS)
    ]
    return neurons, params, data


def reference_grads(neurons, feats, errors):
    """``g_i = J_iᵀ E_i`` of the loss ``Σ ⟨f_i(X_i; θ_i), E_i⟩`` (θ rows: weights, then bias)."""
    out = []
    for neuron, X, E in zip(neurons, feats, errors, strict=True):
        g = E.T @ X
        out.append(np.concatenate([g, E.sum(0)[:, None]], 1) if neuron.bias else g)
    return out


def reference_length(neurons, feats, old, new, gamma, relative):
    total = 0.0
    for neuron, X, a, b in zip(neurons, feats, old, new, strict=True):
        d = (b - a).T  # (D, K)
        dw, db = (d[:-1], d[-1]) if neuron.bias else (d, None)
        total += dense_length(X, dw, db, ridge_per_column(X, gamma, relative, neuron.bias))
    return total


@pytest.mark.parametrize("backend", ["lnb_ref", "xp"])
@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    gamma=st.sampled_from([0.0, 1e-3, 0.1]),
    relative=st.booleans(),
    epsilon=st.sampled_from([1e-3, 0.05, 1.0]),
)
def test_online_step_is_epsilon_long_and_descends(backend, seed, gamma, relative, epsilon):
    neurons, params, data = reference_problem(seed)
    kw = dict(epsilon=epsilon, ridge=gamma, relative_ridge=relative, b1=0.0, b2=0.0, z0=0.0)
    if backend == "xp":
        opt = lnbxp.OnlineLNB(
            [lnbxp.Dense(D1, K1, True, "a"), lnbxp.Dense(D2, K2, False, "c")], **kw
        )
    else:
        opt = OnlineLNB(neurons, **kw)
    state = opt.init(params)
    restarts = 0
    for feats, errors in data:
        grads = reference_grads(neurons, feats, errors)
        new, state, info = opt.step(params, grads, feats, state)
        new = [np.asarray(p) for p in new]
        length = reference_length(neurons, feats, params, new, gamma, relative)
        assert length == pytest.approx(epsilon, rel=RECURRENCE_RTOL)
        for a, b, g in zip(params, new, grads, strict=True):
            assert np.vdot(b - a, g) < 0
        restarts += sum(info.restarted)
        params = new


def test_exact_lnb_step_is_epsilon_long():
    neurons, params, data = reference_problem(1)
    opt = ExactLNB(neurons, 0.2, ridge=1e-2, relative_ridge=True)
    feats, errors = data[0]
    grads = reference_grads(neurons, feats, errors)
    new, _, _ = opt.step(params, grads, feats, opt.init(params))
    assert reference_length(neurons, feats, params, new, 1e-2, True) == pytest.approx(
        0.2, rel=RECURRENCE_RTOL
    )


def test_restart_makes_uphill_warm_start_descend():
    """A warm start θ̂₀ = −10·M⁻¹g on an ill-conditioned metric: one CG iteration from it is still
    uphill (computed here, with the CG step written out); the optimizer must restart it and
    descend."""
    rng = np.random.default_rng(0)
    neuron = Dense("c", D2, K2, bias=False)
    X = rng.normal(size=(N, D2)) * np.exp([-3.0, -1.0, 1.0, 3.0])
    g = reference_grads([neuron], [X], [rng.normal(size=(N, K2))])[0]
    M = X.T @ X / N
    x0 = -10 * np.linalg.solve(M, g.T).T
    r0 = g - x0 @ M  # one CG iteration from x0, by hand
    kept = x0 + np.vdot(r0, r0) / np.vdot(r0, r0 @ M) * r0
    assert np.vdot(kept, g) < 0  # kept, the step would ascend
    opt = OnlineLNB(
        [neuron], 0.1, b1=0.0, b2=0.0, cg_iterations=1, precondition=False, min_descent=0.0
    )
    state = opt.init([np.zeros_like(g)])
    state["theta_hat"] = [x0]
    _, _, info = opt.step([np.zeros_like(g)], [g], [X], state)
    assert info.restarted == [True]
    assert np.vdot(info.directions[0], g) > 0


# --- a convex quadratic: the loss can rise by at most ε/2 --------------------------------------
@pytest.mark.parametrize("backend", ["lnb_ref", "lnb_fast"])
def test_least_squares_loss_rises_at_most_half_epsilon(backend):
    """ℓ(θ) = ‖Xθ − Y‖²/(2n) is quadratic with Hessian M, so ℓ(θ + Δ) − ℓ(θ) = g·Δ + ½ΔᵀMΔ, and
    with g·Δ < 0 and ΔᵀMΔ ≤ ‖Δ‖²_{M+γ} = ε the loss rises by at most ε/2, whatever PCG did."""
    rng = np.random.default_rng(0)
    X = features(rng, 64, 6)
    Y = X @ rng.normal(size=(6, 2)) + 0.1 * rng.normal(size=(64, 2))

    def loss_np(w, b):
        return np.sum((X @ w + b - Y) ** 2) / (2 * len(X))

    w, b = np.zeros((6, 2)), np.zeros(2)
    eps = 0.5
    if backend == "lnb_ref":
        neuron = Dense("d", 6, 2, bias=True)
        opt = OnlineLNB([neuron], eps, ridge=1e-3, b1=0.0, b2=0.9)
        state = opt.init([np.zeros((2, 7))])

        def step(w, b, state):
            r = (X @ w + b - Y) / len(X)
            g = np.concatenate([(r.T @ X), r.sum(0)[:, None]], 1)
            (theta,), state, _ = opt.step([np.concatenate([w.T, b[:, None]], 1)], [g], [X], state)
            return theta[:, :-1].T, theta[:, -1], state
    else:
        opt = lnb_fast.lnb(eps, ridge=1e-3, b2=0.9)
        vgf = lnb_fast.value_and_grad(
            lambda p, xy: jnp.sum((xy[0] @ p["w"] + p["b"] - xy[1]) ** 2) / (2 * len(X))
        )
        state = opt.init({"w": jnp.asarray(w), "b": jnp.asarray(b)})

        @jax.jit
        def jstep(p, state):
            _, grads, feats = vgf(p, (jnp.asarray(X), jnp.asarray(Y)))
            updates, state = opt.update(grads, state, p, features=feats)
            return optax.apply_updates(p, updates), state

        def step(w, b, state):
            p, state = jstep({"w": jnp.asarray(w), "b": jnp.asarray(b)}, state)
            return np.asarray(p["w"]), np.asarray(p["b"]), state

    previous = loss_np(w, b)
    for _ in range(40):
        w, b, state = step(w, b, state)
        now = loss_np(w, b)
        assert now - previous <= eps / 2 * (1 + RECURRENCE_RTOL)
        previous = now
    assert previous < 0.05 * loss_np(np.zeros((6, 2)), np.zeros(2))
