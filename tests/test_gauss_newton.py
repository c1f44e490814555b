"""Gauss-Newton, GGN, Fisher and LNB as materialised metrics on tiny MLPs (§2.2, §4.2).

Tolerance: unless stated otherwise, the compared quantities are the same sums of products of
O(1) numbers taken in a different order (einsum over samples vs. matrix products, Cholesky of a
well-conditioned matrix), so they agree to rounding, ``κ·P·eps`` ≲ 1e-12 for P ≤ 60 here; we use
``RTOL = 1e-10``.
"""

from __future__ import annotations

import numpy as np
import pytest

from lnb.testing import rel_err, teacher_problem
from lnb.testing.tolerances import RTOL
from lnb_ref import (
    MLP,
    ExactLNB,
    NotPositiveDefiniteError,
    SecondOrder,
    empirical_fisher_metric,
    expand_row_metric,
    fisher_metric,
    gauss_newton_metric,
    ggn_metric,
    lnb_metric,
    metric_from_forward,
    network_jacobian,
    row_metric,
)
from lnb_ref.gauss_newton import flatten, metric_matrix, unflatten


def problem(loss: str, seed: int, n: int = 12, d: int = 3):
    return teacher_problem(loss, seed, n, d)


def tiny(loss="softmax_cross_entropy", bias=True, seed=0, **kw):
    net = MLP([3, 4, 3], activation="tanh", bias=bias, loss=loss, **kw)
    return net, net.init(np.random.default_rng(seed))


@pytest.mark.parametrize("output_activation", [None, "sigmoid"])
def test_jacobian_matches_finite_differences_and_gives_the_gradient(output_activation):
    """Each column of J against a central difference of the output. With h = 1e-5 the
    truncation error is O(h²·|ŷ'''|) ≈ 1e-10 and the rounding eps·|ŷ|/h ≈ 1e-11 (outputs O(1)),
    so 1e-7 relative over the whole matrix is safe. And Σ_s J_sᵀλ_s is backprop's gradient
    (rounding only, RTOL)."""
    net, params = tiny(loss="mse", output_activation=output_activation)
    X, Y = problem("mse", seed=1)
    J = network_jacobian(net, params, X)
    theta = flatten(params)
    h = 1e-5
    J_fd = np.empty_like(J)
    for p in range(theta.size):
        e = np.zeros(theta.size)
        e[p] = h
        plus = net.predict(unflatten(net, theta + e), X)
        minus = net.predict(unflatten(net, theta - e), X)
        J_fd[:, p] = ((plus - minus) / (2 * h)).ravel()
    assert rel_err(J, J_fd) < 1e-7
    tape = net.backprop(params, X, Y)
    lam = tape.errors_post[-1]  # ∂ℓ/∂ŷ (the mean loss's, with its 1/n)
    assert rel_err(J.T @ lam.ravel(), flatten(tape.grads)) < RTOL


def test_ggn_equals_fisher_for_softmax_cross_entropy():
    """The explicit expectation over the model's labels equals Jᵀ(diag p − ppᵀ)J; and the
    empirical Fisher (observed labels) is a different matrix."""
    net, params = tiny()
    X, Y = problem("softmax_cross_entropy", seed=2)
    G = ggn_metric(net, params, X)
    assert rel_err(fisher_metric(net, params, X), G) < RTOL
    assert rel_err(empirical_fisher_metric(net, params, X, Y), G) > 0.1
    # softmax's Hessian has the null vector 1 (adding a constant to every logit): GGN is
    # singular along the last layer's bias direction that shifts all logits equally
    v = np.zeros(net.n_params)
    last = net.neurons[-1]
    v[-last.n_params :] = np.asarray(last.bias_mask(), float).ravel()
    assert np.linalg.norm(G @ v) < 1e-12 * np.linalg.norm(G)


def test_ggn_is_twice_gn_for_mse_and_equals_fisher():
    net, params = tiny(loss="mse")
    X, _ = problem("mse", seed=3)
    GN = gauss_newton_metric(net, params, X)
    assert rel_err(ggn_metric(net, params, X), 2 * GN) < RTOL
    assert rel_err(fisher_metric(net, params, X), 2 * GN) < RTOL


def test_empirical_fisher_from_per_sample_backprop():
    """(1/n) Σ_s ∇l_s ∇l_sᵀ with ∇l_s from backprop on the single sample s."""
    net, params = tiny()
    X, Y = problem("softmax_cross_entropy", seed=4)
    grads = [flatten(net.backprop(params, X[s : s + 1], Y[s : s + 1]).grads) for s in range(12)]
    G = np.stack(grads)
    assert rel_err(empirical_fisher_metric(net, params, X, Y), G.T @ G / 12) < RTOL


