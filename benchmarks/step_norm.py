"""The step-norm rules on the README's model at a constant ε: loss spikes, rises and restarts.

    .venv/bin/python benchmarks/step_norm.py                 # 1000 steps, ε = 0.01, 0.05, 0.2
    .venv/bin/python benchmarks/step_norm.py --steps 200     # shorter

The README's example (an Equinox MLP 64-128-128-10 on one 512-sample batch, float32, as a user
runs it) trained at a *constant* ε — no decay to hide a misbehaving step — with

* ``metric``: the default, ``z = Σθ̂ᵀ(M + γ)θ̂`` measured from PCG's residual, warm-started
  directions that barely descend recomputed from 0 (``min_descent = 0.5``);
* ``paper``: Algorithm 2 as printed, ``z = Σθ̂·ĝ`` and no restart (``step_norm="paper",
  min_descent=0``).

Per run: *spikes*, steps whose loss is more than 10× the previous one *and* higher by more than
ε/4 (the criterion ``tests/test_readme.py`` asserts). A constant-length step must overshoot the
minimum somewhere, so near a loss of 0 it raises the loss by up to the quadratic term of a
logit change of squared length ε, ≤ ε/4 for softmax cross-entropy (its Hessian in the logits is
at most ½·I); a 10× jump within that is the trust region at work, not a spike. Also: the
largest rise of the loss in one step, in units of ε; the final loss;
and how many (neuron, step) directions were restarted. Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lnb_fast

RULES = {
    "metric": {},
    "paper": {"step_norm": "paper", "min_descent": 0.0},
}


def readme_problem():
    """The README example's batch, model and loss (same keys and sizes)."""
    kx, kt, km = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (512, 64)) + 2.0
    y = jnp.argmax((x - 2.0) @ jax.random.normal(kt, (64, 10)), axis=1)
    model = eqx.nn.MLP(64, 10, width_size=128, depth=2, activation=jnp.tanh, key=km)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params, batch):
        x, y = batch
        logits = jax.vmap(eqx.combine(params, static))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss_fn, (x, y)


def run(rule: str, epsilon: float, steps: int) -> dict:
    params, loss_fn, batch = readme_problem()
    opt = lnb_fast.lnb(learning_rate=epsilon, **RULES[rule])
    vgf = lnb_fast.value_and_grad(loss_fn)

    def step(carry, _):
        params, state = carry
        loss, grads, features = vgf(params, batch)
        updates, state = opt.update(grads, state, params, features=features)
        return (optax.apply_updates(params, updates), state), loss

    (_, state), losses = jax.jit(
        lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
    )(params)
    L = np.asarray(losses, dtype=float)
    spikes = int(np.sum((L[1:] > 10 * L[:-1]) & (np.diff(L) > epsilon / 4)))
    return {
        "rule": rule,
        "epsilon": epsilon,
        "steps": steps,
        "spikes": spikes,
        "max_rise_over_epsilon": float(np.max(np.diff(L)) / epsilon),
        "final_loss": float(L[-1]),
        "restarts": int(state.restarts),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--epsilons", default="0.01,0.05,0.2")
    parser.add_argument("--out", default="results/step_norm.json")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    rows = []
    for rule in tqdm(RULES, desc="rules"):
        for eps in epsilons:
            rows.append(run(rule, eps, args.steps))
    print("| rule | ε | spikes (>10× and > ε/4) | largest rise / ε | final loss | restarts |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['rule']} | {r['epsilon']:g} | {r['spikes']} | {r['max_rise_over_epsilon']:.3g} "
            f"| {r['final_loss']:.3g} | {r['restarts']} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
