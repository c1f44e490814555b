"""Boosted backpropagation (§2.3–2.4): with linear exact least-squares weak learners it is
Algorithm 1; with a nonlinear learner it is a genuine function-space method.

Tolerance: the linear weak learner solves Eq. 10 by Cholesky of ``E[x̂x̂ᵀ]`` exactly as
``ExactLNB`` does, but its right-hand side is ``Φᵀ(n·λ)/n`` instead of ``Φᵀλ`` and its ``z`` is a
mean of ``h·t`` instead of ``θ̂·g``: the same numbers summed in a different order. The relative
differences are rounding, ``κ(M)·d·eps`` with κ ≲ 1e3 here, so ``RTOL = 1e-10`` leaves three
orders of magnitude of headroom; over several steps the tiny differences feed back through the
network but stay of the same order (the steps are short, ε small).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lnb.testing import correlated_features, rel_err, teacher_problem
from lnb.testing.tolerances import RECURRENCE_RTOL, RTOL
from lnb_ref import (
    CNN,
    MLP,
    BoostedBackprop,
    BoostedNetwork,
    ExactLNB,
    LinearLeastSquares,
    RandomFeatureLeastSquares,
)


def problem(loss: str, seed: int, n: int = 40, d: int = 4):
    return teacher_problem(loss, seed, n, d)


CASES = [(bias, loss) for bias in (True, False) for loss in ("softmax_cross_entropy", "mse")]


@pytest.mark.parametrize(("bias", "loss"), CASES)
def test_linear_boosting_is_algorithm_1(bias, loss):
    """Linear exact LS weak learners, full batch: the parameters after 1 and after 5 steps equal
    ExactLNB's (weight decay included), and z equals Σθ̂·g."""
    X, Y = problem(loss, seed=3)
    net = MLP([4, 6, 5, 3], activation="tanh", bias=bias, loss=loss)
    params0 = net.init(np.random.default_rng(0))
    eps, rho = 0.02, 0.5
    boost = BoostedBackprop(net, eps, LinearLeastSquares(bias=bias), weight_decay=rho)
    exact = ExactLNB(net.neurons, eps, weight_decay=rho)
    pb, sb = params0, boost.init(params0)
    pe, se = params0, exact.init(params0)
    for step in range(5):
        pb, sb, ib = boost.step_batch(pb, X, Y, sb)
        _, grads, feats = net.loss_grads_features(pe, X, Y)
        pe, se, ie = exact.step(pe, grads, feats, se)
        assert all(ib.folded) and all(not e for e in sb["ensembles"])
        assert ib.raw_z == pytest.approx(ie.raw_z, rel=RTOL)
        # exact unregularised LS: ⟨h, t⟩ = ‖h‖² (the residual is orthogonal to the fit)
        assert ib.squared_norm == pytest.approx(ib.raw_z, rel=RTOL)
        if step in (0, 4):
            for a, b in zip(pb, pe, strict=True):
                assert rel_err(a, b) < RTOL


def test_linear_boosting_with_ridge_is_algorithm_1_with_ridge():
    """The ridge γ of the weak learner (non-bias entries) is ExactLNB's ridge (§3.4); z is then
    ⟨h, t⟩ = θ̂·g, not ‖h‖²."""
    X, Y = problem("softmax_cross_entropy", seed=4)
    net = MLP([4, 5, 3], bias=True)
    params = net.init(np.random.default_rng(1))
    boost = BoostedBackprop(net, 0.05, LinearLeastSquares(bias=True, ridge=0.3))
    exact = ExactLNB(net.neurons, 0.05, ridge=0.3, relative_ridge=False)
    pb, _, ib = boost.step_batch(params, X, Y, boost.init(params))
    _, grads, feats = net.loss_grads_features(params, X, Y)
    pe, _, ie = exact.step(params, grads, feats, exact.init(params))
    assert ib.raw_z == pytest.approx(ie.raw_z, rel=RTOL)
    assert ib.squared_norm < ib.raw_z  # the ridge shrinks h: ‖h‖² = θ̂ᵀMθ̂ < θ̂ᵀ(M+γ)θ̂
    for a, b in zip(pb, pe, strict=True):
        assert rel_err(a, b) < RTOL


