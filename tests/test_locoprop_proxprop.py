"""LocoProp-S, LocoProp-M and ProxProp in the reference (lnb_ref.locoprop, lnb_ref.proxprop).

What is checked, against independent computations (materialised metrics from the forward alone,
Cholesky, closed forms of the iterations):

* LocoProp-S: the exact local minimiser is ``−η (M + κI)⁻¹ g`` (κ on every entry, bias included),
  which for a neuron without bias is ``−η`` times ExactLNB's θ̂ with ridge ``γ = κ``; its inner
  iterates follow the closed form ``Δ_J = −η [I − (I − ρA)^J] A⁻¹ g`` (``A = M + κI``), so the
  first one is the gradient step ``−ρη g``, and they converge to the minimiser.
* LocoProp-M: first inner step is the gradient step; with φ = identity it is LocoProp-S step for
  step; converged it satisfies the stationarity condition; the local loss decreases monotonically
  with the auto step, for every transfer.
* ProxProp: a descent direction (exact and CG with 1..P iterations); ``Δ/τ + g → 0`` as τ → 0
  within ``s/(1+s)·‖g‖``; the implicit-step identity ``θ⁺ = θ_k − τ ∇E(θ⁺)``; CG with P iterations
  equals the exact solve.

Tolerances: float64 throughout. Quantities that are one Cholesky solve or a few products of
well-conditioned (κ ≤ 1e3) small matrices apart are compared at RTOL = 1e-10 (conftest: the
rounding is ``κ · d · eps``, three orders below); the closed form of J = 30 inner iterates
compounds J products, still ~1e-13. Other tolerances are derived next to their assertion.
"""

from __future__ import annotations

import numpy as np
import pytest

from lnb.testing import correlated_features, rel_err
from lnb.testing.tolerances import RTOL
from lnb_ref import Conv2d, Dense, ExactLNB, LocoPropM, LocoPropS, ProxProp
from lnb_ref.errors import NeuronShapeError
from lnb_ref.locoprop import (
    TRANSFERS,
    auto_inner_learning_rate,
    inner_iterates,
    local_gradient,
    local_loss,
    locoprop_s_minimizer,
    metric_bound,
)
from lnb_ref.metric import metric_from_forward
from lnb_ref.network import CNN, MLP
from lnb_ref.neurons import Embedding
from lnb_ref.proxprop import proximal_step


def dense(rng, bias, n=30, d_in=5, d_out=3):
    neuron = Dense("dense", d_in, d_out, bias=bias)
    return neuron, correlated_features(rng, n, d_in)


def conv(rng, bias, groups=1):
    neuron = Conv2d("conv", 2, 4, 3, stride=2, padding=1, groups=groups, bias=bias)
    return neuron, rng.normal(size=(2, 2, 6, 6)) + 0.3


NEURONS = [
    ("dense", False),
    ("dense", True),
    ("conv", False),
    ("conv", True),
]


def make(kind, bias, seed=0):
    rng = np.random.default_rng(seed)
    neuron, X = dense(rng, bias) if kind == "dense" else conv(rng, bias, groups=2)
    theta = rng.normal(size=neuron.theta_shape) * 0.5
    g = rng.normal(size=neuron.theta_shape)
    return neuron, X, theta, g


def full_metric(neuron, X, kappa):
    """``M + κI`` on θ.ravel(), materialised from the forward alone (κ on every entry)."""
    return metric_from_forward(neuron, X) + kappa * np.eye(neuron.n_params)


# --- LocoProp-S -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,bias", NEURONS)
def test_locoprop_s_minimizer_is_lnb_with_ridge_on_every_entry(kind, bias):
    """``Δ* = −η (M + κI)⁻¹ g``, against the materialised metric, and for a neuron without bias
    against ``−η ·`` ExactLNB's θ̂ with ridge γ = κ (γ skips biases, κ does not)."""
    neuron, X, _, g = make(kind, bias)
    eta, kappa = 0.7, 0.05
    ours = locoprop_s_minimizer(neuron, X, g, eta, kappa)
    expected = -eta * np.linalg.solve(full_metric(neuron, X, kappa), g.ravel())
    assert rel_err(ours.ravel(), expected) < RTOL
    if not bias:
        theta_hat = ExactLNB([neuron], 1.0, ridge=kappa, relative_ridge=False).directions([g], [X])[
            0
        ]
        assert rel_err(ours, -eta * theta_hat) < RTOL
    else:  # the bias entries differ from LNB's ridge, which skips them: really another solve
        theta_hat = ExactLNB([neuron], 1.0, ridge=kappa, relative_ridge=False).directions([g], [X])[
            0
        ]
        assert rel_err(ours, -eta * theta_hat) > 1e-6


