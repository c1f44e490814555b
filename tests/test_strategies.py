"""Metric strategies of ``lnb_fast.lnb`` (matrix-free, gram, covariance), FOOF in both backends,
the cost model and ``describe``'s strategy column.

Tolerances (float64 on both sides: the module is marked ``x64``; :mod:`lnb.testing.tolerances`):
the gram strategy runs the same PCG as matrix-free with products on ``C = ΦᵀΦ/n`` instead of a
forward and a VJP, so the two differ only in summation order (``rounding``, 1e-10, as
tests/test_fast_crosscheck.py). The covariance strategy and FOOF invert ``A + γ`` by Cholesky on
both sides (lnb_fast stores the inverse, lnb_ref the factor): again ``κ · eps`` per solve. Whole
steps compound that over ≤ 12 steps and the network's nonlinearity (``steps``, 1e-9).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import COMPILED
from hypothesis import given, settings

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import lnb_fast  # noqa: E402
from lnb.testing import correlated_features, rel_err  # noqa: E402
from lnb.testing.crosscheck import (  # noqa: E402
    cnn_loss,
    compare_steps,
    conv_case,
    dense_case,
    mlp_loss,
)
from lnb.testing.strategies import problems  # noqa: E402
from lnb.testing.tolerances import RTOL, STEP_RTOL  # noqa: E402
from lnb_fast.covariance import gram, gram_layout, gram_matvec  # noqa: E402
from lnb_fast.strategy import choose, cost  # noqa: E402
from lnb_ref import CNN, FOOF, MLP, CovarianceLNB, ExactLNB, OnlineLNB  # noqa: E402
from lnb_ref.metric import metric_matvec  # noqa: E402
from lnb_ref.solvers import design_moments, paper_preconditioner, pcg  # noqa: E402

pytestmark = pytest.mark.x64  # both sides in float64


# --- one neuron: gram == matrix-free == lnb_ref ------------------------------------------------


@settings(max_examples=COMPILED)
@given(problems())
def test_gram_pcg_matches_matrix_free_and_reference(problem):
    """Every PCG iterate with products on the Gram equals matrix-free's and lnb_ref's."""
    case, seed, ridge, iterations, warm = problem
    rng = np.random.default_rng(seed)
    shape = case.ref.theta_shape
    g, x0 = rng.normal(size=shape), rng.normal(size=shape)
    neuron = case.neuron(case.from_ref(g))
    layout = gram_layout(neuron)
    assert not isinstance(layout, str), layout  # every dense/conv case has a design

    def solve(X, g, x0):
        mean, second = neuron.moments(X)
        P = neuron.preconditioner(mean, second, ridge)
        C, mu = gram(layout, X, neuron.n_samples)
        out = []
        for matvec in (
            lambda v: gram_matvec(layout, C, mu, v, ridge),
            lambda v: neuron.metric_matvec(X, v, ridge),
        ):
            out.append(lnb_fast.pcg(matvec, g, iterations, P, x0 if warm else None).iterates)
        return out

    leaves = [tuple(case.from_ref(a).values()) for a in (g, x0)]
    gram_its, free_its = jax.jit(solve)(case.X_jax, *leaves)
    mu_ref, chi_ref = design_moments(case.ref, case.X_ref)
    ref = pcg(
        lambda u: metric_matvec(case.ref, case.X_ref, u, ridge),
        g,
        iterations,
        precondition=paper_preconditioner(case.ref, mu_ref, chi_ref, ridge),
        x0=x0 if warm else None,
    )
    names = list(case.from_ref(g))
    to_ref = lambda leaves: case.to_ref(dict(zip(names, leaves, strict=True)))  # noqa: E731
    assert len(gram_its) == len(ref.iterates) == iterations
    for ours, free, theirs in zip(gram_its, free_its, ref.iterates, strict=True):
        assert rel_err(to_ref(ours), theirs) < RTOL
        assert rel_err(to_ref(ours), to_ref(free)) < RTOL


# --- whole steps ----------------------------------------------------------------------------------
def mlp_problem():
    rng = np.random.default_rng(5)
    X, Y = correlated_features(rng, 300, 12), rng.integers(0, 4, size=300)
    net = MLP([12, 16, 10, 4], activation="tanh")
    return net, mlp_loss(net.sizes), X, Y, 64


def cnn_problem():
    rng = np.random.default_rng(6)
    X, Y = rng.normal(size=(120, 2, 8, 8)) + 0.5, rng.integers(0, 3, size=120)
    net = CNN((2, 8, 8), channels=(3, 4), kernel_size=3, strides=(1, 2), padding=1, n_classes=3)
    return net, cnn_loss(net), X, Y, 32


PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem}


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize(("model", "strategy"), [("mlp", "gram"), ("cnn", "gram"), ("cnn", "auto")])
def test_gram_steps_match_online_lnb(model, strategy, compact):
    """Algorithm 2 with every neuron forced to the gram strategy (or auto's mix), against
    OnlineLNB; ``compact``: with ``neurons=``, the moments are stored as (G, d) rows."""
    net, loss, X, Y, batch = PROBLEMS[model]()
    kw = dict(weight_decay=0.1, ridge=1e-3, z0=1e-4, b1=0.9, b2=0.99)
    ref = OnlineLNB(net.neurons, 0.05, **kw)

    def fast(table):
        return lnb_fast.lnb(0.05, strategy=strategy, neurons=table if compact else None, **kw)

    params_err, loss_err = compare_steps(net, loss, X, Y, ref, fast, steps=10, batch=batch)[:2]
    assert loss_err <= STEP_RTOL and params_err < STEP_RTOL, (params_err, loss_err)


@pytest.mark.parametrize(("model", "covariance_every"), [("mlp", 1), ("cnn", 1), ("mlp", 2)])
def test_covariance_steps_match_reference(model, covariance_every):
    """The covariance strategy against CovarianceLNB over 8 steps with a refresh every 3 (steps
    1, 4, 7 refactor; the others solve against a stale inverse while the EMA moves on), the EMA
    updated every step or every other step."""
    net, loss, X, Y, batch = PROBLEMS[model]()
    kw = dict(weight_decay=0.1, ridge=1e-3, z0=1e-4, b1=0.9, b2=0.9)
    every = dict(refresh_every=3, covariance_every=covariance_every)
    ref = CovarianceLNB(net.neurons, 0.05, **every, **kw)

    def fast(table):
        return lnb_fast.lnb(0.05, strategy="covariance", neurons=table, **every, **kw)

    params_err, loss_err = compare_steps(net, loss, X, Y, ref, fast, steps=8, batch=batch)[:2]
    assert loss_err <= STEP_RTOL and params_err < STEP_RTOL, (params_err, loss_err)
    assert params_err > 0  # the parameters did move apart from rounding, and stayed within 1e-9


@pytest.mark.parametrize("model", PROBLEMS)
def test_foof_matches_reference(model):
    """lnb_fast.foof against lnb_ref.FOOF, refreshed every 3 steps, EMA every 2."""
    net, loss, X, Y, batch = PROBLEMS[model]()
    ref = FOOF(net.neurons, 0.05, damping=1e-2, b2=0.9, refresh_every=3, covariance_every=2)

    def fast(table):
        return lnb_fast.foof(0.05, 1e-2, b2=0.9, refresh_every=3, covariance_every=2, neurons=table)

    params_err, loss_err = compare_steps(net, loss, X, Y, ref, fast, steps=8, batch=batch)[:2]
    assert loss_err <= STEP_RTOL and params_err < STEP_RTOL, (params_err, loss_err)


def test_covariance_is_stale_between_refreshes():
    """Refreshing every step and every 3 steps give different parameters (staleness is real),
    so the test above exercises it."""
    net, loss, X, Y, batch = mlp_problem()
    out = []
    for every in (1, 3):
        ref = CovarianceLNB(net.neurons, 0.05, ridge=1e-3, b2=0.5, refresh_every=every)
        thetas = net.init(np.random.default_rng(0))
        state = ref.init(thetas)
        for i in range(3):
            idx = np.arange(i * batch, (i + 1) * batch)
            _, grads, feats = net.loss_grads_features(thetas, X[idx], Y[idx])
            thetas, state, _ = ref.step(thetas, grads, feats, state)
        out.append(thetas)
    assert max(rel_err(a, b) for a, b in zip(*out, strict=True)) > 1e-6


# --- FOOF equals LNB on bias-free neurons --------------------------------------------------------
BIAS_FREE = {
    "dense": lambda rng: dense_case(rng, 30, 6, 4, False, "x@w"),
    "conv": lambda rng: conv_case(rng, 2, 2, 4, 6, 3, 1, 1, 1, 1, False, "NHWC"),
}


@pytest.mark.parametrize("kind", BIAS_FREE)
def test_foof_direction_is_exact_lnb_without_bias(kind):
    """b2 = 0, refresh every step: FOOF's direction is Algorithm 1's M⁻¹g with ridge = damping,
    in lnb_ref and through lnb_fast.foof (direction = −update/lr)."""
    rng = np.random.default_rng(3)
    case = BIAS_FREE[kind](rng)
    g = rng.normal(size=case.ref.theta_shape)
    theta = rng.normal(size=case.ref.theta_shape)
    exact = ExactLNB([case.ref], 1.0, ridge=0.1, relative_ridge=False).directions(
        [g], [case.X_ref]
    )[0]

    foof = FOOF([case.ref], 0.5, damping=0.1, b2=0.0, refresh_every=1)
    _, _, info = foof.step([theta], [g], [case.X_ref], foof.init([theta]))
    assert rel_err(info.directions[0], exact) < RTOL

    params = case.from_ref(theta)
    vgf = lnb_fast.value_and_grad(lambda p, x: jnp.sum(case.apply(p, x)))
    _, _, features = vgf(params, case.X_jax)
    opt = lnb_fast.foof(0.5, 0.1, b2=0.0, refresh_every=1, neurons=features.table)
    updates, _ = opt.update(case.from_ref(g), opt.init(params), params, features=features)
    direction = case.to_ref(jax.tree.map(lambda u: -u / 0.5, updates))
    assert rel_err(direction, exact) < RTOL


# --- the cost model -------------------------------------------------------------------------------
def test_cost_model_prefers_gram_for_small_d_and_large_n():
    """For n ≫ d the Gram's cost is dominated by 2nd² and matrix-free's by (k+1)·4ndK, so
    gram/matrix-free → d / (2(k+1)K): a 3×3 convolution 1 → 16 channels on 256 images of 28×28
    (d = 9, K = 16, n = 200 704) costs 9/96 of matrix-free; 16 → 32 channels (d = 144) 3/4."""
    n = 256 * 28 * 28
    for d, K in ((9, 16), (144, 32)):
        flops = cost(n=n, d=d, K=K)
        ratio = flops["gram"] / flops["matrix-free"]
        assert ratio == pytest.approx(d / (2 * 3 * K), rel=1e-2)
        assert ratio < 1


def test_auto_flips_where_the_formulas_cross():
    """Dense n = 40, d = 12, k = 2 iterations: gram < matrix-free ⇔ 2nd² + 6d²K < 12ndK ⇔
    K > nd / (3(2n − d)) = 2.35, so K = 2 is matrix-free and K = 3 gram — on real neurons."""
    rng = np.random.default_rng(0)
    picks = {}
    for K in (2, 3):
        case = dense_case(rng, 40, 12, K, False, "x@w")
        neuron = case.neuron(case.from_ref(rng.normal(size=case.ref.theta_shape)))
        choice = choose(neuron, "auto", cg_iterations=2)
        assert choice.flops == cost(40, 12, K, cg_iterations=2)
        picks[K] = choice.name
    assert picks == {2: "matrix-free", 3: "gram"}
    assert 40 * 12 / (3 * (2 * 40 - 12)) == pytest.approx(2.35, abs=0.01)
    # The classifier head of the paper's MLP (n = 1000, d = 800, K = 10) stays matrix-free.
    head = cost(1000, 800, 10)
    assert head["matrix-free"] < head["gram"]


def test_auto_never_picks_covariance():
    """Covariance is a different algorithm: even where its model cost is the lowest, auto picks
    between matrix-free and gram."""
    rng = np.random.default_rng(0)
    case = dense_case(rng, 400, 3, 6, False, "x@w")
    neuron = case.neuron(case.from_ref(rng.normal(size=case.ref.theta_shape)))
    choice = choose(neuron, "auto")
    assert choice.flops["covariance"] < min(choice.flops["gram"], choice.flops["matrix-free"])
    assert choice.name == "gram"


# --- describe, errors, state ----------------------------------------------------------------------
def scale_loss(p, x):
    return jnp.sum(jnp.tanh((x @ p["w"]) * p["s"]))


SCALE_PARAMS = {"w": jnp.ones((3, 4)), "s": jnp.ones(4)}


def test_describe_shows_the_strategy():
    rows = lnb_fast.describe(scale_loss, SCALE_PARAMS, jnp.ones((5, 3)), print_table=False)
    by_path = {r["parameter"]: r["strategy"] for r in rows}
    assert by_path["['s']"].startswith("matrix-free (a scale neuron")
    assert by_path["['w']"].split()[0] in ("gram", "matrix-free") and "FLOP" in by_path["['w']"]
    forced = lnb_fast.describe(
        scale_loss,
        SCALE_PARAMS,
        jnp.ones((5, 3)),
        print_table=False,
        strategy={"['w']": "covariance"},
    )
    assert {r["parameter"]: r["strategy"] for r in forced}["['w']"].startswith("covariance (")


def test_forcing_an_impossible_strategy_names_the_parameter():
    params, x = SCALE_PARAMS, jnp.ones((5, 3))
    vgf = lnb_fast.value_and_grad(scale_loss)
    _, grads, features = vgf(params, x)
    opt = lnb_fast.lnb(0.1, strategy="gram")
    with pytest.raises(ValueError, match=r"strategy 'gram' for parameter \['s'\]"):
        opt.update(grads, opt.init(params), params, features=features)
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        lnb_fast.lnb(0.1, strategy={"['nope']": "gram"}, neurons=features.table)
    with pytest.raises(ValueError, match="strategy must be one of"):
        lnb_fast.lnb(0.1, strategy="fast")
    with pytest.raises(ValueError, match="neurons="):
        lnb_fast.lnb(0.1, strategy="covariance")
    with pytest.raises(ValueError, match="neurons="):
        lnb_fast.foof(0.1)


def test_compact_moments_with_neurons():
    """With ``neurons=`` the moments of a dense neuron are one row (1, d_in) (a scale neuron's
    stay weight-shaped); without, they are shaped like the weight."""
    x = jnp.ones((5, 3))
    table = lnb_fast.value_and_grad(scale_loss).table(SCALE_PARAMS, x)
    compact = lnb_fast.lnb(0.1, neurons=table).init(SCALE_PARAMS)
    assert compact.mean["w"].shape == compact.second_moment["w"].shape == (1, 3)
    assert compact.mean["s"].shape == (4,)
    assert lnb_fast.lnb(0.1).init(SCALE_PARAMS).mean["w"].shape == (3, 4)
    cov = lnb_fast.lnb(0.1, strategy={"['w']": "covariance"}, neurons=table).init(SCALE_PARAMS)
    # a (1,) placeholder (orbax cannot save zero-size arrays)
    assert cov.mean["w"].shape == (1,) and cov.covariance[0][0].shape == (1, 3, 3)


def test_no_gradient_ema_in_the_state_when_b1_is_zero():
    params = {"w": jnp.ones((3, 4))}
    assert lnb_fast.lnb(0.1, b1=0.0).init(params).grad_ema is None
    n_leaves = lambda s: len(jax.tree.leaves(s))  # noqa: E731
    assert (
        n_leaves(lnb_fast.lnb(0.1, b1=0.9).init(params))
        == n_leaves(lnb_fast.lnb(0.1, b1=0.0).init(params)) + 1
    )


def test_neurons_from_another_batch_size():
    """``neurons=`` traced on a batch of 5, steps on batches of 7: each step plans on its own
    trace (its own n_i), and the compact/covariance state fits both."""
    params = {"w": jnp.ones((3, 4)) / 3, "b": jnp.zeros(4)}

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

    vgf = lnb_fast.value_and_grad(loss)
    table = vgf.table(params, jnp.ones((5, 3)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 3)))
    for opt in (
        lnb_fast.lnb(0.1, strategy="gram", neurons=table),
        lnb_fast.lnb(0.1, strategy="covariance", neurons=table),
        lnb_fast.foof(0.1, neurons=table),
    ):
        _, grads, features = vgf(params, x)
        # jitted: one compilation instead of one per operation
        updates = jax.jit(
            lambda g, f, opt=opt: opt.update(g, opt.init(params), params, features=f)[0]
        )(grads, features)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
        assert float(jnp.abs(updates["w"]).sum()) > 0


def test_prefer_covariance_is_covariance_where_a_neuron_has_a_design():
    """``"prefer-covariance"`` (the SPEED preset's strategy) is ``"covariance"`` on the dense
    neuron and matrix-free on the scale neuron, which has no design: its steps equal those of
    the explicit dict, bit for bit, over a refresh and an EMA interval."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)))
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 4))), "s": jnp.ones(4)}
    vgf = lnb_fast.value_and_grad(scale_loss)
    table = vgf.table(params, x)
    names = [c.name for c in lnb_fast.strategy.plan(table, "prefer-covariance")]
    assert dict(zip([n.weight_path for n in table.neurons], names, strict=True)) == {
        "['w']": "covariance",
        "['s']": "matrix-free",
    }
    every = {"covariance_every": 2, "refresh_every": 3}
    runs = []
    for strategy in ("prefer-covariance", {"['w']": "covariance"}):
        opt = lnb_fast.lnb(0.1, strategy=strategy, neurons=table, **every)
        p, state, steps = params, opt.init(params), []
        for _ in range(4):
            _, grads, features = vgf(p, x)
            updates, state = opt.update(grads, state, p, features=features)
            p = optax.apply_updates(p, updates)
            steps.append(updates)
        runs.append(steps)
    for a, b in zip(*runs, strict=True):
        leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        assert all(bool(jnp.array_equal(u, v)) for u, v in leaves)
    assert set(lnb_fast.SPEED) <= set(lnb_fast.lnb.__code__.co_varnames)


