"""Which ridge should ``lnb_fast.lnb`` default to? Four candidates, measured in one command.

    .venv/bin/python benchmarks/ridge_default.py            # the full study (~15 min on 2 cores)
    .venv/bin/python benchmarks/ridge_default.py --quick    # smoke test: tiny sizes
    .venv/bin/python benchmarks/ridge_default.py --parts invariance,stress

The candidates (:data:`CANDIDATES`) differ only in ``ridge`` (γ) and ``relative_ridge``: the
absolute γ = 1e-3 (the old default) and γ·Var(x_j) per input feature with γ = 1e-3, 1e-2, 1e-1.
Everything else is at ``lnb_fast.lnb``'s defaults (``b1 = 0``, 2 warm-started PCG iterations,
``step_norm="metric"``, ``strategy="auto"`` unless a part forces one) except
``nonfinite="skip"``, so that a run that meets a NaN keeps going and is counted instead of
raising. Parts (``--parts``, all by default):

* ``invariance`` (float64): a 20-32-32-5 MLP with biases (tanh, and relu) on data ``X`` and on
  ``a⊙X + c`` (``a`` log-uniform on [1e-2, 1e2], ``c`` normal of scale 3), the first layer
  transformed so that both start as the same function (``W' = W / a[:, None]``,
  ``b' = b − (c/a) @ W``); 10 LNB steps (ε = 0.1) on each with the same minibatches of 64. The
  gap is the max over steps of the max absolute difference of the logits on all 256 samples
  (the logits are of order 1, so it reads as a relative error too). The same with ``a = ±1``
  (random signs; ``1 − x`` is such a map), which an absolute ridge should keep exactly too: with
  a bias it only sees ``|W|²``, which a sign flip and a shift leave alone. The default strategy
  (``auto``: gram on the hidden layers, matrix-free on the last) is in the main table, every
  strategy of ``--inv-strategies`` (default ``auto,covariance``) in the second one.
* ``cnn``, ``unet``: the ReLU CNN (digits) and the UNet (synthetic shapes) of
  ``lnb reproduce`` with its LNB settings (:data:`lnb.experiments.LNB_OPTIONS`, its ε and ×0.75
  per epoch decay, its batch size and training set), ridge overridden per candidate, for
  ``--epochs-cnn`` (5) and ``--epochs-unet`` (3) epochs and each of ``--seeds`` (0, 1;
  ``--unet-seeds`` for the UNet alone; the seed draws the split, the initial weights and the
  batches, as ``lnb reproduce --seed``): final train loss, final test metric (accuracy, mean
  IoU), steps whose loss was non-finite and steps the optimizer skipped. ``--lr-cnn``,
  ``--lr-unet`` change the initial ε (the experiments' were tuned under an absolute γ = 0.1).
* ``stress``: the paper's MLP 784-800-800-10 (tanh, Glorot), one batch of 8 uniform [0, 1]
  inputs with random labels (far fewer samples than features), 40 steps on that batch at
  ε = 1e-2, for each forced strategy (matrix-free, gram, covariance): final loss, and the first
  step whose loss was non-finite.
* ``readme``: the README's ``lnb_fast`` model (Equinox MLP 64-128-128-10, 512 samples of
  ``normal + 2``) with ``lnb_fast.lnb`` alone at constant ε = 0.05 for 1000 full-batch steps, as
  ``tests/test_readme.py::test_readme_model_at_constant_epsilon_never_spikes`` runs it for the
  default: final loss, the number of *spikes* (steps whose loss is more than 10× the previous
  one and above 1e-3; that test allows none) and the largest rise of the loss between two steps
  (that test allows ε).

``--out`` (default ``results/ridge_default.json``) gets every number (per seed, per step curves
of the stress and README runs), the machine, the command and per-part wall times; the
Markdown tables are printed and written next to it (``.md``). ``benchmarks/ridge_default.md``
holds the committed result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lnb_fast


@dataclass(frozen=True)
class Candidate:
    """A candidate default: ``lnb_fast.lnb(ridge=gamma, relative_ridge=relative)``."""

    gamma: float
    relative: bool

    @property
    def label(self) -> str:
        return f"{'relative' if self.relative else 'absolute'} {self.gamma:g}"

    def options(self) -> dict[str, Any]:
        return {"ridge": self.gamma, "relative_ridge": self.relative, "nonfinite": "skip"}


CANDIDATES = (
    Candidate(1e-3, False),
    Candidate(1e-3, True),
    Candidate(1e-2, True),
    Candidate(1e-1, True),
)
PARTS = ("invariance", "cnn", "unet", "stress", "readme")
STRATEGIES = ("auto", "matrix-free", "gram", "covariance")


@dataclass(frozen=True)
class Sizes:
    """How big each part is (``--quick`` shrinks all of them)."""

    inv_n: int = 256
    inv_batch: int = 64
    inv_steps: int = 10
    inv_hidden: tuple[int, ...] = (32, 32)
    inv_activations: tuple[str, ...] = ("tanh", "relu")
    epochs_cnn: int = 5
    epochs_unet: int = 3
    n_train: int | None = None  # None: the experiment's own
    n_test: int | None = None
    seeds: tuple[int, ...] = (0, 1)
    unet_seeds: tuple[int, ...] | None = None  # None: ``seeds``
    inv_strategies: tuple[str, ...] = ("auto", "covariance")
    stress_hidden: tuple[int, ...] = (800, 800)
    stress_steps: int = 40
    readme_steps: int = 1000


QUICK = Sizes(
    inv_steps=4,
    epochs_cnn=1,
    epochs_unet=1,
    n_train=100,
    n_test=100,
    seeds=(0,),
    inv_activations=("tanh",),
    inv_strategies=("auto",),
    stress_hidden=(32, 32),
    stress_steps=5,
    readme_steps=30,
)


def finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


# --- 1. invariance to per-feature affine maps of the inputs (float64) ----------------------------
def _mlp_apply(params, x, act):
    h = x
    n = len(params)
    for i in range(n):
        p = params[f"layer{i}"]
        h = h @ p["w"] + p["b"]
        if i < n - 1:
            h = act(h)
    return h


def invariance(sizes: Sizes, activation: str, seed: int = 0, epsilon: float = 0.1) -> dict:
    """The logit gap between LNB on ``X`` and on ``a⊙X + c`` from the same initial function, per
    candidate and strategy (float64; the caller enables x64)."""
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[activation]
    rng = np.random.default_rng(seed)
    d, k = 20, 5
    dims = [d, *sizes.inv_hidden, k]
    X = rng.normal(size=(sizes.inv_n, d)) * rng.uniform(0.5, 2.0, d) + rng.normal(size=d)
    y = np.argmax(X @ rng.normal(size=(d, k)), axis=1)
    a = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), d))
    c = rng.normal(scale=3.0, size=d)
    signs = rng.choice([-1.0, 1.0], d)  # a sign flip and a shift: 1 − x is one
    params = {
        f"layer{i}": {
            "w": rng.normal(size=(m, n)) * np.sqrt(2.0 / (m + n)),
            "b": rng.normal(scale=0.1, size=n),
        }
        for i, (m, n) in enumerate(zip(dims[:-1], dims[1:], strict=True))
    }

    def transformed(scale, shift):
        """``(scale⊙X + shift, params computing the same function on it)``."""
        W, b = params["layer0"]["w"], params["layer0"]["b"]
        first = {"w": W / scale[:, None], "b": b - (shift / scale) @ W}
        return X * scale + shift, {**params, "layer0": first}

    to_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    runs = {"affine": transformed(a, c), "shift": transformed(signs, c)}
    runs = {name: (jnp.asarray(Xt), to_jnp(pt)) for name, (Xt, pt) in runs.items()}
    params, X, y = to_jnp(params), jnp.asarray(X), jnp.asarray(y)
    order = [
        rng.choice(sizes.inv_n, sizes.inv_batch, replace=False) for _ in range(sizes.inv_steps)
    ]

    def loss(p, batch):
        x, t = batch
        return optax.softmax_cross_entropy_with_integer_labels(_mlp_apply(p, x, act), t).mean()

    vgf = lnb_fast.value_and_grad(loss)
    neurons = vgf.table(params, (X[: sizes.inv_batch], y[: sizes.inv_batch]))
    logits = jax.jit(lambda p, x: _mlp_apply(p, x, act))
    gap_of = lambda p, pt, Xt: float(jnp.max(jnp.abs(logits(p, X) - logits(pt, Xt))))  # noqa: E731
    out: dict[str, Any] = {
        "activation": activation,
        "dims": dims,
        "epsilon": epsilon,
        "steps": sizes.inv_steps,
        "initial_gap": max(gap_of(params, pt, Xt) for Xt, pt in runs.values()),
        "logit_scale": float(jnp.max(jnp.abs(logits(params, X)))),
        "gaps": {},  # x ↦ a⊙x + c
        "shift_gaps": {},  # x ↦ ±x + c
    }
    for cand in CANDIDATES:
        out["gaps"][cand.label], out["shift_gaps"][cand.label] = {}, {}
        for strategy in sizes.inv_strategies:
            opt = lnb_fast.lnb(epsilon, neurons=neurons, strategy=strategy, **cand.options())

            @jax.jit
            def step(p, s, batch, opt=opt):
                _, g, f = vgf(p, batch)
                u, s = opt.update(g, s, p, features=f)
                return optax.apply_updates(p, u), s

            for name, (Xt, pt) in runs.items():
                p, s, st = params, opt.init(params), opt.init(pt)
                gap = 0.0
                for idx in order:
                    p, s = step(p, s, (X[idx], y[idx]))
                    pt, st = step(pt, st, (Xt[idx], y[idx]))
                    gap = max(gap, gap_of(p, pt, Xt))
                key = "gaps" if name == "affine" else "shift_gaps"
                out[key][cand.label][strategy] = gap if np.isfinite(gap) else None
    return out


# --- 2a. the ReLU CNN and the UNet of `lnb reproduce` --------------------------------------------
def train_experiment(
    name: str, cand: Candidate, seed: int, epochs: int, sizes: Sizes, epsilon: float | None = None
) -> dict:
    """``lnb reproduce NAME --optimizers lnb --seed SEED`` with the candidate's ridge, counting
    non-finite losses and skipped steps."""
    from lnb import data as datasets
    from lnb.experiments import EXPERIMENTS, load_data
    from lnb.models import build, loss_fn
    from lnb.train import evaluate, make_eval, make_step, neuron_table

    exp = EXPERIMENTS[name]
    n_train = sizes.n_train if sizes.n_train is not None else exp.n_train
    data = datasets.subset(load_data(exp, seed, None, None), n_train, sizes.n_test, seed)
    model = build(exp.model, data.input_shape, data.n_classes, **exp.model_options)
    base = exp.optimizers["lnb"]
    spec = replace(base, options={**base.options, **cand.options()})
    if epsilon is not None:  # the initial ε (decayed as the experiment decays it)
        spec = replace(spec, learning_rate=epsilon)
    batch_size = min(exp.batch_size, len(data.x_train))
    steps_per_epoch = len(data.x_train) // batch_size
    params = model.init(np.random.default_rng(seed))
    loss = loss_fn(model)
    x0, y0 = jnp.asarray(data.x_train[:batch_size]), jnp.asarray(data.y_train[:batch_size])
    opt = spec.build(steps_per_epoch, neuron_table(loss, params, (x0, y0)))
    state = opt.init(params)
    step = make_step(loss, opt, uses_features=True).lower(params, state, (x0, y0)).compile()
    evaluate_fn = make_eval(model, data.n_classes)
    rng = np.random.default_rng(seed)
    nonfinite_losses = 0
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(len(data.x_train))
        values = []
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            batch = (jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx]))
            params, state, value = step(params, state, batch)
            values.append(value)
        nonfinite_losses += int(np.sum(~np.isfinite(np.asarray(jnp.stack(values)))))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    train_loss, train_metric = evaluate(evaluate_fn, params, data.x_train, data.y_train, data.task)
    test_loss, test_metric = evaluate(evaluate_fn, params, data.x_test, data.y_test, data.task)
    return {
        "experiment": name,
        "candidate": cand.label,
        "seed": seed,
        "epochs": epochs,
        "steps": epochs * steps_per_epoch,
        "batch_size": batch_size,
        "n_train": len(data.x_train),
        "learning_rate": spec.learning_rate,
        "decay": spec.decay,
        "options": spec.options,
        "train_loss": finite_or_none(train_loss),
        "train_metric": finite_or_none(train_metric),
        "test_loss": finite_or_none(test_loss),
        "test_metric": finite_or_none(test_metric),
        "nonfinite_losses": nonfinite_losses,
        "skipped": int(state.skipped),
        "restarts": int(state.restarts),
        "train_seconds": seconds,
    }


# --- 2b. batch 8 on a 784-800-800-10 MLP, one batch stepped repeatedly ---------------------------
def scan_steps(loss, opt, params, batch, steps: int):
    """``steps`` LNB steps on one batch in one ``lax.scan``: the loss before each step and after
    the last, and the final state."""
    vgf = lnb_fast.value_and_grad(loss)

    def body(carry, _):
        p, s = carry
        value, g, f = vgf(p, batch)
        u, s = opt.update(g, s, p, features=f)
        return (optax.apply_updates(p, u), s), value

    @jax.jit
    def run(p):
        (p, s), values = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)
        return jnp.append(values, loss(p, batch)), s

    return run(params)


def stress(cand: Candidate, strategy: str, sizes: Sizes, seed: int = 0) -> dict:
    from lnb.models import loss_fn, mlp

    model = mlp(784, 10, sizes.stress_hidden, "tanh")
    rng = np.random.default_rng(seed)
    params = model.init(rng)
    batch = (
        jnp.asarray(rng.uniform(size=(8, 784)), jnp.float32),
        jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
    )
    loss = loss_fn(model)
    neurons = lnb_fast.value_and_grad(loss).table(params, batch)
    opt = lnb_fast.lnb(1e-2, neurons=neurons, strategy=strategy, **cand.options())
    losses, state = scan_steps(loss, opt, params, batch, sizes.stress_steps)
    losses = np.asarray(losses, dtype=float)
    bad = np.flatnonzero(~np.isfinite(losses))
    return {
        "candidate": cand.label,
        "strategy": strategy,
        "final_loss": finite_or_none(losses[-1]),
        "first_nonfinite_step": int(bad[0]) if len(bad) else None,
        "skipped": int(state.skipped),
        "losses": [finite_or_none(v) for v in losses],
    }


# --- 2c. the README example at constant ε ---------------------------------------------------------
def readme_problem():
    """The README example's params, loss and batch: ``readme_problem`` of
    ``benchmarks/step_norm.py``, loaded by path (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "step_norm", Path(__file__).resolve().with_name("step_norm.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_problem()


def readme(cand: Candidate, sizes: Sizes, epsilon: float = 0.05) -> dict:
    params, loss, (x, y) = readme_problem()
    opt = lnb_fast.lnb(epsilon, **cand.options())
    losses, state = scan_steps(loss, opt, params, (x, y), sizes.readme_steps)
    losses = np.asarray(losses, dtype=float)
    prev, cur = losses[:-1], losses[1:]
    spikes = np.flatnonzero((cur > 10 * prev) & (cur > 1e-3)) + 1
    return {
        "candidate": cand.label,
        "epsilon": epsilon,
        "steps": sizes.readme_steps,
        "final_loss": finite_or_none(losses[-1]),
        "min_loss": finite_or_none(np.nanmin(losses)),
        "spikes": len(spikes),
        "spike_steps": spikes.tolist(),
        "nonfinite_losses": int(np.sum(~np.isfinite(losses))),
        "max_rise": finite_or_none(np.nanmax(np.diff(losses))),
        "skipped": int(state.skipped),
        "losses": [finite_or_none(v) for v in losses],
    }


# --- tables ---------------------------------------------------------------------------------------
def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "NaN"
    if isinstance(v, int | np.integer):
        return str(v)
    return f"{v + 0.0:.{digits}g}"  # + 0.0: -0.0 (a cross-entropy rounded) prints as 0


def markdown(record: dict) -> str:
    labels = [c.label for c in CANDIDATES]
    rows: list[tuple[str, list[str]]] = []
    for key, what in (("gaps", "a⊙x + c"), ("shift_gaps", "±x + c")):
        for inv in record.get("invariance", []):
            rows.append(
                (
                    f"invariance gap, x ↦ {what}, MLP {'-'.join(map(str, inv['dims']))} "
                    f"{inv['activation']} (auto, {inv['steps']} steps, float64)",
                    [fmt(inv[key][lab]["auto"], 2) for lab in labels],
                )
            )
    metric_names = {"cnn": "test accuracy", "unet": "test mean IoU"}
    for name in ("cnn", "unet"):
        runs = record.get(name)
        if not runs:
            continue
        by = {lab: [r for r in runs if r["candidate"] == lab] for lab in labels}
        r0 = runs[0]
        what = (
            f"{name} (ε {r0['learning_rate']:g}, {r0['epochs']} ep, "
            f"seeds {'/'.join(str(r['seed']) for r in by[labels[0]])})"
        )
        rows.append(
            (
                f"{what}: final train loss",
                [" / ".join(fmt(r["train_loss"]) for r in by[lab]) for lab in labels],
            )
        )
        rows.append(
            (
                f"{what}: {metric_names[name]}",
                [" / ".join(fmt(r["test_metric"]) for r in by[lab]) for lab in labels],
            )
        )
        rows.append(
            (
                f"{what}: non-finite losses / skipped steps (of {r0['steps']})",
                [
                    " / ".join(f"{r['nonfinite_losses']}/{r['skipped']}" for r in by[lab])
                    for lab in labels
                ],
            )
        )
    stress_runs = record.get("stress", [])
    for strategy in ("matrix-free", "gram", "covariance"):
        runs = {r["candidate"]: r for r in stress_runs if r["strategy"] == strategy}
        if not runs:
            continue
        cells = []
        for lab in labels:
            r = runs[lab]
            cell = fmt(r["final_loss"])
            if r["first_nonfinite_step"] is not None:
                cell = f"NaN from step {r['first_nonfinite_step']}"
            cells.append(cell)
        n = len(stress_runs[0]["losses"]) - 1
        rows.append((f"batch-8 MLP, {n} steps on one batch, {strategy}: final loss", cells))
    rd = {r["candidate"]: r for r in record.get("readme", [])}
    if rd:
        n = rd[labels[0]]["steps"]
        rows.append(
            (
                f"README MLP, ε = 0.05, {n} steps: final loss",
                [fmt(rd[lab]["final_loss"]) for lab in labels],
            )
        )
        rows.append(
            (
                "README MLP: spikes (loss ×10 and > 1e-3)",
                [fmt(rd[lab]["spikes"]) for lab in labels],
            )
        )
        rows.append(
            (
                "README MLP: largest loss rise between two steps / ε",
                [
                    fmt(None if r["max_rise"] is None else r["max_rise"] / r["epsilon"], 2)
                    for r in (rd[lab] for lab in labels)
                ],
            )
        )
    lines = [
        "| measurement | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
        *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows),
    ]
    if record.get("invariance"):
        lines += [
            "",
            "Invariance gap per strategy (max |logits − logits'| over the steps):",
            "",
            "| map | activation | strategy | " + " | ".join(labels) + " |",
            "|---|---|---|" + "---|" * len(labels),
        ]
        for key, what in (("gaps", "a⊙x + c"), ("shift_gaps", "±x + c")):
            for inv in record["invariance"]:
                for strategy in inv[key][labels[0]]:
                    cells = [fmt(inv[key][lab][strategy], 2) for lab in labels]
                    lines.append(
                        f"| {what} | {inv['activation']} | {strategy} | " + " | ".join(cells) + " |"
                    )
    return "\n".join(lines)


def save(path: Path, record: dict) -> None:
    try:
        from lnb_ref.matfact import save_json
    except ImportError:  # pragma: no cover - save_json is in lnb_ref
        path.write_text(json.dumps(record, indent=1))
    else:
        save_json(path, record)


# --- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    parser.add_argument("--epochs-cnn", type=int, default=None)
    parser.add_argument("--epochs-unet", type=int, default=None)
    parser.add_argument("--lr-cnn", type=float, default=None, help="ε of the CNN (default 0.01)")
    parser.add_argument("--lr-unet", type=float, default=None, help="ε of the UNet (default 0.1)")
    parser.add_argument("--seeds", default=None, help="comma-separated, e.g. 0,1")
    parser.add_argument("--unet-seeds", default=None, help="the UNet's seeds (default: --seeds)")
    parser.add_argument(
        "--inv-strategies", default=None, help=f"invariance strategies, of {','.join(STRATEGIES)}"
    )
    parser.add_argument("--out", default="results/ridge_default.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    sizes = QUICK if args.quick else Sizes()
    if args.epochs_cnn is not None:
        sizes = replace(sizes, epochs_cnn=args.epochs_cnn)
    if args.epochs_unet is not None:
        sizes = replace(sizes, epochs_unet=args.epochs_unet)
    if args.seeds:
        sizes = replace(sizes, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.unet_seeds:
        sizes = replace(sizes, unet_seeds=tuple(int(s) for s in args.unet_seeds.split(",")))
    if args.inv_strategies:
        sizes = replace(sizes, inv_strategies=tuple(args.inv_strategies.split(",")))
        bad = sorted(set(sizes.inv_strategies) - set(STRATEGIES))
        if bad:
            parser.error(
                f"unknown strategies {', '.join(bad)}; choose from {', '.join(STRATEGIES)}"
            )

    jobs: list[tuple[str, Any]] = []
    if "invariance" in parts:
        jobs += [("invariance", act) for act in sizes.inv_activations]
    for name in ("cnn", "unet"):
        if name in parts:
            epochs, seeds = sizes.epochs_cnn, sizes.seeds
            if name == "unet":
                epochs, seeds = sizes.epochs_unet, sizes.unet_seeds or sizes.seeds
            jobs += [(name, (c, s, epochs)) for s in seeds for c in CANDIDATES]
    if "stress" in parts:
        jobs += [
            ("stress", (c, s)) for s in ("matrix-free", "gram", "covariance") for c in CANDIDATES
        ]
    if "readme" in parts:
        jobs += [("readme", c) for c in CANDIDATES]

    record: dict[str, Any] = {
        "command": " ".join(
            ["benchmarks/ridge_default.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": args.quick,
        "sizes": sizes.__dict__,
        "candidates": [c.label for c in CANDIDATES],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_start": list(os.getloadavg()),
            "device": str(jax.devices()[0]),
            "jax": jax.__version__,
        },
        "part_seconds": {},
    }
    start_all = time.perf_counter()
    for part, job in tqdm(jobs, desc="ridge study", disable=args.quiet):
        start = time.perf_counter()
        if part == "invariance":
            previous = jax.config.jax_enable_x64
            jax.config.update("jax_enable_x64", True)
            try:
                result = invariance(sizes, job)
            finally:
                jax.config.update("jax_enable_x64", previous)
        elif part in ("cnn", "unet"):
            lr = args.lr_cnn if part == "cnn" else args.lr_unet
            result = train_experiment(part, *job, sizes, epsilon=lr)
        elif part == "stress":
            result = stress(*job, sizes)
        else:
            result = readme(job, sizes)
        record.setdefault(part, []).append(result)
        record["part_seconds"][part] = record["part_seconds"].get(part, 0.0) + (
            time.perf_counter() - start
        )
    record["wall_seconds"] = time.perf_counter() - start_all
    record["machine"]["load_average_end"] = list(os.getloadavg())

    table = markdown(record)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save(out, record)
    footer = (
        f"\nCommand: `{record['command']}`; wall time {record['wall_seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in record['part_seconds'].items())}); "
        f"load average {record['machine']['load_average_start'][0]:.1f} → "
        f"{record['machine']['load_average_end'][0]:.1f} on {record['machine']['cpus']} CPUs."
    )
    out.with_suffix(".md").write_text(table + "\n" + footer + "\n")
    print(table)
    print(footer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