@pytest.mark.parametrize("kind,bias", NEURONS)
def test_locoprop_s_iterates_follow_the_closed_form(kind, bias):
    """``Δ_J = −η [I − (I − ρA)^J] A⁻¹ g`` with ``A = M + κI``: in particular ``Δ_1 = −ρη g``,
    the plain gradient step."""
    neuron, X, theta, g = make(kind, bias, seed=1)
    eta, kappa, J = 0.3, 0.02, 30
    iterates = inner_iterates(neuron, X, theta, g, eta, kappa, J)
    rho = auto_inner_learning_rate(neuron, X, kappa)
    assert rel_err(iterates[0], -rho * eta * g) < RTOL
    A = full_metric(neuron, X, kappa)
    step = np.eye(neuron.n_params) - rho * A
    power = np.eye(neuron.n_params)
    solution = np.linalg.solve(A, g.ravel())
    for delta in iterates:
        power = power @ step
        assert rel_err(delta.ravel(), -eta * (solution - power @ solution)) < RTOL


@pytest.mark.parametrize("kind,bias", NEURONS)
def test_locoprop_s_converges_to_the_minimizer(kind, bias):
    """``‖Δ_J − Δ*‖ ≤ q^J ‖Δ*‖`` with ``q = 1 − ρ λ_min(A) < 1``: the auto step is a
    contraction, because ``B ≥ λ_max(M)`` (Gershgorin), asserted too."""
    neuron, X, theta, g = make(kind, bias, seed=2)
    eta, kappa, J = 0.5, 0.3, 1500
    A = full_metric(neuron, X, kappa)
    eigs = np.linalg.eigvalsh(A)
    assert metric_bound(neuron, X) >= eigs[-1] - kappa
    rho = auto_inner_learning_rate(neuron, X, kappa)
    q = 1 - rho * eigs[0]
    target = locoprop_s_minimizer(neuron, X, g, eta, kappa)
    last = inner_iterates(neuron, X, theta, g, eta, kappa, J)[-1]
    # q^J bounds the error in exact arithmetic; rounding adds ~1e-14 relative (a contraction
    # does not amplify it), hence the RTOL floor.
    assert rel_err(last, target) <= q**J + RTOL
    if not bias:  # the brief's statement, directly: −η × ExactLNB's θ̂ with ridge γ = κ
        theta_hat = ExactLNB([neuron], 1.0, ridge=kappa, relative_ridge=False).directions([g], [X])[
            0
        ]
        assert rel_err(last, -eta * theta_hat) <= q**J + RTOL
    assert q**J < 1e-6  # the loop really ran to convergence


# --- LocoProp-M -----------------------------------------------------------------------------------
TRANSFER_NAMES = ["identity", "tanh", "sigmoid", "relu"]


@pytest.mark.parametrize("transfer", TRANSFER_NAMES)
@pytest.mark.parametrize("kind,bias", NEURONS)
def test_locoprop_m_first_inner_step_is_the_gradient_step(kind, bias, transfer):
    """At Δ = 0 the transfer term ``φ(z_k) − φ(z_k)`` vanishes: ``Δ_1 = −ρη g``."""
    neuron, X, theta, g = make(kind, bias, seed=3)
    eta, kappa = 0.4, 0.01
    rho = auto_inner_learning_rate(neuron, X, kappa)
    first = inner_iterates(neuron, X, theta, g, eta, kappa, 1, transfer=transfer)[0]
    assert rel_err(first, -rho * eta * g) < RTOL


@pytest.mark.parametrize("kind,bias", NEURONS)
def test_locoprop_m_with_identity_transfer_is_locoprop_s(kind, bias):
    """Through the network optimizers: an identity-activation MLP/CNN gives the same steps with
    LocoPropM as LocoPropS (the M gradient is written with φ, the S one with Eq. 11's product)."""
    neuron, X, theta, g = make(kind, bias, seed=4)
    eta, kappa = 0.4, 0.01
    # The generic Bregman gradient with φ = identity, against the S gradient on the same Δ.
    delta = np.random.default_rng(0).normal(size=neuron.theta_shape)
    s = local_gradient(neuron, X, theta, g, delta, eta, kappa, "identity")
    z_k = neuron.forward(X, theta)
    m = (
        neuron.vjp_theta(X, neuron.forward(X, theta + delta) - z_k) / neuron.n_samples(X)
        + eta * g
        + kappa * delta
    )
    assert rel_err(s, m) < RTOL


