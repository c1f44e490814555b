"""lnb_fast's LocoProp-S, LocoProp-M and ProxProp against their lnb_ref twins (float64).

* Discovery records each neuron's transfer φ: a tanh MLP's hidden neurons get ``"tanh"``, its
  output neuron ``"identity"``; ``jax.nn.relu`` / ``jnp.maximum(·, 0)`` give ``"relu"``,
  ``jax.nn.sigmoid`` ``"sigmoid"``; an output read twice keeps ``"identity"``.
* Per neuron (hypothesis over :func:`lnb.testing.strategies.local_problems`: random dense and
  convolutional neurons, both layouts, with and without bias): the step-size bound B,
  LocoProp's inner loop (S, and M with every transfer) and ProxProp's CG step, at 1e-10.
* Whole steps on lnb_ref's tanh MLP and ReLU CNN (the JAX losses of
  :mod:`lnb.testing.crosscheck`), parameters after every step at 1e-9.

Tolerances (:mod:`lnb.testing.tolerances`; the module is marked ``x64``): both sides are float64
and differ only in the order of summation (XLA vs NumPy/BLAS): ``rounding`` (1e-10) per neuron,
``steps`` (1e-9) for whole steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import lnb_fast  # noqa: E402
from lnb.testing import correlated_features, rel_err  # noqa: E402
from lnb.testing.crosscheck import cnn_loss, compare_steps, mlp_loss, ref_to_jax  # noqa: E402
from lnb.testing.strategies import local_problems  # noqa: E402
from lnb.testing.tolerances import RTOL, STEP_RTOL  # noqa: E402
from lnb_fast.locoprop import local_step, metric_bound  # noqa: E402
from lnb_fast.proxprop import proximal_step  # noqa: E402
from lnb_ref import LocoPropM, LocoPropS, ProxProp  # noqa: E402
from lnb_ref import locoprop as ref_locoprop  # noqa: E402
from lnb_ref import proxprop as ref_proxprop  # noqa: E402
from lnb_ref.network import CNN, MLP  # noqa: E402

pytestmark = pytest.mark.x64  # both sides in float64


# --- transfer detection ---------------------------------------------------------------------------
def transfers(loss, params, *batch):
    table = lnb_fast.value_and_grad(loss).table(params, *batch)
    return [n.transfer for n in table.neurons]


def test_transfer_of_a_tanh_mlp_and_a_relu_cnn():
    net = MLP([5, 7, 6, 3], activation="tanh")
    params = ref_to_jax(net, net.init(np.random.default_rng(0)))
    batch = (jnp.ones((4, 5)), jnp.zeros(4, int))
    assert transfers(mlp_loss(net.sizes), params, batch) == ["tanh", "tanh", "identity"]
    cnn = CNN((2, 6, 6), channels=(3, 4), n_classes=3)
    params = ref_to_jax(cnn, cnn.init(np.random.default_rng(0)))
    batch = (jnp.ones((2, 2, 6, 6)), jnp.zeros(2, int))
    assert transfers(cnn_loss(cnn), params, batch) == ["relu", "relu", "identity"]


def test_transfer_variants():
    w = {f"w{i}": jnp.ones((3, 3)) for i in range(6)}
    w["b1"] = jnp.ones(3)

    def loss(p, x):
        h = jax.nn.sigmoid(x @ p["w0"])  # no bias
        h = jnp.maximum(h @ p["w1"] + p["b1"], 0.0)  # the primitive max, after a bias
        h = jnp.tanh(h @ p["w2"])
        y = h @ p["w3"]
        h = jnp.tanh(y) + y  # the output is read twice: no transfer
        h = jnp.maximum(0.0, jax.nn.gelu(h @ p["w4"]))  # gelu is not one of ours
        return jnp.sum(jnp.maximum(0.0, h @ p["w5"]))  # max(0, ·): relu too

    assert transfers(loss, w, jnp.ones((4, 3))) == [
        "sigmoid",
        "relu",
        "tanh",
        "identity",
        "identity",
        "relu",
    ]


# --- one neuron, fast against reference -----------------------------------------------------------
@settings(max_examples=8)
@given(local_problems())
def test_neuron_matches_reference(problem):
    case, seed, transfer, kappa, steps, tau = problem
    rng = np.random.default_rng(seed)
    shape = case.ref.theta_shape
    theta, g = rng.normal(size=shape), rng.normal(size=shape)
    neuron = case.neuron(case.from_ref(g))
    G = case.from_ref
    eta = 0.7

    def to_ref(leaves):
        return case.to_ref(dict(zip(G(g), leaves, strict=True)))

    @jax.jit
    def fast(X, theta, g):
        return (
            metric_bound(neuron, X),
            local_step(neuron, X, theta, g, eta, kappa, steps, "auto", "identity"),
            local_step(neuron, X, theta, g, eta, kappa, steps, "auto", transfer),
            local_step(neuron, X, theta, g, eta, kappa, steps, 0.01, transfer),
            proximal_step(neuron, X, g, tau, steps),
        )

    bound, s, m, m_fixed, prox = fast(case.X_jax, tuple(G(theta).values()), tuple(G(g).values()))
    X = case.X_ref
    ref = case.ref
    # The auto step's bound B (Gershgorin on |X|).
    assert abs(float(bound) - ref_locoprop.metric_bound(ref, X)) <= RTOL * float(bound)
    # LocoProp-S: Δ_J of the inner loop.
    s_ref = ref_locoprop.inner_iterates(ref, X, theta, g, eta, kappa, steps)[-1]
    assert rel_err(to_ref(s), s_ref) < RTOL
    # LocoProp-M with this transfer, auto and fixed ρ.
    for ours, rho in ((m, "auto"), (m_fixed, 0.01)):
        m_ref = ref_locoprop.inner_iterates(ref, X, theta, g, eta, kappa, steps, rho, transfer)
        assert rel_err(to_ref(ours), m_ref[-1]) < RTOL
    # ProxProp: `steps` CG iterations from 0 on (I + τ M) Δ = −τ g.
    p_ref = ref_proxprop.proximal_step(ref, X, g, tau, "cg", steps)[-1]
    assert rel_err(to_ref(prox), p_ref) < RTOL


# --- whole steps on the reference's networks ------------------------------------------------------
def mlp_problem():
    rng = np.random.default_rng(5)
    X = correlated_features(rng, 200, 8)
    Y = rng.integers(0, 3, size=200)
    net = MLP([8, 10, 6, 3], activation="tanh")
    return net, mlp_loss(net.sizes), X, Y


def cnn_problem():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(60, 2, 6, 6)) + 0.5
    Y = rng.integers(0, 3, size=60)
    net = CNN((2, 6, 6), channels=(3, 4), kernel_size=3, strides=(1, 2), padding=1, n_classes=3)
    return net, cnn_loss(net), X, Y


def optimizers(net, method):
    """The same method on both sides, every option explicit."""
    if method == "locoprop_s":
        return (
            LocoPropS(net.neurons, 0.5, proximity=1e-2, inner_steps=4),
            lnb_fast.locoprop_s(0.5, 1e-2, inner_steps=4),
        )
    if method == "locoprop_m":
        return (
            LocoPropM(net, 0.5, proximity=1e-2, inner_steps=4),
            lnb_fast.locoprop_m(0.5, 1e-2, inner_steps=4),
        )
    return ProxProp(net.neurons, 0.5, solver="cg", cg_iterations=3), lnb_fast.proxprop(
        0.5, cg_iterations=3
    )


@pytest.mark.parametrize("method", ["locoprop_s", "locoprop_m", "proxprop"])
@pytest.mark.parametrize("problem", [mlp_problem, cnn_problem], ids=["mlp", "cnn"])
def test_whole_steps_match_reference(problem, method):
    net, loss, X, Y = problem()
    ref_opt, fast_opt = optimizers(net, method)
    worst, _, decrease = compare_steps(
        net, loss, X, Y, ref_opt, lambda table: fast_opt, steps=6, batch=32
    )
    assert worst < STEP_RTOL
    assert worst > 0  # the two runs are really two computations
    assert decrease < 0  # and the method trains


def test_locoprop_m_uses_the_transfer():
    """On the tanh MLP, LocoProp-M's step differs from LocoProp-S's (the hidden neurons' local
    losses are matched to tanh), while the output neuron (identity) takes the same step."""
    net, loss, X, Y = mlp_problem()
    params = ref_to_jax(net, net.init(np.random.default_rng(0)))
    batch = (jnp.asarray(X[:32]), jnp.asarray(Y[:32]))
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
    out = {}
    for name in ("locoprop_s", "locoprop_m"):
        opt = getattr(lnb_fast, name)(0.5, 1e-2, inner_steps=4)
        out[name], _ = opt.update(grads, opt.init(params), params, features=feats)
    for i in (0, 1):
        assert rel_err(out["locoprop_m"][i]["w"], out["locoprop_s"][i]["w"]) > 1e-6
    assert rel_err(out["locoprop_m"][2]["w"], out["locoprop_s"][2]["w"]) < RTOL


# --- arguments and errors -------------------------------------------------------------------------
def test_errors_name_what_is_missing():
    net, loss, X, Y = mlp_problem()
    params = ref_to_jax(net, net.init(np.random.default_rng(0)))
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, (jnp.asarray(X), jnp.asarray(Y)))
    for opt in (lnb_fast.locoprop_s(0.1), lnb_fast.locoprop_m(0.1), lnb_fast.proxprop(0.1)):
        state = opt.init(params)
        with pytest.raises(ValueError, match="needs the parameters"):
            opt.update(grads, state, features=feats)
        with pytest.raises(TypeError, match="needs the neurons' input features"):
            opt.update(grads, state, params)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan) if g.ndim == 1 else g, grads)
    with pytest.raises(lnb_fast.NonFiniteError, match=r"\[0\]\['b'\]"):
        lnb_fast.locoprop_s(0.1, nonfinite="raise").update(bad, state, params, features=feats)
    skip = lnb_fast.proxprop(0.1, nonfinite="skip")
    updates, new_state = skip.update(bad, skip.init(params), params, features=feats)
    assert int(new_state.skipped) == 1 and int(new_state.count) == 0
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
    for make, kwargs, match in [
        (lnb_fast.locoprop_s, {"proximity": -1.0}, "proximity"),
        (lnb_fast.locoprop_m, {"inner_steps": 0}, "inner_steps"),
        (lnb_fast.locoprop_s, {"inner_learning_rate": "fast"}, "inner_learning_rate"),
        (lnb_fast.locoprop_s, {"nonfinite": "ignore"}, "nonfinite"),
    ]:
        with pytest.raises(ValueError, match=match):
            make(0.1, **kwargs)
    with pytest.raises(ValueError, match="tau"):
        lnb_fast.proxprop(0.0)
    with pytest.raises(ValueError, match="cg_iterations"):
        lnb_fast.proxprop(0.1, cg_iterations=0)
