"""What the non-finite check of ``lnb_fast`` costs per jitted training step.

    .venv/bin/python benchmarks/nonfinite_overhead.py               # MLP 784-800-800-10, batch 1000
    .venv/bin/python benchmarks/nonfinite_overhead.py --quick       # tiny sizes, a few seconds

Three jitted steps of the same model (``lnb_fast.value_and_grad`` + ``lnb_fast.lnb(...).update``
+ ``optax.apply_updates``, parameters and state donated, ``neurons=`` given, strategy
``--strategy``):

* ``none``: ``nonfinite=None``, no check at all;
* ``skip``: the default ``nonfinite="skip"``: every gradient, feature, the learning rate and the
  update checked in the graph, the step skipped and recorded when one is not finite — no host
  round trip;
* ``skip + check_finite``: the same, plus ``lnb_fast.check_finite(state)`` after every step,
  i.e. one host round trip per step (what the former ``jax.debug.callback`` of
  ``nonfinite="raise"`` cost on every step; call it every N steps instead).

Each is warmed up (compiled), then in each of ``--repeats`` rounds makes ``--steps`` steps in a
row (dispatched as a training loop does, waiting only at the end), in an order that alternates
between rounds; the medians of the time per step and their ratios to ``none`` are printed. No
timing is asserted anywhere (the machine may be shared).
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lnb_fast


def mlp(sizes, batch, seed=0):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = jnp.asarray(rng.normal(0, np.sqrt(2 / (a + b)), (a, b)), jnp.float32)
        params[f"b{i}"] = jnp.zeros(b, jnp.float32)

    def loss(p, data):
        h, labels = data
        for i in range(len(sizes) - 1):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            if i < len(sizes) - 2:
                h = jnp.tanh(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, labels).mean()

    x = jnp.asarray(rng.normal(size=(batch, sizes[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, sizes[-1], batch))
    return params, loss, (x, y)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed call")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    args = parser.parse_args(argv)
    sizes, batch = ((64, 32, 32, 10), 64) if args.quick else ((784, 800, 800, 10), 1000)
    params, loss, data = mlp(sizes, batch)
    vgf = lnb_fast.value_and_grad(loss)
    table = vgf.table(params, data)

    def make(nonfinite):
        opt = lnb_fast.lnb(0.01, neurons=table, strategy=args.strategy, nonfinite=nonfinite)

        def step(params, state, data):
            _, grads, feats = vgf(params, data)
            updates, state = opt.update(grads, state, params, features=feats)
            return optax.apply_updates(params, updates), state

        fn = jax.jit(step, donate_argnums=(0, 1))
        return [fn, jax.tree.map(jnp.copy, params), opt.init(params)]

    runs = {"none": make(None), "skip": make("skip"), "skip + check_finite": make("skip")}

    def call(name):
        """``--steps`` consecutive steps, as a training loop makes them (dispatched without
        waiting), then wait; the wall time per step."""
        fn, p, s = runs[name]
        start = time.perf_counter()
        for _ in range(args.steps):
            p, s = fn(p, s, data)
            if name == "skip + check_finite":
                lnb_fast.check_finite(s)  # reads the record: one host round trip per step
        jax.block_until_ready((p, s))
        runs[name][1:] = [p, s]
        return (time.perf_counter() - start) / args.steps

    names = list(runs)
    for _ in range(args.warmup):
        for name in names:
            call(name)
    times = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(call(name))
    base = float(np.median(times["none"]))
    print(
        f"MLP {'-'.join(map(str, sizes))}, batch {batch}, strategy {args.strategy}, "
        f"{args.repeats} rounds of {args.steps} steps, JAX {jax.__version__} on "
        f"{jax.devices()[0].platform}"
    )
    print("| step | median (ms) | / none |")
    print("|---|---:|---:|")
    for name in names:
        med = float(np.median(times[name]))
        print(f"| {name} | {1e3 * med:.2f} | {med / base:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