@pytest.mark.parametrize("bias", [True, False])
def test_lnb_metric_is_block_diagonal_of_neuron_metrics(bias):
    net, params = tiny(bias=bias)
    X, _ = problem("softmax_cross_entropy", seed=5)
    M = lnb_metric(net, params, X, ridge=0.1)
    feats = [rec.features for rec in net.forward(params, X)]
    a = net.neurons[0].n_params
    first, second = net.neurons
    assert rel_err(M[:a, :a], metric_from_forward(first, feats[0], 0.1)) < RTOL
    assert rel_err(M[a:, a:], expand_row_metric(second, row_metric(second, feats[1], 0.1))) < RTOL
    assert not M[:a, a:].any() and not M[a:, :a].any()


def test_gn_last_block_equals_lnb_last_block_without_output_activation():
    """§4.2: with no activation after the last neuron the network output is that neuron's
    output, so GN's last diagonal block is the neuron's metric; the first block is not (it
    carries the downstream Jacobian)."""
    for loss in ("mse", "softmax_cross_entropy"):
        net, params = tiny(loss=loss)
        X, _ = problem(loss, seed=6)
        GN, L = gauss_newton_metric(net, params, X), lnb_metric(net, params, X)
        a = net.neurons[0].n_params
        assert rel_err(GN[a:, a:], L[a:, a:]) < RTOL
        assert rel_err(GN[:a, :a], L[:a, :a]) > 0.1
    # with a sigmoid on the output the last blocks differ
    net, params = tiny(loss="mse", output_activation="sigmoid")
    X, _ = problem("mse", seed=6)
    GN, L = gauss_newton_metric(net, params, X), lnb_metric(net, params, X)
    assert rel_err(GN[a:, a:], L[a:, a:]) > 0.1


@pytest.mark.parametrize(("bias", "loss"), [(True, "softmax_cross_entropy"), (False, "mse")])
def test_lnb_metric_step_is_algorithm_1(bias, loss):
    net, params = tiny(loss=loss, bias=bias)
    X, Y = problem(loss, seed=7)
    opt = SecondOrder(net, 0.04, metric="lnb")
    exact = ExactLNB(net.neurons, 0.04)
    p1, s1, i1 = opt.step_batch(params, X, Y, opt.init(params))
    _, grads, feats = net.loss_grads_features(params, X, Y)
    p2, _, i2 = exact.step(params, grads, feats, exact.init(params))
    assert i1.z == pytest.approx(i2.z, rel=RTOL)
    for a, b in zip(p1, p2, strict=True):
        assert rel_err(a, b) < RTOL
    assert s1["t"] == 1


@pytest.mark.parametrize("metric", ["gn", "ggn", "fisher", "empirical_fisher", "lnb", "identity"])
def test_step_has_squared_length_epsilon_in_the_metric(metric):
    """α² θ̂ᵀ(M + δI)θ̂ = ε (Eq. 1–2), and a small step lowers the loss."""
    net, params = tiny(seed=1)
    X, Y = problem("softmax_cross_entropy", seed=8)
    eps, damping = 1e-3, 1e-2
    opt = SecondOrder(net, eps, metric=metric, damping=damping)
    new, _, info = opt.step_batch(params, X, Y, opt.init(params))
    A = metric_matrix(metric, net, params, X, Y) + damping * np.eye(net.n_params)
    delta = flatten(new) - flatten(params)
    assert delta @ A @ delta == pytest.approx(eps, rel=RTOL)
    assert rel_err(delta, -np.sqrt(eps / info.z) * flatten(info.directions)) < RTOL
    assert net.loss(new, X, Y) < net.loss(params, X, Y)


def test_errors():
    net, params = tiny()
    X, Y = problem("softmax_cross_entropy", seed=9)
    with pytest.raises(ValueError, match="unknown metric"):
        SecondOrder(net, 0.1, metric="newton")
    with pytest.raises(ValueError, match="damping"):
        SecondOrder(net, 0.1, damping=-1.0)
    opt = SecondOrder(net, 0.1, metric="ggn")  # singular: softmax's null vector, no damping
    with pytest.raises(NotPositiveDefiniteError, match="metric='ggn'.*damping > 0"):
        opt.step_batch(params, X, Y, opt.init(params))
    with pytest.raises(ValueError, match="expected"):
        unflatten(net, np.zeros(3))