def test_locoprop_m_equals_s_step_for_step_on_an_identity_network():
    rng = np.random.default_rng(5)
    net = MLP([4, 6, 3], activation="identity")
    X, Y = correlated_features(rng, 40, 4), rng.integers(0, 3, size=40)
    params = net.init(rng)
    s_opt = LocoPropS(net.neurons, 0.5, proximity=0.01, inner_steps=4)
    m_opt = LocoPropM(net, 0.5, proximity=0.01, inner_steps=4)
    ps, pm = list(params), list(params)
    ss, sm = s_opt.init(ps), m_opt.init(pm)
    for _ in range(3):
        _, grads, feats = net.loss_grads_features(ps, X, Y)
        ps, ss, info_s = s_opt.step(ps, grads, feats, ss)
        _, grads, feats = net.loss_grads_features(pm, X, Y)
        pm, sm, info_m = m_opt.step(pm, grads, feats, sm)
        for a, b in zip(info_s.iterates, info_m.iterates, strict=True):
            for da, db in zip(a, b, strict=True):
                assert rel_err(db, da) < RTOL
    assert m_opt.transfers == ["identity", "identity"]


@pytest.mark.parametrize("transfer", TRANSFER_NAMES)
@pytest.mark.parametrize("kind,bias", NEURONS)
def test_locoprop_m_converges_to_a_stationary_point(kind, bias, transfer):
    """``Jᵀ[φ(z_k + ΦΔ) − φ(z_k)] + ηg + κΔ = 0`` at the limit of the inner loop.

    The local loss is κ-strongly convex and (B + κ)-smooth, so gradient descent with
    ``ρ = 1/(B + κ)`` contracts the distance to Δ* by ``q = 1 − ρκ`` per step, and
    ``‖∇L(Δ_J)‖ ≤ (B + κ)·‖Δ_J − Δ*‖ ≤ (B + κ)/κ · q^J · ‖ηg‖`` (``‖Δ*‖ ≤ ‖∇L(0)‖/κ``); plus
    rounding of the gradient itself, ~1e-15 · ‖ηg‖ (floor RTOL)."""
    neuron, X, theta, g = make(kind, bias, seed=6)
    eta, kappa, J = 0.3, 0.5, 300
    last = inner_iterates(neuron, X, theta, g, eta, kappa, J, transfer=transfer)[-1]
    residual = local_gradient(neuron, X, theta, g, last, eta, kappa, transfer)
    L = metric_bound(neuron, X) + kappa
    bound = L / kappa * (1 - kappa / L) ** J
    assert np.linalg.norm(residual) <= (bound + RTOL) * np.linalg.norm(eta * g)


@pytest.mark.parametrize("transfer", [*TRANSFER_NAMES, "softmax"])
@pytest.mark.parametrize("kind,bias", NEURONS)
def test_locoprop_m_local_loss_decreases_monotonically(kind, bias, transfer):
    """With the auto step ρ = 1/(B + κ) ≤ 1/L every inner step decreases the local loss (the
    descent lemma: ``L(Δ − ρ∇L) ≤ L(Δ) − ρ/2 ‖∇L‖²``); checked with that margin, less a
    rounding allowance of 1e-12 relative to the loss's terms."""
    if transfer == "softmax" and kind == "conv":
        pytest.skip("softmax is the output transfer of a Dense neuron")
    neuron, X, theta, g = make(kind, bias, seed=7)
    theta = theta * 4  # saturate tanh / sigmoid / relu somewhat
    eta, kappa = 2.0, 1e-3
    rho = auto_inner_learning_rate(neuron, X, kappa)
    deltas = [np.zeros(neuron.theta_shape)]
    deltas += inner_iterates(neuron, X, theta, g, eta, kappa, 15, transfer=transfer)
    losses = [local_loss(neuron, X, theta, g, d, eta, kappa, transfer) for d in deltas]
    scale = eta * np.abs(g).sum() * max(np.abs(d).max() for d in deltas) + 1.0
    for d, before, after in zip(deltas, losses, losses[1:], strict=False):
        grad = local_gradient(neuron, X, theta, g, d, eta, kappa, transfer)
        assert after <= before - rho / 2 * np.vdot(grad, grad) + 1e-12 * scale
    assert losses[-1] < losses[1] < 0


