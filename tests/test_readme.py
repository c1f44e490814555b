"""The README's lnb_fast example (an unmodified Equinox MLP) runs as printed and trains."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytest.importorskip("equinox")

from conftest import compile_optimised  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example: lnb_fast -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its marked lnb_fast example"
    return match.group(1)


def test_readme_example_runs_and_trains():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example(), str(README), "exec"), {"__name__": "readme"})
    printed = out.getvalue()
    assert "| .layers[0].weight | dense weight | 128×64  | 512 | M_i (Eq. 10) |" in printed
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", printed)]
    assert len(losses) == 5
    assert losses[-1] < losses[0] / 100  # 2.33 -> below 0.0233 in 100 steps


@pytest.fixture(scope="module")
def readme_namespace():
    namespace = {"__name__": "readme"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(example(), str(README), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def constant_epsilon_run(readme_namespace):
    """``(params, epsilon) -> ((params, state), losses)``: 1000 steps of ``lnb_fast.lnb`` with
    default settings and a constant ``learning_rate=epsilon`` on the README's model, compiled
    once for the three ε of the test (ε is an argument of the program; its losses are bit for
    bit those of the program compiled with ε a Python float, checked when this was written).
    Running the steps is the test's time, so compiled with XLA's optimisation."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import lnb_fast

    ns = readme_namespace
    params, _ = eqx.partition(ns["model"], eqx.is_inexact_array)
    vgf = ns["value_grad_features"]

    def run(params, epsilon):
        opt = lnb_fast.lnb(learning_rate=epsilon)

        def step(carry, _):
            params, state = carry
            loss, grads, features = vgf(params, ns["batch"])
            updates, state = opt.update(grads, state, params, features=features)
            return (optax.apply_updates(params, updates), state), loss

        return jax.lax.scan(step, (params, opt.init(params)), None, length=1000)

    compiled = compile_optimised(run, params, jnp.float32(0.01))
    return lambda epsilon: compiled(params, jnp.float32(epsilon))


# one xdist worker for the three: they share the module-scoped fixtures (a trained model and
# the compiled 1000 steps)
@pytest.mark.xdist_group("readme")
@pytest.mark.parametrize("epsilon", [0.01, 0.05, 0.2])
def test_readme_model_at_constant_epsilon_never_spikes(constant_epsilon_run, epsilon):
    """The README's model, 1000 steps at a *constant* ε (no decay to hide behind), default
    settings: the loss never jumps more than 10× between two steps by more than ε/4, and never
    rises by more than ε. A constant-length step must overshoot the minimum somewhere, raising a
    loss near 0 by up to the quadratic term of a logit change of squared length ε (≤ ε/4 for
    softmax cross-entropy); beyond that is a spike. The paper's z = Σθ̂·ĝ with a warm start
    (``step_norm="paper"``, no restart) fails both: 52, 54 and 56 spikes at ε = 0.01, 0.05, 0.2,
    rises up to 1,140·ε (``benchmarks/step_norm.py``, float32, measures both rules)."""
    import numpy as np

    (_, state), losses = constant_epsilon_run(epsilon)
    L = np.asarray(losses)
    assert np.all(np.isfinite(L))
    spikes = np.flatnonzero((L[1:] > 10 * L[:-1]) & (np.diff(L) > epsilon / 4))
    assert spikes.size == 0, f"jumps at steps {spikes + 1}: {L[spikes]} -> {L[spikes + 1]}"
    assert np.max(np.diff(L)) <= epsilon
    assert L[-100:].max() < 0.05 * L[0]
