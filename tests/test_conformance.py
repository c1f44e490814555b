"""Conformance: every transformation of lnb_fast behaves as an optax transformation should.

Parametrised over LNB with each metric strategy (matrix-free, gram, covariance), FOOF,
LocoProp-S, LocoProp-M and ProxProp, on a tiny MLP (4-6-3, batch 8, float32): a jitted step
keeps the parameters' dtype (float32 and bf16) and stays finite; ``optax.chain`` with clipping
equals the transformation on the clipped gradients; a schedule is read at the step count;
``optax.inject_hyperparams`` on the learning rate equals the plain transformation; ``optax.masked``
leaves the masked parameters alone; ``optax.apply_if_finite`` rejects a NaN step and passes a
finite one unchanged; ``jax.vmap`` over seeds of a ``lax.scan`` over steps equals a Python loop
per seed; the state survives a checkpoint round trip (orbax if installed, else
pickle) and the run resumes bit for bit. The jitted steps are compiled once per transformation
and shared between the tests (the suite's time is XLA compilation: about eight small programs
per transformation)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import lnb_fast  # noqa: E402
from lnb.testing.mlp import classification_batches, mlp_loss, mlp_params, save_restore  # noqa: E402
from lnb.testing.tolerances import FLOAT32_ATOL, FLOAT32_RTOL  # noqa: E402

STEPS = 3


@dataclass(frozen=True)
class Spec:
    factory: object
    rate_name: str
    rate: float
    options: dict = field(default_factory=dict)
    table: bool = False  # needs neurons=

    def schedule(self, count):
        """0 on the first step, then the rate: every run reads it at the step count."""
        return jnp.where(count == 0, 0.0, self.rate)

    def make(self, table, wrap=None):
        kwargs = {self.rate_name: self.schedule, **self.options}
        if self.table:
            kwargs["neurons"] = table
        if wrap is None:
            return self.factory(**kwargs)
        static = [k for k, v in self.options.items() if isinstance(v, int | bool)]
        return wrap(self.factory, static_args=static)(**kwargs)


# Small settings (1 PCG/CG iteration, 2 inner steps): the checks are about the plumbing, and the
# suite's time is XLA compilation, which grows with the unrolled iterations.
SPECS = {
    "lnb-matrix-free": Spec(
        lnb_fast.lnb, "learning_rate", 0.05, {"strategy": "matrix-free", "cg_iterations": 1}
    ),
    "lnb-gram": Spec(
        lnb_fast.lnb,
        "learning_rate",
        0.05,
        {"strategy": "gram", "cg_iterations": 1, "warm_start": False, "b1": 0.9},
    ),
    "lnb-covariance": Spec(
        lnb_fast.lnb, "learning_rate", 0.05, {"strategy": "covariance", "refresh_every": 2}, True
    ),
    "foof": Spec(lnb_fast.foof, "learning_rate", 0.1, {"refresh_every": 2}, True),
    "locoprop_s": Spec(lnb_fast.locoprop_s, "learning_rate", 0.5, {"inner_steps": 2}),
    "locoprop_m": Spec(lnb_fast.locoprop_m, "learning_rate", 0.5, {"inner_steps": 2}),
    "proxprop": Spec(lnb_fast.proxprop, "tau", 0.5, {"cg_iterations": 1}),
}
NAMES = list(SPECS)


VGF = lnb_fast.value_and_grad(mlp_loss)
# XLA's backend optimisation off: the programs run a few times on tiny arrays, and compiling them
# is the suite's time (this halves it); every comparison is between programs compiled alike.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
GRADIENTS = jit(VGF)  # compiled once per dtype, shared by every transformation


def init(seed=0, dtype=jnp.float32):
    return mlp_params(np.random.default_rng(seed), (4, 6, 3), dtype)


@functools.cache
def data(dtype=jnp.float32):
    return classification_batches(1, STEPS, n=8, d=4, classes=3, dtype=dtype)


@functools.cache
def table(dtype=jnp.float32):
    return VGF.table(init(dtype=dtype), data(dtype)[0])


def jit_update(opt):
    return jit(lambda grads, state, params, feats: opt.update(grads, state, params, features=feats))


@functools.cache
def jitted(name, dtype=jnp.float32):
    """The transformation and its jitted update, compiled once per (name, dtype)."""
    opt = SPECS[name].make(table(dtype))
    return opt, jit_update(opt)


def run(update, params, state, batches):
    """Steps with the shared jitted gradient and ``update``; the last (params, state)."""
    for batch in batches:
        _, grads, feats = GRADIENTS(params, batch)
        updates, state = update(grads, state, params, feats)
        params = optax.apply_updates(params, updates)
    return params, state


@functools.cache
def trajectory(name):
    """Parameters and states after each of STEPS jitted float32 steps (index 0: initial)."""
    opt, update = jitted(name)
    out = [(init(), opt.init(init()))]
    for batch in data():
        out.append(run(update, *out[-1], [batch]))
    return out


def leaves_equal(a, b, rtol=0.0):
    """Equal leaves (bit for bit without ``rtol``; float32 programs compiled differently round
    differently: ``rtol`` with the absolute floor of :mod:`lnb.testing.tolerances`)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype
        if rtol:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=FLOAT32_ATOL)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def finite(tree):
    return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree))


