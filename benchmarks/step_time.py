"""Wall time and memory of one training step of ``lnb_fast.lnb`` against ``optax.adam``, in one run.

    .venv/bin/python benchmarks/step_time.py             # three models, every strategy
    .venv/bin/python benchmarks/step_time.py --models mlp --no-time-to-target
    .venv/bin/python benchmarks/step_time.py --quick     # smoke test: tiny sizes, < 1 min

Two plain-JAX models (float32, parameters as dicts of arrays, random data from a seeded NumPy
generator, nothing downloaded):

* ``mlp``: the paper's MNIST MLP, 784-800-800-10, tanh, batch 1000;
* ``cnn``: three 3x3 convolutions (1→16, 16→32 stride 2, 32→32 stride 2, ReLU, SAME padding)
  and a dense layer to 10 classes on 28x28x1 images, batch 256;
* ``vit``: :func:`lnb.models.vit` (patch 4, dim 64, depth 2, 4 heads, MLP 128) on 28x28x1
  images, batch 128.

For each model four functions are ``jax.jit``-compiled, each a single XLA computation:

* Adam step: ``jax.value_and_grad`` + ``optax.adam(...).update`` + ``optax.apply_updates``;
* LNB step: ``lnb_fast.value_and_grad`` (gradients and each neuron's input features, from one
  forward and one backward pass) + ``lnb_fast.lnb(...).update`` + ``optax.apply_updates``;
* gradient only: ``jax.value_and_grad(loss_fn)`` and ``lnb_fast.value_and_grad(loss_fn)`` (the
  latter also returns the features); their ratio is the "capture overhead";
* LNB per metric strategy (:mod:`lnb_fast.strategy`): ``matrix-free``, ``gram`` and
  ``covariance`` forced on every neuron that can use them, ``speed``, the preset
  ``lnb_fast.SPEED`` (covariance wherever a neuron has a design, its EMA updated every 10
  steps and its inverse refreshed every 10), and ``speed/50`` (refreshed every 50); ``lnb
  step`` is ``auto``. Every LNB step gets ``neurons=`` (compact moments).

Every step function donates its parameters and optimizer state (``donate_argnums``), as a
training loop would, so that XLA's memory analysis of the compiled step (argument + output +
temporaries − aliased bytes) compares like with like: the "memory" columns are that peak
divided by Adam's. Next to each measured ratio to Adam stands the cost model's prediction,
``(F + E) / F`` with ``F`` the flops XLA counts in Adam's step and ``E`` the strategy's extra
flops summed over the neurons (:func:`lnb_fast.strategy.cost`): where they disagree, the step is
bound by memory traffic or launch overhead rather than flops.

For the MLP it also prints XLA's memory analysis of the step for each state layout (gradient
EMA and moments broadcast over the weight's rows, ``b1 = 0``, compact moments, auto,
covariance), compiled only (not with ``--quick``).

``--time-to-target`` (on by default) also trains the paper's MLP shape (800-800 tanh) with Adam
and each LNB strategy until the test accuracy reaches ``--target``, and reports epochs and wall
time (compilation excluded). ``--dataset digits`` (default: the experiments' digits, batch 100,
target 0.95) or ``--dataset fashion-mnist`` (the paper's setting: 784-800-800-10 at batch 1000,
target 0.85, Adam at 3e-4 and 1e-3, LNB at ε 0.01, 0.1, 0.3; ``make data`` installs the
dataset). ``--adam-lrs``/``--lnb-lrs`` change the rates; every ε decays ×0.75 per epoch.

Each function is first called ``--warmup`` times (compilation included, not timed); then, in each
of ``--repeats`` rounds, each function is called once and timed up to ``jax.block_until_ready``,
in an order that alternates between rounds, so that machine noise falls on all alike. The
steps carry their parameters and optimizer states from call to call, as in training. The ratios
are **means over every timed step**, refresh steps included (the covariance strategies refresh
their inverse every 10 or 50 steps: the default 100 rounds cover whole periods), with the medians
beside them (a median hides the refresh). BLAS/LAPACK is pinned to ``--blas-threads`` (1) with
threadpoolctl: JAX's CPU Cholesky runs in scipy's OpenBLAS on the host, whose threads contend with
XLA's (``benchmarks/blas_threads.py --jax``). ``--out`` (default ``results/step_time.json``)
also gets the quartiles, the machine (and the device JAX ran on: it runs unchanged on a GPU)
and the command line, and a Markdown copy of the tables goes next to it (``step_time.md``).
No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import functools
import itertools
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
from threadpoolctl import threadpool_info, threadpool_limits
from tqdm.auto import tqdm

import lnb_fast
from lnb import models as lnb_models
from lnb.experiments import LNB_OPTIONS
from lnb.train import make_step as train_step
from lnb_fast.describe import step_cost
from lnb_fast.strategy import plan
from lnb_ref.matfact import save_json

Params = dict[str, jax.Array]
Batch = tuple[jax.Array, jax.Array]
LEARNING_RATE = {"adam": 1e-3, "lnb": 1e-2}
STRATEGIES = ("matrix-free", "gram", "covariance", "speed", "speed/50")
#: ``speed``: the preset ``lnb_fast.SPEED`` (covariance wherever a neuron has a design, its EMA
#: updated every 10 steps, ``covariance_every=10``, its inverse refreshed every 10);
#: ``speed/50``: the same with the inverse refreshed every 50 steps.
COVARIANCE_EVERY = {"covariance": 1}  # the speed labels take theirs from the preset
#: The longest refresh period among the timed steps: ``--repeats`` should be a multiple of it, so
#: that the mean covers whole periods (as many refresh steps as a long run has per step).
PERIOD = 50


def lnb_options(name: str, table) -> dict[str, Any]:
    """The keyword arguments of :func:`lnb_fast.lnb` for a strategy label: ``speed`` is the
    preset; the others are forced on every neuron that can take them (scale and tagged neurons
    stay matrix-free), ``auto`` is the default."""
    if name == "speed":
        return dict(lnb_fast.SPEED)
    if name == "speed/50":
        return {**lnb_fast.SPEED, "refresh_every": 50}
    if name == "auto":
        return {}
    strategy = name.split("/")[0]
    forced = {
        n.weight_path: strategy for n, c in zip(table.neurons, plan(table), strict=True) if c.flops
    }
    return {"strategy": forced, "covariance_every": COVARIANCE_EVERY.get(name, 1)}


KINDS = (
    "adam step",
    "lnb step",
    "adam gradient",
    "lnb gradient",
    *(f"lnb {s}" for s in STRATEGIES),
    "floor",
)


def floor_step(model: Model, table):
    """The floor of every strategy that applies an exact ``d × d`` metric each step: the
    gradient, then ``θ̂ = ĝ A⁻¹`` per neuron with a fixed ``A⁻¹`` (one GEMM of ``2·D²·K``, as
    the covariance strategy's ordinary step), and ``θ ← θ − 0.01·θ̂``: no EMA, no refresh, no
    step norm, no state update. Neurons without a design keep ``θ̂ = ĝ``."""
    from lnb_fast.covariance import apply_inverse, gram_layout

    layouts = [gram_layout(n) for n in table.neurons]
    inverses = [
        None
        if isinstance(ly, str)
        else jnp.eye(ly.aug, dtype=jnp.float32)[None].repeat(ly.groups, 0)
        for ly in layouts
    ]

    def step(params, inverses, batch):
        loss, grads = jax.value_and_grad(model.loss)(params, batch)
        leaves, treedef = jax.tree.flatten(grads)
        for neuron, ly, inv in zip(table.neurons, layouts, inverses, strict=True):
            if inv is not None:
                neuron.put_params(leaves, apply_inverse(ly, inv, neuron.params_of(leaves)))
        direction = jax.tree.unflatten(treedef, leaves)
        return jax.tree.map(lambda p, d: p - 0.01 * d, params, direction), inverses, loss

    return jax.jit(step, donate_argnums=(0,)), inverses


def glorot_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int):
    """Glorot-normal weights, ``N(0, 2 / (fan_in + fan_out))``, as a float32 JAX array."""
    std = np.sqrt(2.0 / (fan_in + fan_out))
    return jnp.asarray(rng.normal(0.0, std, shape), jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp_params(rng: np.random.Generator, sizes=(784, 800, 800, 10)) -> Params:
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


VIT = lnb_models.vit((28, 28, 1), 10, patch=4, dim=64, depth=2, heads=4, mlp_dim=128)

MODELS = {
    "mlp": Model("mlp", mlp_params, mlp_loss, (784,), 1000),
    "cnn": Model("cnn", cnn_params, cnn_loss, (28, 28, 1), 256),
    "vit": Model("vit", VIT.init, lnb_models.loss_fn(VIT), (28, 28, 1), 128),
}

#: ``--quick`` swaps in a one-block ViT (its compilation dominates a smoke test) and a 784-32-32-10
#: MLP (the 800-wide one's 785×785 Cholesky refreshes are most of a smoke test's run time).
QUICK_VIT = lnb_models.vit((28, 28, 1), 10, patch=7, dim=32, depth=1, heads=2, mlp_dim=32)
QUICK_MODELS = {
    "vit": Model("vit", QUICK_VIT.init, lnb_models.loss_fn(QUICK_VIT), (28, 28, 1), 8),
    "mlp": Model(
        "mlp", functools.partial(mlp_params, sizes=(784, 32, 32, 10)), mlp_loss, (784,), 8
    ),
}


def make_step(loss: Callable, opt: optax.GradientTransformation, uses_features: bool):
    """:func:`lnb.train.make_step` with the parameters and state donated."""
    return train_step(loss, opt, uses_features, donate=True)


def peak_bytes(compiled) -> int | None:
    """XLA's memory analysis of a compiled step: argument + output + temporary bytes − aliased
    (donated) bytes; None where the backend does not report it."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def memory_breakdown(model: Model, batch_size: int) -> list[dict[str, Any]]:
    """XLA's memory analysis (MiB) of the donated step of Adam and of LNB's state layouts, from
    the state the paper's algorithm needs (gradient EMA, moments broadcast over the weight's rows)
    to the compact ones: compiled only, nothing timed."""
    rng = np.random.default_rng(0)
    params, batch = model.init(rng), model.data(rng, batch_size)
    table = lnb_fast.value_and_grad(model.loss).table(params, batch)
    lr = LEARNING_RATE["lnb"]
    variants = {
        "Adam": (optax.adam(LEARNING_RATE["adam"]), False),
        "LNB matrix-free, b1 = 0.9, broadcast moments": (
            lnb_fast.lnb(lr, b1=0.9, strategy="matrix-free"),
            True,
        ),
        "LNB matrix-free, b1 = 0, broadcast moments": (
            lnb_fast.lnb(lr, strategy="matrix-free"),
            True,
        ),
        "LNB matrix-free, compact moments (neurons=)": (
            lnb_fast.lnb(lr, strategy="matrix-free", neurons=table),
            True,
        ),
        "LNB auto, compact": (lnb_fast.lnb(lr, neurons=table), True),
        "LNB covariance": (lnb_fast.lnb(lr, strategy="covariance", neurons=table), True),
    }
    out = []
    for name, (opt, features) in variants.items():
        state = opt.init(params)
        compiled = make_step(model.loss, opt, features).lower(params, state, batch).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            return []
        mib = 2.0**20
        out.append(
            {
                "step": name,
                "peak_mib": peak_bytes(compiled) / mib,
                "arguments_mib": analysis.argument_size_in_bytes / mib,
                "temporaries_mib": analysis.temp_size_in_bytes / mib,
            }
        )
    return out


def memory_table(rows: list[dict[str, Any]]) -> str:
    adam = rows[0]["peak_mib"]
    lines = [
        "| step | peak (MiB) | / Adam | arguments (MiB) | temporaries (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['peak_mib']:.1f} | {r['peak_mib'] / adam:.2f}x | "
            f"{r['arguments_mib']:.0f} | {r['temporaries_mib']:.0f} |"
        )
    return "\n".join(lines)


def xla_flops(compiled) -> float | None:
    """The flops XLA's cost analysis counts in a compiled function."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def model_extra_flops(table, name: str) -> float:
    """The cost model's extra flops per step of the strategy labelled ``name`` summed over the
    neurons (:func:`lnb_fast.describe.step_cost`: a neuron that cannot use it counts as
    matrix-free, ``(k + 1)·4·n·P``, as lnb would run it)."""
    options = lnb_options(name, table)
    strategy = options.pop("strategy", "auto")
    return step_cost(table, strategy, **options)["solver"]


def copy_tree(tree):
    """A fresh copy of every array (each runner donates its own buffers)."""
    return jax.tree.map(jnp.copy, tree)


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


def runners(model: Model, batch_size: int) -> tuple[dict[str, Runner], dict[str, Any]]:
    """The timed functions of ``model``; its sizes, each step's peak memory and the flops."""
    rng = np.random.default_rng(0)
    params, batch = model.init(rng), model.data(rng, batch_size)
    value_grad_features = lnb_fast.value_and_grad(model.loss)
    table = value_grad_features.table(params, batch)
    opts = {
        "adam": (optax.adam(LEARNING_RATE["adam"]), False),
        "lnb step": (lnb_fast.lnb(learning_rate=LEARNING_RATE["lnb"], neurons=table), True),
    }
    for name in STRATEGIES:
        opt = lnb_fast.lnb(LEARNING_RATE["lnb"], neurons=table, **lnb_options(name, table))
        opts[f"lnb {name}"] = (opt, True)
    found, memory = {}, {}
    for name, (opt, features) in opts.items():
        state = opt.init(params)
        # Compiled once: its memory analysis, then the timed calls (the first is untimed).
        step = make_step(model.loss, opt, features).lower(params, state, batch).compile()
        kind = "adam step" if name == "adam" else name
        memory[kind] = peak_bytes(step)
        found[kind] = Runner(step, copy_tree(params), copy_tree(state), batch)
    adam_grad = jax.jit(jax.value_and_grad(model.loss)).lower(params, batch).compile()
    found["adam gradient"] = Runner(adam_grad, params, None, batch)
    found["lnb gradient"] = Runner(jax.jit(value_grad_features), params, None, batch)
    step, inverses = floor_step(model, table)
    found["floor"] = Runner(step, copy_tree(params), inverses, batch)
    base = xla_flops(adam_grad)
    predicted = {
        s: None if not base else 1 + model_extra_flops(table, s) / base
        for s in ("auto", *STRATEGIES)
    }
    sizes = {
        "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)),
        "neurons": len(table.neurons),
        "memory_bytes": memory,
        "gradient_flops": base,
        "predicted_ratio": predicted,
        "strategies": {
            n.weight_path: c.name for n, c in zip(table.neurons, plan(table), strict=True)
        },
    }
    return found, sizes


def summary(seconds: list[float]) -> dict[str, float]:
    """Mean over every timed call (refresh steps included: the cost per step of a long run),
    and the median and quartiles (which hide a step that is slow once in a period)."""
    ms = np.asarray(seconds) * 1e3
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return {
        "mean_ms": float(ms.mean()),
        "median_ms": float(median),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "max_ms": float(ms.max()),
    }


def interleaved(
    timed: dict[str, Runner], order, repeats: int, warmup: int, bar: tqdm
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Call every function ``warmup`` times (compilation included, not timed: their summed
    seconds are returned), then, in each of ``repeats`` rounds, each once, timed, in ``order``
    on even rounds and reversed on odd ones, so that machine noise falls on all alike:
    ``(warm-up seconds, {kind: [seconds per round]})``."""
    warm = {kind: sum(run() for _ in range(warmup)) for kind, run in timed.items()}
    seconds: dict[str, list[float]] = {kind: [] for kind in order}
    for round_ in range(repeats):
        for kind in order if round_ % 2 == 0 else order[::-1]:
            seconds[kind].append(timed[kind]())
        bar.update()
    return warm, seconds


def measure(model: Model, args: argparse.Namespace, bar: tqdm) -> dict[str, Any]:
    """Warm up, then time every function once per round, alternating the order."""
    batch_size = args.batch or model.batch
    timed, sizes = runners(model, batch_size)
    compile_s, seconds = interleaved(timed, KINDS, args.repeats, args.warmup, bar)
    times = {kind: summary(s) for kind, s in seconds.items()}
    mean = {kind: t["mean_ms"] for kind, t in times.items()}
    median = {kind: t["median_ms"] for kind, t in times.items()}
    memory = sizes["memory_bytes"]
    adam_bytes = memory.get("adam step")
    per_strategy = {}
    for label, kind in (("auto", "lnb step"), *((s, f"lnb {s}") for s in STRATEGIES)):
        per_strategy[label] = {
            "mean_ms": mean[kind],
            "median_ms": median[kind],
            "ratio": mean[kind] / mean["adam step"],
            "median_ratio": median[kind] / median["adam step"],
            "predicted_ratio": sizes["predicted_ratio"][label],
            "memory_ratio": (
                memory[kind] / adam_bytes if memory.get(kind) and adam_bytes else None
            ),
        }
    return {
        "strategy_ratios": per_strategy,
        "model": model.name,
        "batch": batch_size,
        **sizes,
        "times": times,
        "warmup_s": compile_s,
        "ratio_lnb_adam": mean["lnb step"] / mean["adam step"],
        # gradient + one d×d product per neuron: no exact-metric strategy runs below it
        "floor_ratio": mean["floor"] / mean["adam step"],
        "capture_overhead": mean["lnb gradient"] / mean["adam gradient"],
        "update_ms": {  # step minus gradient: the optimizer's update and apply_updates
            "adam": mean["adam step"] - mean["adam gradient"],
            "lnb": mean["lnb step"] - mean["lnb gradient"],
        },
    }


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "x") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def strategy_table(rows: list[dict[str, Any]]) -> str:
    """Per model and strategy: step time (mean over every step), the measured ratio to Adam
    (mean, and median beside it) and the predicted one, and the memory ratio."""
    lines = [
        "| model | strategy | LNB step, mean (ms) | step / Adam, mean | median | "
        "predicted (flops) | memory / Adam |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for name, s in r["strategy_ratios"].items():
            lines.append(
                f"| {r['model']} | {name} | {s['mean_ms']:.2f} | {_fmt(s['ratio'])} | "
                f"{_fmt(s['median_ratio'])} | {_fmt(s['predicted_ratio'])} | "
                f"{_fmt(s['memory_ratio'])} |"
            )
    return "\n".join(lines)


def target_table(results: list[dict[str, Any]], target: float) -> str:
    """Epochs and wall time to the target, and the wall time over the fastest Adam's."""
    lines = [
        f"| optimizer | epochs to {target:.0%} test accuracy | wall time (s) | wall time / Adam's "
        "| best accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    adam = [r["seconds"] for r in results if r["optimizer"].startswith("adam") and r["seconds"]]
    for r in results:
        epochs = "not reached" if r["epochs"] is None else str(r["epochs"])
        wall = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        ratio = "-" if r["seconds"] is None or not adam else f"{r['seconds'] / min(adam):.2f}"
        lines.append(
            f"| {r['optimizer']} | {epochs} | {wall} | {ratio} | {r['best_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def time_to_target(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train the MLP on ``args.dataset`` with Adam and every LNB strategy until ``args.target``
    test accuracy (or ``args.max_epochs``): epochs and wall time (compilation excluded)."""
    from lnb.data import load

    data = load(args.dataset, seed=0)
    hidden = (32, 32) if args.quick else (800, 800)
    model = lnb_models.mlp(int(np.prod(data.input_shape)), data.n_classes, hidden=hidden)
    loss = lnb_models.loss_fn(model)
    batch = 1000 if args.dataset == "fashion-mnist" else 100
    steps = len(data.x_train) // batch
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    accuracy = jax.jit(
        lambda p: jnp.mean(jnp.argmax(model.apply(p, x_test), -1) == y_test)  # noqa: B023
    )
    init = model.init(np.random.default_rng(0))
    first = (jnp.asarray(data.x_train[:batch]), jnp.asarray(data.y_train[:batch]))
    table = lnb_fast.value_and_grad(loss).table(init, first)
    candidates = {}
    for lr in args.adam_lrs:
        candidates[f"adam {lr:g}"] = (optax.adam(lr), False)
    for name, eps in itertools.product(("auto", *STRATEGIES), args.lnb_lrs):
        options = lnb_options(name, table)
        if "strategy" in options and not name.startswith("speed"):
            options["strategy"] = name.split("/")[0]
        opt = lnb_fast.lnb(
            optax.exponential_decay(eps, steps, 0.75), neurons=table, **options, **LNB_OPTIONS
        )
        candidates[f"lnb {name} (ε {eps:g})"] = (opt, True)
    out = []
    for name, (opt, features) in candidates.items():
        params, state = copy_tree(init), copy_tree(opt.init(init))
        step = make_step(loss, opt, features).lower(params, state, first).compile()
        rng = np.random.default_rng(0)
        seconds, reached, best = 0.0, None, 0.0
        for epoch in range(1, args.max_epochs + 1):
            order = rng.permutation(len(data.x_train))
            batches = [
                (
                    jnp.asarray(data.x_train[order[i * batch : (i + 1) * batch]]),
                    jnp.asarray(data.y_train[order[i * batch : (i + 1) * batch]]),
                )
                for i in range(steps)
            ]
            start = time.perf_counter()
            for b in batches:
                params, state, _ = step(params, state, b)
            jax.block_until_ready(params)
            seconds += time.perf_counter() - start
            acc = float(accuracy(params))
            best = max(best, acc)
            if acc >= args.target:
                reached = epoch
                break
        out.append(
            {
                "optimizer": name,
                "epochs": reached,
                "seconds": seconds if reached else None,
                "best_accuracy": best,
                "model": model.name,
            }
        )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | params | Adam step, mean (ms) | LNB step, auto, mean (ms) "
        "| ratio LNB/Adam | floor / Adam | capture overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["times"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['params']:,} | "
            f"{t['adam step']['mean_ms']:.2f} | {t['lnb step']['mean_ms']:.2f} | "
            f"{r['ratio_lnb_adam']:.2f}x | {r['floor_ratio']:.2f}x | {r['capture_overhead']:.2f}x |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """The device, versions and the BLAS/LAPACK libraries with their thread counts (JAX's CPU
    Cholesky calls LAPACK on the host)."""
    return {
        "blas": [
            {k: lib.get(k) for k in ("user_api", "internal_api", "version", "num_threads")}
            for lib in threadpool_info()
        ],
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def pin_blas(threads: int) -> None:
    """Limit every BLAS/LAPACK library to ``threads`` (0: leave them as they are). JAX's CPU
    Cholesky (the covariance refresh) runs LAPACK on the host, in scipy's OpenBLAS, whose thread
    pool contends with XLA's; jaxlib loads that library on its first LAPACK call, so scipy.linalg
    is imported first, or the limit would miss it (docs/fast.md, Speed)."""
    if threads:
        import scipy.linalg  # noqa: F401 - loads the OpenBLAS jaxlib's LAPACK kernels use

        threadpool_limits(limits=threads)


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


def unwritable(path: Path) -> bool:
    """Whether ``--out path`` cannot be written, saying why in one line on stderr."""
    problem = check_writable(path)
    if problem:
        print(f"error: --out {path}: {problem}", file=sys.stderr)
    return problem is not None


def at_least_one(parser: argparse.ArgumentParser, args: argparse.Namespace, names) -> None:
    """A usage error naming the first of ``names`` (attributes of ``args``; ``None`` is unset)
    whose value is below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")


def model_names(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """``--models``' comma-separated names, each one of :data:`MODELS` (else a usage error)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    return names


def write_results(out: Path, record: dict, text: str) -> int:
    """``record`` as JSON at ``out`` (written atomically) and ``text`` beside it as Markdown:
    0, or 2 with a one-line error."""
    try:
        save_json(out, record, indent=2)
        out.with_suffix(".md").write_text(text + "\n")
    except OSError as err:
        print(f"error: --out {out}: {err}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn,vit", help="comma-separated: mlp, cnn, vit")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every model")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2 * PERIOD,
        help=f"timed rounds per model (a multiple of {PERIOD}: whole refresh periods)",
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="BLAS/LAPACK threads (threadpoolctl; 0 leaves the library default)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compiles)")
    parser.add_argument("--out", type=Path, default=Path("results/step_time.json"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: batch 8, 2 rounds, 1 warm-up, tiny MLP"
    )
    parser.add_argument(
        "--dataset",
        default="digits",
        choices=("digits", "fashion-mnist"),
        help="time-to-target data: digits (batch 100) or fashion-mnist (batch 1000)",
    )
    parser.add_argument(
        "--target", type=float, default=None, help="test accuracy to reach (0.95; 0.85 fashion)"
    )
    parser.add_argument("--max-epochs", type=int, default=30, help="time-to-target epoch limit")
    parser.add_argument(
        "--no-time-to-target",
        dest="time_to_target",
        action="store_false",
        help="skip the time-to-target runs",
    )
    parser.add_argument(
        "--adam-lrs", default=None, help="Adam rates for time-to-target (3e-4; fashion 3e-4,1e-3)"
    )
    parser.add_argument(
        "--lnb-lrs", default=None, help="LNB's ε for time-to-target (0.01; fashion 0.01,0.1,0.3)"
    )
    args = parser.parse_args(argv)
    fashion = args.dataset == "fashion-mnist"
    args.adam_lrs = [
        float(v) for v in (args.adam_lrs or ("3e-4,1e-3" if fashion else "3e-4")).split(",")
    ]
    args.lnb_lrs = [
        float(v) for v in (args.lnb_lrs or ("0.01,0.1,0.3" if fashion else "0.01")).split(",")
    ]
    if args.target is None:
        args.target = 0.85 if args.dataset == "fashion-mnist" else 0.95
    if args.quick:
        args.batch = args.batch or 8
        args.repeats, args.warmup, args.max_epochs = 2, 1, 2
    args.models = model_names(parser, args.models)
    at_least_one(parser, args, ("batch", "repeats"))
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call compiles)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if unwritable(args.out):
        return 2
    pin_blas(args.blas_threads)
    start = time.perf_counter()
    total = args.repeats * len(args.models)
    with tqdm(total=total, desc="rounds", disable=args.quiet, leave=False) as bar:
        chosen = {**MODELS, **QUICK_MODELS} if args.quick else MODELS
        rows = [measure(chosen[name], args, bar) for name in args.models]
    memory = []
    if "mlp" in args.models and not args.quick:
        memory = memory_breakdown(MODELS["mlp"], args.batch or MODELS["mlp"].batch)
    targets = time_to_target(args) if args.time_to_target else []
    elapsed = time.perf_counter() - start
    info = machine()
    text = [
        f"Device: {info['device']} ({info['backend']}); {args.repeats} rounds, "
        f"{args.warmup} warm-up calls, BLAS threads {args.blas_threads or 'default'}, "
        f"{elapsed:.0f} s in all. Ratios are means over every step (refreshes included); "
        "medians beside them.",
        "",
        table(rows),
        "",
        strategy_table(rows),
    ]
    if args.repeats % PERIOD:
        text += [
            "",
            f"Note: {args.repeats} rounds is not a multiple of the refresh period {PERIOD}: the "
            "means of the covariance strategies cover a partial period.",
        ]
    if memory:
        text += ["", "Memory of the MLP's step by state layout:", "", memory_table(memory)]
    if targets:
        text += [
            "",
            f"Time to target on {args.dataset}, {targets[0]['model']}:",
            "",
            target_table(targets, args.target),
        ]
    print("\n".join(text))
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": info,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "total_s": elapsed,
        "models": rows,
        "memory_layouts": memory,
        "time_to_target": {"dataset": args.dataset, "target": args.target, "results": targets},
    }
    if write_results(args.out, record, "\n".join(text)):
        return 2
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
