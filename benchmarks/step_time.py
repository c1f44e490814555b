"""Wall time of one training step of ``lnb_fast.lnb`` against ``optax.adam``, in one run.

    .venv/bin/python benchmarks/step_time.py             # both models, ~30 s on 2 CPU cores
    .venv/bin/python benchmarks/step_time.py --models mlp --repeats 10 --quiet

Two plain-JAX models (float32, parameters as dicts of arrays, random data from a seeded NumPy
generator, nothing downloaded):

* ``mlp``: the paper's MNIST MLP, 784-800-800-10, tanh, batch 1000;
* ``cnn``: three 3x3 convolutions (1→16, 16→32 stride 2, 32→32 stride 2, ReLU, SAME padding)
  and a dense layer to 10 classes on 28x28x1 images, batch 256.

For each model four functions are ``jax.jit``-compiled, each a single XLA computation:

* Adam step: ``jax.value_and_grad`` + ``optax.adam(...).update`` + ``optax.apply_updates``;
* LNB step: ``lnb_fast.value_and_grad`` (gradients and each neuron's input features, from one
  forward and one backward pass) + ``lnb_fast.lnb(...).update`` + ``optax.apply_updates``;
* gradient only: ``jax.value_and_grad(loss_fn)`` and ``lnb_fast.value_and_grad(loss_fn)`` (the
  latter also returns the features); their ratio is the "capture overhead".

Each function is first called ``--warmup`` times (compilation included, not timed); then, in each
of ``--repeats`` rounds, each function is called once and timed up to ``jax.block_until_ready``,
in an order that alternates between rounds, so that machine noise falls on all four alike. The
steps carry their parameters and optimizer states from call to call, as in training. The table
reports medians over the rounds; ``--out`` (default ``results/step_time.json``) also gets the
quartiles, the machine and the command line. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm.auto import tqdm

import lnb_fast
from lnb.train import make_step

Params = dict[str, jax.Array]
Batch = tuple[jax.Array, jax.Array]
LEARNING_RATE = {"adam": 1e-3, "lnb": 1e-2}
KINDS = ("adam step", "lnb step", "adam gradient", "lnb gradient")


def glorot_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int):
    """Glorot-normal weights, ``N(0, 2 / (fan_in + fan_out))``, as a float32 JAX array."""
    std = np.sqrt(2.0 / (fan_in + fan_out))
    return jnp.asarray(rng.normal(0.0, std, shape), jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp_params(rng: np.random.Generator) -> Params:
    sizes = (784, 800, 800, 10)
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = glorot_normal(rng, (n_in, n_out), n_in, n_out)
        params[f"b{i}"] = jnp.zeros(n_out, jnp.float32)
    return params


def mlp_loss(params: Params, batch: Batch) -> jax.Array:
    h, labels = batch
    for i in range(3):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < 2:
            h = jnp.tanh(h)
    return cross_entropy(h, labels)


CNN_CONVS = ((1, 16, 1), (16, 32, 2), (32, 32, 2))  # (in channels, out channels, stride)


def cnn_params(rng: np.random.Generator) -> Params:
    params = {}
    for i, (c_in, c_out, _) in enumerate(CNN_CONVS):
        params[f"conv{i}"] = glorot_normal(rng, (3, 3, c_in, c_out), 9 * c_in, 9 * c_out)
        params[f"conv{i}_bias"] = jnp.zeros(c_out, jnp.float32)
    params["dense"] = glorot_normal(rng, (7 * 7 * 32, 10), 7 * 7 * 32, 10)
    params["dense_bias"] = jnp.zeros(10, jnp.float32)
    return params


def cnn_loss(params: Params, batch: Batch) -> jax.Array:
    h, labels = batch
    for i, (_, _, stride) in enumerate(CNN_CONVS):
        h = lax.conv_general_dilated(
            h,
            params[f"conv{i}"],
            (stride, stride),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        h = jax.nn.relu(h + params[f"conv{i}_bias"])
    logits = h.reshape(h.shape[0], -1) @ params["dense"] + params["dense_bias"]
    return cross_entropy(logits, labels)


@dataclass(frozen=True)
class Model:
    name: str
    init: Callable[[np.random.Generator], Params]
    loss: Callable[[Params, Batch], jax.Array]
    input_shape: tuple[int, ...]
    batch: int

    def data(self, rng: np.random.Generator, batch: int) -> Batch:
        x = rng.uniform(0.0, 1.0, (batch, *self.input_shape)).astype(np.float32)
        return jnp.asarray(x), jnp.asarray(rng.integers(0, 10, batch), jnp.int32)


MODELS = {
    "mlp": Model("mlp", mlp_params, mlp_loss, (784,), 1000),
    "cnn": Model("cnn", cnn_params, cnn_loss, (28, 28, 1), 256),
}


class Runner:
    """One of the timed functions, with the parameters and state it carries between calls."""

    def __init__(self, fn: Callable, params: Params, state: Any, batch: Batch):
        self.fn, self.params, self.state, self.batch = fn, params, state, batch

    def __call__(self) -> float:
        """Call the function once; return its wall time in seconds, results ready."""
        start = time.perf_counter()
        if self.state is None:  # gradient only: nothing to carry
            jax.block_until_ready(self.fn(self.params, self.batch))
        else:
            out = jax.block_until_ready(self.fn(self.params, self.state, self.batch))
            self.params, self.state = out[0], out[1]
        return time.perf_counter() - start


def runners(model: Model, batch_size: int) -> tuple[dict[str, Runner], dict[str, int]]:
    """The four timed functions of ``model``, its parameter count and LNB's neuron count."""
    rng = np.random.default_rng(0)
    params, batch = model.init(rng), model.data(rng, batch_size)
    adam = optax.adam(LEARNING_RATE["adam"])
    lnb = lnb_fast.lnb(learning_rate=LEARNING_RATE["lnb"])
    value_grad_features = lnb_fast.value_and_grad(model.loss)
    found = {
        "adam step": Runner(make_step(model.loss, adam, False), params, adam.init(params), batch),
        "lnb step": Runner(make_step(model.loss, lnb, True), params, lnb.init(params), batch),
        "adam gradient": Runner(jax.jit(jax.value_and_grad(model.loss)), params, None, batch),
        "lnb gradient": Runner(jax.jit(value_grad_features), params, None, batch),
    }
    sizes = {
        "params": sum(int(np.prod(p.shape)) for p in params.values()),
        "neurons": len(value_grad_features.table(params, batch).neurons),
    }
    return found, sizes