def test_unfolded_linear_ensemble_predicts_like_algorithm_1():
    """Keeping the linear weak learners in the ensemble (fold_linear=False) instead of folding
    them into θ gives the same network function: the strong-learner forward and backward (the
    VJP through the weak learners) are right. Same rounding argument as above."""
    X, Y = problem("mse", seed=5)
    net = MLP([4, 6, 3], activation="tanh", bias=True, loss="mse")
    params0 = net.init(np.random.default_rng(2))
    boost = BoostedBackprop(net, 0.03, LinearLeastSquares(bias=True), fold_linear=False)
    exact = ExactLNB(net.neurons, 0.03)
    pb, sb = params0, boost.init(params0)
    pe, se = params0, exact.init(params0)
    for _ in range(4):
        pb, sb, ib = boost.step_batch(pb, X, Y, sb)
        _, grads, feats = net.loss_grads_features(pe, X, Y)
        pe, se, _ = exact.step(pe, grads, feats, se)
        assert not any(ib.folded)
    assert all(rel_err(a, b) == 0 for a, b in zip(pb, params0, strict=True))  # θ untouched
    assert all(len(e) == 4 for e in sb["ensembles"])
    out = boost.model.predict(pb, sb["ensembles"], X)
    assert rel_err(out, net.predict(pe, X)) < RTOL


def test_strong_learner_backprop_matches_finite_differences():
    """With nonlinear weak learners in the ensemble, ∂ℓ/∂θ_0 from the strong-learner backprop
    (through the learners' vjp_input) matches central differences. Central differences with step
    h = 1e-6 have truncation error O(h²) ≈ 1e-12 and rounding ≈ eps·ℓ/h ≈ 1e-10 relative, so
    1e-6 is a safe bound."""
    X, Y = problem("softmax_cross_entropy", seed=6, n=30)
    net = MLP([4, 5, 3], activation="tanh", bias=True)
    params = net.init(np.random.default_rng(3))
    boost = BoostedBackprop(net, 0.1, RandomFeatureLeastSquares(n_features=8, seed=1))
    state = boost.init(params)
    for _ in range(2):
        params, state, _ = boost.step_batch(params, X, Y, state)
    tape = boost.model.backprop(params, state["ensembles"], X, Y)
    rng = np.random.default_rng(7)
    v = rng.normal(size=params[0].shape)
    h = 1e-6

    def loss_at(t):
        return boost.model.loss([params[0] + t * v, params[1]], state["ensembles"], X, Y)

    fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert np.vdot(tape.grads[0], v) == pytest.approx(fd, rel=1e-6)
    # with empty ensembles the strong-learner network is the plain network
    plain = net.backprop(params, X, Y)
    again = boost.model.backprop(params, boost.model.empty_ensembles(), X, Y)
    for a, b in zip(again.errors_pre, plain.errors_pre, strict=True):
        assert rel_err(a, b) < RTOL


def test_random_feature_fit_is_least_squares():
    """The nonlinear learner's β satisfies the normal equation ΨᵀΨβᵀ = Ψᵀt (ridge 0; lstsq on a
    well-conditioned 200×17 system: residual ≲ κ·eps relative, 1e-10 is generous), and so
    ⟨h, t⟩ = ‖h‖²."""
    rng = np.random.default_rng(8)
    X = rng.normal(size=(200, 3))
    T = np.sin(X @ rng.normal(size=(3, 2)))
    h = RandomFeatureLeastSquares(n_features=16, seed=2).fit(X, T)
    Psi = h.features(X)
    residual = Psi.T @ (Psi @ h.beta.T - T)
    assert np.linalg.norm(residual) < RTOL * np.linalg.norm(Psi.T @ T)
    H = h(X)
    assert np.sum(H * T) == pytest.approx(np.sum(H * H), rel=RTOL)
    # a refit draws new random features
    assert rel_err(RandomFeatureLeastSquares(16, seed=2).fit(X, T).A, h.A) == 0
    assert rel_err(h.fit(X, T).A, RandomFeatureLeastSquares(16, seed=2).fit(X, T).A) > 0.1
    # with a ridge the normal equation gains γβ on the feature coefficients
    hr = RandomFeatureLeastSquares(n_features=16, ridge=0.1, seed=2).fit(X, T)
    Psi = hr.features(X)
    reg = np.diag([0.1] * 16 + [0.0])
    res = (Psi.T @ Psi / 200 + reg) @ hr.beta.T - Psi.T @ T / 200
    assert np.linalg.norm(res) < RTOL * np.linalg.norm(Psi.T @ T / 200)


