"""lnb_fast's transformations among optax's wrappers, and the failure modes that used to break
them (issue 13): ``inject_hyperparams``, ``masked``/``partition`` (training part of a model),
``MultiSteps``, non-finite values without a host round trip per step, learning rates and
schedules that would make NaNs, checkpoints with orbax, bf16 parameters, and a ``neurons=``
table of another model."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import lnb_fast  # noqa: E402
from lnb.testing.mlp import classification_batches, mlp_loss, mlp_params, save_restore  # noqa: E402
from lnb.testing.tolerances import RTOL, STEP_RTOL  # noqa: E402
from lnb_fast.errors import CompositionError, NonFiniteError, StructureError  # noqa: E402

# compositions are compared with the plain transformation at float64 rounding
pytestmark = pytest.mark.x64


def mlp(sizes=(6, 10, 8, 3), dtype=jnp.float64, seed=0, n=32):
    """A tanh MLP (list of {'w', 'b'}), its mean cross-entropy and one batch."""
    rng = np.random.default_rng(seed)
    params = mlp_params(rng, sizes, dtype)
    x = jnp.asarray(rng.normal(size=(n, sizes[0])) + 0.5, dtype)
    y = jnp.asarray(rng.integers(0, sizes[-1], size=n))
    return params, mlp_loss, (x, y)


def batches(seed, count, n=32, d=6, classes=3, dtype=jnp.float64):
    return classification_batches(seed, count, n, d, classes, dtype)


def run(opt, params, loss, data, jit=True):
    """Train over the batches; returns (params, state)."""
    vgf = lnb_fast.value_and_grad(loss)

    def step(params, state, batch):
        _, grads, feats = vgf(params, batch)
        updates, state = opt.update(grads, state, params, features=feats)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    state = opt.init(params)
    for batch in data:
        params, state = step(params, state, batch)
    return params, state


def assert_trees_close(a, b, rtol=1e-12, atol=0.0):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --- inject_hyperparams -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (lnb_fast.lnb, {"learning_rate": 0.05}),
        (lnb_fast.proxprop, {"tau": 0.5}),
        (lnb_fast.locoprop_s, {"learning_rate": 0.5}),
        (lnb_fast.locoprop_m, {"learning_rate": 0.5}),
    ],
)
def test_inject_hyperparams_learning_rate(factory, kwargs):
    """The wrapped transformation traces (its arguments arrive as traced arrays), equals the
    plain one, and reads a changed learning rate from the state."""
    params, loss, batch = mlp()
    data = batches(1, 3)
    plain, _ = run(factory(**kwargs), params, loss, data)
    injected_opt = optax.inject_hyperparams(factory)(**kwargs)
    injected, state = run(injected_opt, params, loss, data)
    assert_trees_close(injected, plain, rtol=RTOL)
    (name,) = kwargs
    state.hyperparams[name] = 0.0 * state.hyperparams[name]
    _, grads, feats = lnb_fast.value_and_grad(loss)(injected, batch)
    updates, _ = jax.jit(lambda s: injected_opt.update(grads, s, injected, features=feats))(state)
    # 0 up to rounding (LocoProp-M's local gradient at Δ = 0 is φ(f(θ_k)) − φ(f(θ_k)) ≈ 0)
    assert all(float(jnp.max(jnp.abs(u))) < 1e-12 for u in jax.tree.leaves(updates))


def test_inject_hyperparams_keeps_the_unrolled_iterations_static():
    with pytest.raises(TypeError, match="static_args"):
        params, loss, batch = mlp()
        opt = optax.inject_hyperparams(lnb_fast.lnb)(learning_rate=0.05, cg_iterations=3)
        run(opt, params, loss, batches(1, 1))
    opt = optax.inject_hyperparams(lnb_fast.lnb, static_args="cg_iterations")(
        learning_rate=0.05, cg_iterations=3
    )
    params, loss, _ = mlp()
    data = batches(1, 2)
    assert_trees_close(
        run(opt, params, loss, data)[0],
        run(lnb_fast.lnb(0.05, cg_iterations=3), params, loss, data)[0],
        rtol=RTOL,
    )


def test_scale_by_lnb_chained_with_decay_and_rate_equals_lnb():
    """``lnb(ε, ρ) == chain(scale_by_lnb(), add_decayed_weights(ρ), scale(−√ε))``."""
    params, loss, _ = mlp()
    data = batches(8, 3)
    eps, rho = 0.05, 0.1
    chained = optax.chain(
        lnb_fast.scale_by_lnb(b1=0.9), optax.add_decayed_weights(rho), optax.scale(-np.sqrt(eps))
    )
    got, state = run(chained, params, loss, data)
    want, want_state = run(lnb_fast.lnb(eps, rho, b1=0.9), params, loss, data)
    assert_trees_close(got, want, rtol=1e-12, atol=1e-15)
    assert isinstance(state[0], lnb_fast.LNBState)
    assert_trees_close(state[0].direction, want_state.direction, rtol=1e-12, atol=1e-15)


def test_scale_by_lnb_takes_every_option_of_lnb_but_the_rate_and_decay():
    """One source for the options: ``scale_by_lnb``'s signature is ``lnb``'s without
    ``learning_rate``/``weight_decay`` (keyword-only, same defaults), it forwards each of them
    (``inject_hyperparams`` binds through that signature), and a rate or decay is refused with
    the chain to use instead."""
    mine = inspect.signature(lnb_fast.scale_by_lnb).parameters
    theirs = inspect.signature(lnb_fast.lnb).parameters
    assert list(mine) == [n for n in theirs if n not in ("learning_rate", "weight_decay")]
    for name, p in mine.items():
        assert p.kind is inspect.Parameter.KEYWORD_ONLY
        assert p.default == theirs[name].default, name
    with pytest.raises(ValueError, match="step_norm"):  # forwarded: lnb validates it
        lnb_fast.scale_by_lnb(step_norm="nope")
    with pytest.raises(TypeError, match="scale_by_lnb takes no learning_rate"):
        lnb_fast.scale_by_lnb(learning_rate=0.1)
    injected = optax.inject_hyperparams(lnb_fast.scale_by_lnb)(ridge=0.01)
    assert float(injected.init({"w": jnp.zeros((2, 2))}).hyperparams["ridge"]) == 0.01


# --- masked / partition: LNB on part of a model ------------------------------------------------
def lnb_on_the_part_alone(make_opt, params, loss, data, part):
    """LNB on the layers in ``part`` (the rest closed over as constants) and Adam on the rest,
    stepping both on the same batches: what masked/partition must reproduce."""
    lnb_opt, adam = make_opt(), optax.adam(1e-2)
    split = lambda p: ([p[i] for i in part], [p[i] for i in range(len(p)) if i not in part])  # noqa: E731

    def merge(mine, rest):
        a, b = iter(mine), iter(rest)
        return [next(a) if i in part else next(b) for i in range(len(params))]

    @jax.jit  # one compilation for the run (eagerly, every operation compiles on its own)
    def step(mine, rest, s_lnb, s_adam, batch):
        _, g_mine, feats = lnb_fast.value_and_grad(lambda m, b: loss(merge(m, rest), b))(
            mine, batch
        )
        g_rest = jax.grad(lambda r: loss(merge(mine, r), batch))(rest)
        u, s_lnb = lnb_opt.update(g_mine, s_lnb, mine, features=feats)
        v, s_adam = adam.update(g_rest, s_adam, rest)
        return optax.apply_updates(mine, u), optax.apply_updates(rest, v), s_lnb, s_adam

    mine, rest = split(params)
    s_lnb, s_adam = lnb_opt.init(mine), adam.init(rest)
    for batch in data:
        mine, rest, s_lnb, s_adam = step(mine, rest, s_lnb, s_adam, batch)
    return merge(mine, rest)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: lnb_fast.lnb(0.05, weight_decay=0.1, b1=0.9),
        lambda: lnb_fast.lnb(0.05, strategy="gram"),
        lambda: lnb_fast.proxprop(0.5),
    ],
    ids=["matrix-free", "gram", "proxprop"],
)
def test_masked_and_partition_train_part_of_a_model(make_opt):
    params, loss, _ = mlp()
    data = batches(2, 4)
    part = (0, 2)
    want = lnb_on_the_part_alone(make_opt, params, loss, data, part)
    is_part = [jax.tree.map(lambda _, i=i: i in part, layer) for i, layer in enumerate(params)]
    not_part = jax.tree.map(lambda m: not m, is_part)
    labels = jax.tree.map(lambda m: "lnb" if m else "adam", is_part)
    wrappers = {
        "masked": optax.chain(
            optax.masked(make_opt(), is_part), optax.masked(optax.adam(1e-2), not_part)
        ),
        "partition": optax.partition({"lnb": make_opt(), "adam": optax.adam(1e-2)}, labels),
        # a mask that is a prefix of the tree: whole layers are MaskedNode subtrees
        "prefix mask": optax.chain(
            optax.masked(make_opt(), [i in part for i in range(3)]),
            optax.masked(optax.adam(1e-2), [i not in part for i in range(3)]),
        ),
    }
    for name, opt in wrappers.items():
        got, _ = run(opt, params, loss, data)
        assert_trees_close(got, want, rtol=STEP_RTOL, atol=1e-14), name


def test_masking_a_bias_only_drops_it_from_its_neuron():
    """A frozen bias: its weight is a neuron without bias, as when the bias is a constant."""
    params, loss, _ = mlp()
    data = batches(3, 3)
    labels = [{"w": "lnb", "b": "lnb" if i != 1 else "frozen"} for i in range(3)]
    opt = optax.partition({"lnb": lnb_fast.lnb(0.05), "frozen": optax.set_to_zero()}, labels)
    got, _ = run(opt, params, loss, data)

    def loss_without(p, batch):
        full = [dict(layer) for layer in p]
        full[1]["b"] = params[1]["b"]
        return loss(full, batch)

    trainable = [layer if i != 1 else {"w": layer["w"]} for i, layer in enumerate(params)]
    want, _ = run(lnb_fast.lnb(0.05), trainable, loss_without, data)
    want[1] = {"w": want[1]["w"], "b": params[1]["b"]}
    assert_trees_close(got, want, rtol=STEP_RTOL, atol=1e-14)


def test_masked_covariance_and_foof_with_neurons():
    params, loss, batch = mlp()
    table = lnb_fast.value_and_grad(loss).table(params, batch)
    mask = [i != 1 for i in range(3)]
    for inner in (
        lnb_fast.lnb(0.05, strategy="covariance", neurons=table),
        lnb_fast.foof(0.05, neurons=table),
    ):
        frozen = optax.masked(optax.set_to_zero(), [not m for m in mask])
        opt = optax.chain(optax.masked(inner, mask), frozen)
        got, state = run(opt, params, loss, batches(4, 3))
        assert state[0].inner_state.covariance[1] is None  # no matrix for the frozen neuron
        assert_trees_close(got[1], params[1], rtol=0)
        assert not np.allclose(got[0]["w"], params[0]["w"])


# --- MultiSteps ---------------------------------------------------------------------------------
def test_multisteps_is_refused_with_a_clear_error():
    params, loss, _ = mlp()
    for opt in (lnb_fast.lnb(0.05), lnb_fast.proxprop(0.5)):
        with pytest.raises(CompositionError, match="MultiSteps"):
            run(optax.MultiSteps(opt, 2), params, loss, batches(5, 2))


# --- non-finite values --------------------------------------------------------------------------
def nan_grads_step(opt, params, loss, batch):
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
    grads[1]["w"] = grads[1]["w"].at[0, 0].set(jnp.nan)
    return jax.jit(lambda s: opt.update(grads, s, params, features=feats))(opt.init(params))


@pytest.mark.parametrize(
    "factory", [lnb_fast.lnb, lnb_fast.proxprop, lnb_fast.locoprop_s], ids=lambda f: f.__name__
)
def test_default_skips_under_jit_and_check_finite_raises_nonfinite_error(factory):
    params, loss, batch = mlp()
    opt = factory(0.05)
    updates, state = nan_grads_step(opt, params, loss, batch)  # no exception, no host callback
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
    assert int(state.skipped) == 1
    with pytest.raises(NonFiniteError, match=r"gradient of parameter \[1\]\['w'\] at step 1"):
        lnb_fast.check_finite(state, params)
    with pytest.raises(NonFiniteError, match=r"gradient of parameter \[1\]\['w'\]"):
        clean = optax.chain(optax.identity(), opt).init(params)
        lnb_fast.check_finite({"clean": clean, "s": state}, params)
    with pytest.raises(NonFiniteError, match=r"gradient of parameter #3 at step 1"):
        lnb_fast.check_finite(state)  # without the parameters: leaf numbers
    lnb_fast.check_finite(opt.init(params), params)  # nothing recorded: no error


def test_raise_mode_raises_nonfinite_error_eagerly_and_refuses_jit():
    params, loss, batch = mlp()
    opt = lnb_fast.lnb(0.05, nonfinite="raise")
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
    grads[1]["w"] = grads[1]["w"].at[0, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match=r"gradient of parameter \[1\]\['w'\]"):
        opt.update(grads, opt.init(params), params, features=feats)
    with pytest.raises(ValueError, match="check_finite"):
        jax.jit(lambda s: opt.update(grads, s, params, features=feats))(opt.init(params))


def test_no_host_callback_in_the_default_step():
    params, loss, batch = mlp()
    opt = lnb_fast.lnb(0.05)
    _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
    jaxpr = str(
        jax.make_jaxpr(lambda s: opt.update(grads, s, params, features=feats))(opt.init(params))
    )
    assert "callback" not in jaxpr


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_learning_rates_that_make_nans_are_refused(bad):
    for factory in (lnb_fast.lnb, lnb_fast.proxprop, lnb_fast.locoprop_m):
        with pytest.raises(ValueError, match="learning_rate|tau"):
            factory(bad)
    with pytest.raises(ValueError, match="ridge"):
        lnb_fast.lnb(0.1, ridge=float("nan"))
    with pytest.raises(ValueError, match="weight_decay"):
        lnb_fast.lnb(0.1, weight_decay=float("nan"))


def test_bad_schedules_are_named():
    params, loss, batch = mlp()

    def none_schedule(count):
        return None

    def nan_schedule(count):
        return jnp.where(count >= 1, jnp.nan, 0.05)

    with pytest.raises(TypeError, match="none_schedule"):
        run(lnb_fast.lnb(none_schedule), params, loss, [batch])
    with pytest.raises(NonFiniteError, match="nan_schedule"):  # eager: at once
        run(lnb_fast.lnb(nan_schedule, nonfinite="raise"), params, loss, [batch] * 2, jit=False)
    new, state = run(lnb_fast.lnb(nan_schedule), params, loss, [batch] * 3)  # jit: skipped
    assert int(state.skipped) == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(new))
    with pytest.raises(NonFiniteError, match="nan_schedule.*at step 2"):
        lnb_fast.check_finite(state, params)


# --- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["covariance", "gram"])
def test_checkpoint_round_trip_and_bit_exact_resume(strategy, tmp_path):
    params, loss, batch = mlp(dtype=jnp.float32)
    table = lnb_fast.value_and_grad(loss).table(params, batch)
    opt = lnb_fast.lnb(0.05, strategy=strategy, neurons=table, b1=0.9, refresh_every=2)
    data = batches(6, 5, dtype=jnp.float32)
    vgf = lnb_fast.value_and_grad(loss)

    @jax.jit  # one program for the uninterrupted run, the first two steps and the resumed run
    def step(params, state, batch):
        _, grads, feats = vgf(params, batch)
        updates, state = opt.update(grads, state, params, features=feats)
        return optax.apply_updates(params, updates), state

    want, state = params, opt.init(params)
    for b in data:
        want, state = step(want, state, b)
    mid, state = params, opt.init(params)
    for b in data[:2]:
        mid, state = step(mid, state, b)
    restored = save_restore(state, tmp_path / "ckpt")
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for b in data[2:]:
        mid, restored = step(mid, restored, b)
    for a, b in zip(jax.tree.leaves(mid), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


# --- low precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_covariance_and_foof(dtype):
    params, loss, batch = mlp(dtype=dtype)
    table = lnb_fast.value_and_grad(loss).table(params, batch)
    for opt in (
        lnb_fast.lnb(0.05, strategy="covariance", neurons=table),
        lnb_fast.foof(0.05, neurons=table),
    ):
        new, state = run(opt, params, loss, batches(7, 3, dtype=dtype))
        for a in jax.tree.leaves(new):
            assert a.dtype == dtype and np.isfinite(np.asarray(a, np.float32)).all()
        assert int(state.skipped) == 0


def test_bf16_moments_are_bias_corrected_consistently():
    """Constant features: the bias-corrected EMA of the column means must be those means (the
    EMA weight and the correction used one b2; in bf16 they used 0.98828125 and 0.99)."""
    params, loss, batch = mlp(dtype=jnp.bfloat16)
    steps = 60
    _, state = run(lnb_fast.lnb(0.01), params, loss, [batch] * steps)
    x = np.asarray(batch[0], np.float64)
    corrected = np.asarray(state.mean[0]["w"], np.float64) / (1 - 0.99**steps)
    np.testing.assert_allclose(corrected, np.broadcast_to(x.mean(0)[:, None], (6, 10)), rtol=2e-2)
    second = np.asarray(state.second_moment[0]["w"], np.float64) / (1 - 0.99**steps)
    np.testing.assert_allclose(second[:, 0], (x**2).mean(0), rtol=2e-2)


# --- a neurons= table of another model ----------------------------------------------------------
def test_neurons_of_another_model_is_a_structure_error():
    params, loss, batch = mlp()
    other, other_loss, other_batch = mlp(sizes=(6, 12, 8, 3))
    table = lnb_fast.value_and_grad(other_loss).table(other, other_batch)
    for make in (
        lambda: lnb_fast.lnb(0.05, strategy="covariance", neurons=table),
        lambda: lnb_fast.foof(0.05, neurons=table),
    ):
        opt = make()
        with pytest.raises(StructureError, match=r"\[0\]\['b'\]: shape \(10,\).*\(12,\)"):
            opt.init(params)
        _, grads, feats = lnb_fast.value_and_grad(loss)(params, batch)
        with pytest.raises(StructureError, match=r"\[0\]\['b'\]: shape \(10,\).*\(12,\)"):
            opt.update(grads, opt.init(other), params, features=feats)