def summary(seconds: list[float]) -> dict[str, float]:
    q1, median, q3 = np.percentile(np.asarray(seconds) * 1e3, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3)}


def measure(model: Model, args: argparse.Namespace, bar: tqdm) -> dict[str, Any]:
    """Warm up, then time every function once per round, alternating the order."""
    batch_size = args.batch or model.batch
    timed, sizes = runners(model, batch_size)
    compile_s = {}
    for kind, run in timed.items():
        compile_s[kind] = sum(run() for _ in range(args.warmup))
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for round_ in range(args.repeats):
        for kind in KINDS if round_ % 2 == 0 else KINDS[::-1]:
            seconds[kind].append(timed[kind]())
        bar.update()
    times = {kind: summary(s) for kind, s in seconds.items()}
    median = {kind: t["median_ms"] for kind, t in times.items()}
    return {
        "model": model.name,
        "batch": batch_size,
        **sizes,
        "times": times,
        "warmup_s": compile_s,
        "ratio_lnb_adam": median["lnb step"] / median["adam step"],
        "capture_overhead": median["lnb gradient"] / median["adam gradient"],
        "update_ms": {  # step minus gradient: the optimizer's update and apply_updates
            "adam": median["adam step"] - median["adam gradient"],
            "lnb": median["lnb step"] - median["lnb gradient"],
        },
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | params | Adam step (ms) | LNB step (ms) | ratio LNB/Adam "
        "| capture overhead |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["times"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['params']:,} | "
            f"{t['adam step']['median_ms']:.2f} | {t['lnb step']['median_ms']:.2f} | "
            f"{r['ratio_lnb_adam']:.2f}x | {r['capture_overhead']:.2f}x |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "jax": jax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def check_writable(path: Path) -> str | None:
    """Why ``path`` cannot be written (creating its folder), or None if it can."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create {path.parent}: {err}"
    if path.is_dir():
        return f"{path} is a directory"
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        return f"{target} is not writable"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every model")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compiles)")
    parser.add_argument("--out", type=Path, default=Path("results/step_time.json"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    for name in ("batch", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call compiles)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_writable(args.out)
    if problem:
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    total = args.repeats * len(args.models)
    with tqdm(total=total, desc="rounds", disable=args.quiet, leave=False) as bar:
        rows = [measure(MODELS[name], args, bar) for name in args.models]
    elapsed = time.perf_counter() - start
    print(table(rows))
    print(f"\n{args.repeats} rounds, {args.warmup} warm-up calls, {elapsed:.0f} s in all")
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "total_s": elapsed,
        "models": rows,
    }
    try:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as err:
        print(f"error: --out {args.out}: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