def test_nonlinear_boosting_decreases_the_loss():
    """On a tiny problem that a linear layer cannot fit (labels from circles), boosting with
    random-feature weak learners lowers the training loss substantially within a few steps, and
    each step has squared function-space length ε (z = Σ‖h_i‖² for exact LS fits)."""
    rng = np.random.default_rng(9)
    X = rng.normal(size=(80, 2))
    Y = (np.sum(X * X, axis=1) > 1.4).astype(int)
    net = MLP([2, 4, 2], activation="tanh", bias=True)
    params = net.init(np.random.default_rng(4))
    boost = BoostedBackprop(net, 0.1, RandomFeatureLeastSquares(n_features=24, seed=3))
    state = boost.init(params)
    first = net.loss(params, X, Y)
    for _ in range(8):
        params, state, info = boost.step_batch(params, X, Y, state)
        assert info.squared_norm == pytest.approx(info.raw_z, rel=RECURRENCE_RTOL)
        assert not any(info.folded)
    final = boost.model.loss(params, state["ensembles"], X, Y)
    assert final < 0.7 * first


def test_errors():
    with pytest.raises(ValueError, match="conv0"):
        BoostedNetwork(CNN((1, 6, 6), channels=(2,), strides=1, n_classes=3))
    net = MLP([3, 2])
    with pytest.raises(ValueError, match="vjp_input"):
        BoostedBackprop(net, 0.1, weak_learner=object())
    with pytest.raises(ValueError, match="ridge"):
        LinearLeastSquares(ridge=-1.0)
    with pytest.raises(ValueError, match="n_features"):
        RandomFeatureLeastSquares(n_features=0)
    with pytest.raises(ValueError, match="fit"):
        LinearLeastSquares()(np.zeros((2, 3)))


@given(
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    activation=st.sampled_from(["tanh", "relu", "sigmoid", "identity"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_boosting_is_algorithm_1_property(sizes, activation, bias, seed):
    """Random widths, activations and data: one linear boosting step is ExactLNB's step. A small
    ridge keeps M positive definite for every draw (dead relu units, rank-deficient hidden
    features); both sides use the same γ, so the comparison stays a rounding one (RTOL)."""
    rng = np.random.default_rng(seed)
    n, k = 30, 3
    X = correlated_features(rng, n, sizes[0])
    Y = rng.integers(0, k, size=n)
    net = MLP([*sizes, k], activation=activation, bias=bias)
    params = net.init(rng)
    boost = BoostedBackprop(net, 0.05, LinearLeastSquares(bias=bias, ridge=1e-3))
    exact = ExactLNB(net.neurons, 0.05, ridge=1e-3, relative_ridge=False)
    pb, _, ib = boost.step_batch(params, X, Y, boost.init(params))
    _, grads, feats = net.loss_grads_features(params, X, Y)
    pe, _, ie = exact.step(params, grads, feats, exact.init(params))
    assert ib.raw_z == pytest.approx(ie.raw_z, rel=RTOL)
    for a, b in zip(pb, pe, strict=True):
        assert rel_err(a, b) < RTOL


def test_weight_decay_shrinks_the_ensemble_and_minibatches_work():
    """Eq. 4's decay multiplies θ and every earlier coefficient by 1 − √ε·ρ; the new learner
    enters with −√(ε/z). Steps on different minibatches each add one learner per layer."""
    X, Y = problem("softmax_cross_entropy", seed=10, n=60)
    net = MLP([4, 5, 3], bias=True)
    params = net.init(np.random.default_rng(5))
    eps, rho = 0.04, 2.0
    boost = BoostedBackprop(net, eps, RandomFeatureLeastSquares(8, seed=4), weight_decay=rho)
    state = boost.init(params)
    p1, state, info1 = boost.step_batch(params, X[:30], Y[:30], state)
    p2, state, info2 = boost.step_batch(p1, X[30:], Y[30:], state)
    decay = 1 - np.sqrt(eps) * rho
    for i, ens in enumerate(state["ensembles"]):
        assert len(ens) == 2
        assert ens[0][0] == pytest.approx(-np.sqrt(eps / info1.z) * decay, rel=1e-14)
        assert ens[1][0] == pytest.approx(-np.sqrt(eps / info2.z), rel=1e-14)
        assert rel_err(p2[i], decay**2 * params[i]) < 1e-14