def test_local_loss_gradient_matches_finite_differences():
    """``local_gradient`` is the gradient of ``local_loss`` (central differences, step 1e-5:
    truncation error ~1e-10 · third derivative, so 1e-6 relative)."""
    neuron, X, theta, g = make("dense", True, seed=8)
    delta = np.random.default_rng(1).normal(size=neuron.theta_shape) * 0.3
    for transfer in TRANSFERS:
        grad = local_gradient(neuron, X, theta, g, delta, 0.5, 0.1, transfer)
        fd = np.zeros_like(delta)
        for j in range(delta.size):
            e = np.zeros_like(delta)
            e.flat[j] = 1e-5
            up = local_loss(neuron, X, theta, g, delta + e, 0.5, 0.1, transfer)
            down = local_loss(neuron, X, theta, g, delta - e, 0.5, 0.1, transfer)
            fd.flat[j] = (up - down) / 2e-5
        assert rel_err(grad, fd) < 1e-6, transfer


def test_locoprop_m_softmax_output_and_errors():
    net = MLP([3, 4, 2], activation="tanh")
    assert LocoPropM(net, 0.1, output_transfer="softmax").transfers == ["tanh", "softmax"]
    with pytest.raises(ValueError, match="output_transfer"):
        LocoPropM(net, 0.1, output_transfer="sigmoid")
    with pytest.raises(NeuronShapeError, match="dense1"):
        LocoPropM(MLP([3, 4, 2], output_activation="tanh"), 0.1, output_transfer="softmax")
    cnn = CNN((1, 4, 4), channels=(2,), strides=1)
    assert LocoPropM(cnn, 0.1, output_transfer="softmax").transfers == ["relu", "softmax"]
    with pytest.raises(ValueError, match="inner_steps"):
        LocoPropS(net.neurons, 0.1, inner_steps=0)
    with pytest.raises(ValueError, match="proximity"):
        LocoPropS(net.neurons, 0.1, proximity=-1.0)
    with pytest.raises(ValueError, match="inner_learning_rate"):
        LocoPropS(net.neurons, 0.1, inner_learning_rate="fast")


def test_identity_metric_neurons_take_the_gradient_step():
    emb = Embedding("pos", (3,))
    X = np.ones((5, 3))
    g = np.arange(3.0)
    for opt in (LocoPropS([emb], 0.2), ProxProp([emb], 0.2), ProxProp([emb], 0.2, solver="cg")):
        params, _, info = opt.step([np.zeros(3)], [g], [X], opt.init([np.zeros(3)]))
        assert rel_err(params[0], -0.2 * g) < RTOL


# --- ProxProp -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,bias", NEURONS)
def test_proxprop_is_a_descent_direction(kind, bias):
    """``−gᵀΔ > 0`` for the exact solve and after every CG iteration 1..P from 0 (CG's iterates
    satisfy ``bᵀx_k = x_kᵀAx_k > 0``, module docstring), for small and large τ."""
    neuron, X, _, g = make(kind, bias, seed=9)
    for tau in (1e-3, 0.1, 10.0):
        exact = proximal_step(neuron, X, g, tau)[0]
        assert -np.vdot(g, exact) > 0
        for delta in proximal_step(neuron, X, g, tau, "cg", neuron.n_params):
            assert -np.vdot(g, delta) > 0