pytestmark = [
    pytest.mark.parametrize("name", NAMES),
    # one xdist worker: the tests share the compiled steps above (make test's --dist loadgroup)
    pytest.mark.xdist_group("conformance"),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_jit_keeps_the_dtype_and_stays_finite(name, dtype):
    if dtype == jnp.float32:
        params, state = trajectory(name)[-1]
    else:
        opt, update = jitted(name, dtype)
        params, state = run(update, init(dtype=dtype), opt.init(init(dtype=dtype)), data(dtype))
    assert all(x.dtype == dtype for x in jax.tree.leaves(params))
    assert finite(params) and finite(state)
    assert int(state.skipped) == 0
    lnb_fast.check_finite(state, params)
    assert not np.allclose(np.asarray(params[0]["w"], np.float32), init()[0]["w"], atol=1e-3)


def test_schedule_is_read_at_the_step_count(name):
    """The runs' schedule is 0 at step count 0: the first step leaves the parameters alone,
    the next ones move them."""
    steps = trajectory(name)
    leaves_equal(steps[1][0], steps[0][0])
    assert int(steps[1][1].count) == 1 and int(steps[1][1].skipped) == 0
    assert not np.allclose(steps[2][0][1]["w"], steps[1][0][1]["w"])


@functools.cache
def guarded(name):
    """``apply_if_finite(chain(clip_by_global_norm, transformation))``, jitted: one program for
    the two tests below."""
    opt, _ = jitted(name)
    wrapped = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1e-2), opt), 3)
    return wrapped, jit_update(wrapped)


def test_chain_with_clipping(name):
    """Through ``chain(clip_by_global_norm, ·)`` (and ``apply_if_finite``, which a finite step
    passes): the transformation applied to the clipped gradients."""
    opt, update = jitted(name)
    wrapped, wrapped_update = guarded(name)
    params, state = trajectory(name)[1]  # after the first step (a zero learning rate)
    _, grads, feats = GRADIENTS(params, data()[1])
    fresh = wrapped.init(init())
    state = fresh._replace(inner_state=(fresh.inner_state[0], state))
    got, _ = wrapped_update(grads, state, params, feats)
    clipped, _ = optax.clip_by_global_norm(1e-2).update(grads, optax.EmptyState())
    want, _ = update(clipped, trajectory(name)[1][1], params, feats)
    assert float(optax.tree.norm(want)) > 0
    leaves_equal(got, want, rtol=FLOAT32_RTOL)


def test_apply_if_finite(name):
    """A NaN gradient: ``apply_if_finite`` rejects the step (zero updates, inner state kept);
    the next finite step is the transformation's."""
    _, update = jitted(name)
    wrapped, wrapped_update = guarded(name)
    params, inner = trajectory(name)[1]
    _, grads, feats = GRADIENTS(params, data()[1])
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    fresh = wrapped.init(init())
    state = fresh._replace(inner_state=(fresh.inner_state[0], inner))
    updates, state = wrapped_update(bad, state, params, feats)
    assert float(optax.tree.norm(updates)) == 0.0 and int(state.notfinite_count) == 1
    leaves_equal(state.inner_state[1], inner)
    updates, state = wrapped_update(grads, state, params, feats)
    assert int(state.notfinite_count) == 0 and float(optax.tree.norm(updates)) > 0


def test_inject_hyperparams_on_the_learning_rate(name):
    spec = SPECS[name]
    opt = spec.make(table(), wrap=optax.inject_hyperparams)
    params, state = run(jit_update(opt), init(), opt.init(init()), data())
    leaves_equal(params, trajectory(name)[-1][0], rtol=FLOAT32_RTOL)
    assert float(state.hyperparams[spec.rate_name]) == pytest.approx(spec.rate)  # step count 2


def test_masked_leaves_the_masked_parameters_alone(name):
    opt = SPECS[name].make(table())
    mask = [{"w": False, "b": True}, {"w": True, "b": True}]
    frozen = jax.tree.map(lambda m: not m, mask)
    masked = optax.chain(optax.masked(opt, mask), optax.masked(optax.set_to_zero(), frozen))
    start = init()
    params, state = run(jit_update(masked), start, masked.init(start), data())
    np.testing.assert_array_equal(params[0]["w"], start[0]["w"])
    assert not np.allclose(params[0]["b"], start[0]["b"])
    assert not np.allclose(params[1]["w"], start[1]["w"])
    assert finite(params) and finite(state)


def test_vmap_over_seeds_of_a_scan_over_steps(name):
    """``jit(vmap(scan(step)))``: one run per seed, each a ``lax.scan`` over the batches, equals
    the Python loop of jitted steps."""
    opt, update = jitted(name)
    seeds = [init(seed) for seed in (0, 7)]
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
    batches = stack(data())

    def train(params, state):
        def body(carry, batch):
            params, state = carry
            _, grads, feats = VGF(params, batch)
            updates, state = opt.update(grads, state, params, features=feats)
            return (optax.apply_updates(params, updates), state), None

        return lax.scan(body, (params, state), batches)[0]

    params, state = jit(jax.vmap(train))(stack(seeds), jax.vmap(opt.init)(stack(seeds)))
    for k, p in enumerate(seeds):
        want_params, want_state = run(update, p, opt.init(p), data())
        pick = lambda tree, k=k: jax.tree.map(lambda x: x[k], tree)  # noqa: E731
        leaves_equal(pick(params), want_params, rtol=FLOAT32_RTOL)
        assert int(pick(state).count) == int(want_state.count) == STEPS


def test_checkpoint_round_trip_and_resume(name, tmp_path):
    _, update = jitted(name)
    steps = trajectory(name)
    params, state = steps[1]
    restored = save_restore(state, tmp_path / "ckpt")
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    leaves_equal(restored, state)
    params, restored = run(update, params, restored, data()[1:])
    leaves_equal(params, steps[-1][0])
    leaves_equal(restored, steps[-1][1])