def test_describe_estimates_the_step_cost():
    """``describe``'s cost line: a dense layer ``x @ w`` (n = 5 rows, d = 3, K = 4, no bias)
    costs ``6·n·d·K`` per gradient step (forward ``2ndK``, backward ``4ndK``); the solver adds
    what the cost model gives the strategy it runs (for covariance, the refresh is a Cholesky,
    ``D³/3``, and its solve against the identity, ``2D³``, every ``refresh_every`` steps)."""
    from lnb_fast.describe import step_cost

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"]))

    params, x = {"w": jnp.ones((3, 4))}, jnp.ones((5, 3))
    table = lnb_fast.value_and_grad(loss).table(params, x)
    n, d, K = 5, 3, 4
    for strategy, r, c in (("covariance", 7, 2), ("matrix-free", 10, 1)):
        got = step_cost(table, strategy, refresh_every=r, covariance_every=c)
        solver = {
            "covariance": 2 * n * d * d / c + 7 * d**3 / (3 * r) + 2 * d * d * K,
            "matrix-free": 3 * 4 * n * d * K,
        }[strategy]
        assert got["gradient"] == 6 * n * d * K
        assert got["solver"] == pytest.approx(solver, rel=1e-12)
        assert got["ratio"] == pytest.approx(1 + solver / (6 * n * d * K), rel=1e-12)