@pytest.mark.parametrize("kind,bias", NEURONS)
def test_proxprop_tends_to_the_gradient_step(kind, bias):
    """``‖Δ/τ + g‖ ≤ s/(1+s)·‖g‖``, ``s = τ λ_max(M)``: ``Δ/τ + g = [I − (I + τM)⁻¹] g``,
    whose eigenvalues are ``t/(1+t) ≤ s/(1+s)``. The bound → 0 with τ; it is checked with a
    relative rounding allowance of RTOL."""
    neuron, X, _, g = make(kind, bias, seed=10)
    lam_max = np.linalg.eigvalsh(metric_from_forward(neuron, X))[-1]
    errors = []
    for tau in (1e-1, 1e-3, 1e-5, 1e-7):
        delta = proximal_step(neuron, X, g, tau)[0]
        s = tau * lam_max
        err = np.linalg.norm(delta / tau + g)
        assert err <= (s / (1 + s) + RTOL) * np.linalg.norm(g)
        errors.append(err)
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("kind,bias", NEURONS)
def test_proxprop_exact_step_is_the_implicit_step(kind, bias):
    """``θ⁺ = θ_k − τ ∇E(θ⁺)`` with ``E(θ) = ½ mean‖f(X; θ) − (z_k − nλ)‖²`` (a mean over the
    n rows), ``∇E(θ) = Φᵀ(f(X; θ) − z_k + nλ)/n``, for a random error λ and ``g = Φᵀλ``."""
    neuron, X, theta, _ = make(kind, bias, seed=11)
    z_k = neuron.forward(X, theta)
    lam = np.random.default_rng(3).normal(size=z_k.shape) / z_k.shape[0]
    g = neuron.vjp_theta(X, lam)
    for tau in (0.01, 1.0):
        plus = theta + proximal_step(neuron, X, g, tau)[0]
        n = neuron.n_samples(X)
        grad_E = neuron.vjp_theta(X, neuron.forward(X, plus) - (z_k - n * lam)) / n
        assert rel_err(plus, theta - tau * grad_E) < RTOL
        # and it minimises E + ‖θ − θ_k‖²/(2τ): the gradient of that objective vanishes
        assert np.linalg.norm(grad_E + (plus - theta) / tau) < RTOL * np.linalg.norm(g)


@pytest.mark.parametrize("kind,bias", NEURONS)
def test_proxprop_is_locoprop_s_and_tends_to_lnb(kind, bias):
    """ProxProp(τ) is LocoProp-S's exact minimiser with η = 1, κ = 1/τ (LocoProp's Appendix C),
    to rounding (1e-10: two Cholesky solves of the same SPD matrix); and as τ → ∞ it tends to
    −θ̂ (Algorithm 1's direction): ``Δ + θ̂ = [M⁻¹ − (M + I/τ)⁻¹] g``, whose norm is at most
    ``‖θ̂‖/(1 + τ λ_min(M))`` (eigenvalues ``1/(t(1 + τt))`` against ``1/t``)."""
    neuron, X, _, g = make(kind, bias, seed=13)
    for tau in (0.1, 10.0):
        assert (
            rel_err(
                proximal_step(neuron, X, g, tau)[0],
                locoprop_s_minimizer(neuron, X, g, 1.0, 1.0 / tau),
            )
            < RTOL
        )
    theta_hat = ExactLNB([neuron], 1.0).directions([g], [X])[0]
    lam_min = np.linalg.eigvalsh(metric_from_forward(neuron, X))[0]
    for tau in (1e2, 1e4, 1e6):
        err = np.linalg.norm(proximal_step(neuron, X, g, tau)[0] + theta_hat)
        assert err <= np.linalg.norm(theta_hat) / (1 + tau * lam_min) * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("kind,bias", NEURONS)
def test_proxprop_cg_with_all_iterations_is_exact(kind, bias):
    """CG on the SPD ``I + τM`` (P × P) is exact after P iterations in exact arithmetic. In
    float64 the loss of conjugacy is ~κ(A)·eps per step; with τ = 0.05 the condition number of
    ``I + τM`` here is below 1e3, so 1e-10 holds with margin."""
    neuron, X, _, g = make(kind, bias, seed=12)
    tau = 0.05
    exact = proximal_step(neuron, X, g, tau)[0]
    cg = proximal_step(neuron, X, g, tau, "cg", neuron.n_params)[-1]
    assert rel_err(cg, exact) < RTOL


def test_proxprop_optimizer_and_errors():
    rng = np.random.default_rng(13)
    net = MLP([4, 5, 3], activation="tanh")
    X, Y = correlated_features(rng, 30, 4), rng.integers(0, 3, size=30)
    params = net.init(rng)
    _, grads, feats = net.loss_grads_features(params, X, Y)
    opt = ProxProp(net.neurons, 0.5)
    new, state, info = opt.step(params, grads, feats, opt.init(params))
    assert state["t"] == 1 and info.learning_rate == 0.5
    for neuron, p, q, g, x in zip(net.neurons, params, new, grads, feats, strict=True):
        assert rel_err(q - p, proximal_step(neuron, x, g, 0.5)[0]) < RTOL
    assert net.loss(new, X, Y) < net.loss(params, X, Y)
    with pytest.raises(ValueError, match="solver"):
        ProxProp(net.neurons, 0.5, solver="lu")
    with pytest.raises(ValueError, match="cg_iterations"):
        ProxProp(net.neurons, 0.5, solver="cg", cg_iterations=0)
    with pytest.raises(ValueError, match="step size"):
        ProxProp(net.neurons, -1.0)
