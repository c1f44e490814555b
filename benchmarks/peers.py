"""LNB against its peers on full-size Fashion-MNIST: wall time to a target, side by side.

    .venv-kfac/bin/python benchmarks/peers.py                  # MLP, every method (make peers-env)
    .venv-kfac/bin/python benchmarks/peers.py --models mlp,cnn,vit --epochs 3
    .venv/bin/python benchmarks/peers.py --quick               # smoke test: generated data, < 1 min

Methods, each from the same initial parameters (seed 0) on the same minibatches (one shuffle per
epoch from seed 0), float32:

* ``adam``: ``optax.adam`` at each rate of ``--adam-lrs`` (a small grid: the best is reported
  as *the* Adam, the others stay in the JSON);
* ``lnb``: ``lnb_fast.lnb`` with the speed preset ``lnb_fast.SPEED`` (covariance wherever a
  neuron has a design, EMA and inverse every 10 steps) and the experiments' options
  (ridge 0.1, ``b1 = 0``), ε = ``--lnb-eps`` decayed ×0.75 per epoch;
* ``lnb-refresh50``: the preset with its inverse refreshed every 50 steps instead of 10, to
  measure what the longer interval costs (only with ``--methods``);
* ``lnb-auto``: Algorithm 2 as the paper runs it (2 warm-started PCG iterations on this
  minibatch's metric, ``strategy="auto"``), ε 0.01 ×0.75 per epoch (only with ``--methods``);
* ``kfac``: ``kfac_jax.Optimizer`` with the settings of its README (adaptive learning rate,
  momentum and damping, initial damping 1, ``l2_reg`` 0, its default 10 burn-in steps on the
  first 10 minibatches, timed as part of the first step; the loss registers its softmax
  cross-entropy). kfac-jax 0.0.8 runs on JAX ≤ 0.9.1, and so does lnb_fast: ``make
  peers-env`` builds ``.venv-kfac`` (JAX 0.9.1, kfac-jax, psgd-jax) where every method runs;
* ``muon``: ``optax.contrib.muon`` at ``--muon-lr`` (its own Adam on the non-matrix leaves);
* ``psgd``: PSGD-Kron, ``psgd_jax.kron`` at ``--psgd-lr`` (psgd-jax imports
  ``optax._src.clipping``, which optax 0.2.8 moved: the module is aliased before the import).

A method whose package is missing is listed as skipped, with the reason.

The methods train *interleaved*: every ``1/--evals-per-epoch`` of an epoch (a segment) each method
runs the segment's minibatches in turn (the order alternating between segments, so the load of a
shared machine falls on all alike), then is paused (its clock too) and evaluated: the cross-entropy
on a fixed subset of ``--train-eval`` training images (10 000 by default; the train-loss target is
measured there) and the accuracy on the whole test set. A method stops once it has reached both
targets (``--run-all-epochs`` trains each for ``--epochs``; its final values are then comparable).
Reported per method: seconds per epoch and its ratio to the best Adam's; the epochs and wall time
(training steps only, compilation excluded: each step function is compiled and run on a throwaway
copy first) to ``--target-accuracy`` (0.85) test accuracy and to ``--target-loss`` (0.3) training
loss, both at the evaluation points; the final values; and the optimizer state's size, and
parameters + state over Adam's. BLAS/LAPACK is pinned to ``--blas-threads`` (1;
:func:`step_time.pin_blas`). Timings on a shared machine are ratios measured in one process, not
absolute claims.

Writes ``--out`` (``results/peers.json``), a Markdown copy of the tables (``peers.md``) and a
figure per model (``peers_<model>.png``: training loss and test accuracy against wall time).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402 - pin_blas, machine, unwritable

import lnb_fast  # noqa: E402
from lnb import models as lnb_models  # noqa: E402
from lnb.data import Dataset  # noqa: E402
from lnb.experiments import LNB_OPTIONS  # noqa: E402
from lnb.train import make_step  # noqa: E402

METHODS = ("adam", "lnb", "kfac", "muon", "psgd")
EXTRA_METHODS = ("lnb-auto", "lnb-refresh50")


def model_of(name: str, data: Dataset, quick: bool) -> lnb_models.Model:
    """The MLP (784-800-800-10 tanh, the paper's), a CNN (3 convolutions 16/32/32, strides
    1/2/2, ReLU, and a dense head: benchmarks/step_time.py's) or a ViT (patch 4, dim 64, depth
    2, 4 heads); ``quick`` shrinks each."""
    shape, classes = data.input_shape, data.n_classes
    if name == "mlp":
        hidden = (32, 32) if quick else (800, 800)
        return lnb_models.mlp(int(np.prod(shape)), classes, hidden=hidden)
    if name == "cnn":
        channels = (4, 8, 8) if quick else (16, 32, 32)
        return lnb_models.cnn(shape, classes, channels=channels, strides=(1, 2, 2))
    if name == "vit":
        if quick:
            return lnb_models.vit(shape, classes, patch=7, dim=16, depth=1, heads=2, mlp_dim=16)
        return lnb_models.vit(shape, classes, patch=4, dim=64, depth=2, heads=4, mlp_dim=128)
    raise ValueError(f"unknown model {name!r}")


BATCH = {"mlp": 1000, "cnn": 256, "vit": 128}


def generated(seed: int = 0, n_train: int = 512, n_test: int = 256) -> Dataset:
    """Tiny 28×28 images for ``--quick``: 10 random class templates plus noise (no download)."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 1, (10, 28, 28, 1)).astype(np.float32)

    def draw(n):
        y = rng.integers(0, 10, n).astype(np.int32)
        x = templates[y] + 0.5 * rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
        return np.clip(x, 0, 1).astype(np.float32), y

    (xt, yt), (xe, ye) = draw(n_train), draw(n_test)
    return Dataset("generated", xt, yt, xe, ye, 10, "classification", "peers.generated")


# --- the methods ----------------------------------------------------------------------------------
@dataclass
class Runner:
    """A method ready to train: ``init(params) -> state`` and the compiled
    ``step(params, state, batch, index) -> (params, state, loss)``."""

    label: str
    init: Callable
    step: Callable
    settings: dict = field(default_factory=dict)


def optax_runner(label, loss, opt, features: bool, settings: dict) -> Runner:
    step = make_step(loss, opt, features, donate=True)
    return Runner(label, opt.init, lambda p, s, b, i: step(p, s, b), settings)


def kfac_runner(label: str, model, settings: dict) -> Runner:
    import kfac_jax

    def loss(params, batch):
        x, y = batch
        logits = model.apply(params, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=1.0,
        multi_device=False,
    )
    key = jax.random.PRNGKey(0)
    first = {}

    def init(params):
        return opt.init(params, key, first["batch"])

    def step(params, state, batch, index):
        # the first step runs the burn-in (curvature only) on the first minibatches
        # (then its step on ``batch``, the iterator's last item)
        data = (
            {"data_iterator": iter([*first["burnin"], batch])} if index == 0 else {"batch": batch}
        )
        params, state, stats = opt.step(
            params, state, jax.random.fold_in(key, index), global_step_int=index, **data
        )
        return params, state, stats["loss"]

    runner = Runner(label, init, step, settings)
    runner.first = first  # the batch init traces with and the burn-in's (set by train())
    return runner


def psgd_kron(learning_rate: float):
    """``psgd_jax.kron``; psgd-jax 0.2.9 imports ``optax._src.clipping``, which optax 0.2.8
    moved to ``optax.transforms._clipping`` (only the import is needed)."""
    import optax._src
    import optax.transforms._clipping as clipping

    sys.modules.setdefault("optax._src.clipping", clipping)
    if not hasattr(optax._src, "clipping"):
        optax._src.clipping = clipping
    from psgd_jax.kron import kron

    opt = kron(learning_rate=learning_rate)

    def init(params):  # psgd-jax prints the preconditioners' size
        with contextlib.redirect_stdout(io.StringIO()):
            return opt.init(params)

    return optax.GradientTransformationExtraArgs(init, opt.update)


def runners(args, model, loss, table, steps_per_epoch: int) -> tuple[list[Runner], dict]:
    """Every method of ``args.methods`` that can be built, and why the others cannot."""
    decay = lambda eps: optax.exponential_decay(eps, steps_per_epoch, 0.75)  # noqa: E731
    out, skipped = [], {}
    for method in args.methods:
        try:
            if method == "adam":
                for lr in args.adam_lrs:
                    out.append(
                        optax_runner(f"adam {lr:g}", loss, optax.adam(lr), False, {"lr": lr})
                    )
            elif method == "lnb":
                settings = {"eps": args.lnb_eps, "decay": 0.75, **lnb_fast.SPEED, **LNB_OPTIONS}
                opt = lnb_fast.lnb(
                    decay(args.lnb_eps), neurons=table, **lnb_fast.SPEED, **LNB_OPTIONS
                )
                out.append(optax_runner(f"lnb SPEED ε {args.lnb_eps:g}", loss, opt, True, settings))
            elif method == "lnb-refresh50":
                preset = {**lnb_fast.SPEED, "refresh_every": 50}
                settings = {"eps": args.lnb_eps, "decay": 0.75, **preset, **LNB_OPTIONS}
                opt = lnb_fast.lnb(decay(args.lnb_eps), neurons=table, **preset, **LNB_OPTIONS)
                label = f"lnb SPEED, refresh 50, ε {args.lnb_eps:g}"
                out.append(optax_runner(label, loss, opt, True, settings))
            elif method == "lnb-auto":
                opt = lnb_fast.lnb(decay(0.01), neurons=table, **LNB_OPTIONS)
                settings = {"eps": 0.01, "decay": 0.75, "strategy": "auto", **LNB_OPTIONS}
                out.append(optax_runner("lnb auto ε 0.01", loss, opt, True, settings))
            elif method == "kfac":
                out.append(kfac_runner("kfac (adaptive)", model, {"initial_damping": 1.0}))
            elif method == "muon":
                opt = optax.contrib.muon(args.muon_lr)
                out.append(optax_runner(f"muon {args.muon_lr:g}", loss, opt, False, {}))
            elif method == "psgd":
                opt = psgd_kron(args.psgd_lr)
                out.append(optax_runner(f"psgd-kron {args.psgd_lr:g}", loss, opt, False, {}))
        except ImportError as err:
            skipped[method] = f"{type(err).__name__}: {err}"
    return out, skipped


# --- training -------------------------------------------------------------------------------------
def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def state_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size")))


class Training:
    """One method's run: compiled and warmed up on a throwaway copy, then trained segment by
    segment (the clock runs only around the steps of a segment)."""

    def __init__(self, runner: Runner, init_params, first, burnin, warmup: int):
        self.runner = runner
        if hasattr(runner, "first"):
            runner.first.update(batch=first, burnin=burnin)
        # compile (and run every branch a method compiles separately) on a throwaway copy
        params, state = copy_tree(init_params), runner.init(copy_tree(init_params))
        for i in range(warmup):
            params, state, _ = runner.step(params, state, first, i)
        jax.block_until_ready(params)
        self.params = copy_tree(init_params)
        self.state = runner.init(copy_tree(init_params))
        self.record = {
            "method": runner.label,
            "settings": runner.settings,
            "curve": [],
            "state_bytes": state_bytes(self.state),
            "params_bytes": state_bytes(init_params),
        }
        self.seconds, self.done = 0.0, False

    def segment(self, batches, first_index: int) -> None:
        start = time.perf_counter()
        params, state = self.params, self.state
        for i, b in enumerate(batches):
            params, state, _ = self.runner.step(params, state, b, first_index + i)
        jax.block_until_ready(params)
        self.seconds += time.perf_counter() - start
        self.params, self.state = params, state

    def evaluate(self, evaluate, epoch: float, args) -> dict:
        point = {"epoch": epoch, "seconds": self.seconds, **evaluate(self.params)}
        curve = self.record["curve"]
        curve.append(point)
        self.done = not np.isfinite(point["train_loss"]) or bool(
            args.stop_at_targets
            and reached(curve, "test_accuracy", args.target_accuracy, True)
            and reached(curve, "train_loss", args.target_loss, False)
        )
        return point


def train_all(runners_: list[Runner], init_params, data: Dataset, evaluate, args, batch, bar):
    """Train every method for ``args.epochs``, *interleaved*: each segment (``1 /
    --evals-per-epoch`` of an epoch) is run by every method in turn, in an order that alternates
    between segments, so that the load of a shared machine falls on all alike. Returns the
    records and the methods that failed (with the error)."""
    n = len(data.x_train)
    steps = n // batch
    stops = [
        max(1, round(steps * (k + 1) / args.evals_per_epoch)) for k in range(args.evals_per_epoch)
    ]
    rng = np.random.default_rng(0)
    orders = [rng.permutation(n) for _ in range(args.epochs)]

    def batches(order, lo, hi):
        out = [
            (
                jnp.asarray(data.x_train[order[i * batch : (i + 1) * batch]]),
                jnp.asarray(data.y_train[order[i * batch : (i + 1) * batch]]),
            )
            for i in range(lo, hi)
        ]
        return jax.block_until_ready(out)

    first = (jnp.asarray(data.x_train[:batch]), jnp.asarray(data.y_train[:batch]))
    burnin = [batches(orders[0], j % steps, j % steps + 1)[0] for j in range(10)]
    runs, failed = [], {}
    for runner in runners_:
        try:
            runs.append(Training(runner, init_params, first, burnin, args.warmup))
            runs[-1].evaluate(evaluate, 0.0, args)
        except Exception as err:  # noqa: BLE001 - a peer that fails is reported, not fatal
            failed[runner.label] = f"{type(err).__name__}: {str(err)[:300]}"
    segment = 0
    for epoch in range(args.epochs):
        lo = 0
        for hi in stops:
            chunk = batches(orders[epoch], lo, hi)
            active = [r for r in runs if not r.done and r.runner.label not in failed]
            for run in active if segment % 2 == 0 else active[::-1]:
                try:
                    run.segment(chunk, epoch * steps + lo)
                    point = run.evaluate(evaluate, epoch + hi / steps, args)
                except Exception as err:  # noqa: BLE001
                    failed[run.runner.label] = f"{type(err).__name__}: {str(err)[:300]}"
                    continue
                bar.set_postfix_str(
                    f"{run.runner.label}: loss {point['train_loss']:.3f} "
                    f"acc {point['test_accuracy']:.3f}"
                )
            lo, segment = hi, segment + 1
        bar.update()
    records = []
    for run in runs:
        if run.runner.label in failed:
            continue
        record = run.record
        record["seconds_per_epoch"] = run.seconds / max(record["curve"][-1]["epoch"], 1e-9)
        records.append(record)
    return records, failed


def reached(curve: list[dict], key: str, target: float, above: bool) -> dict | None:
    for point in curve:
        value = point[key]
        if np.isfinite(value) and (value >= target if above else value <= target):
            return point
    return None


def summarise(results: list[dict], args) -> list[dict]:
    """Per method: targets, final values, ratios to the best Adam (the rate that reaches the
    accuracy target soonest, else the lowest final training loss)."""
    for r in results:
        acc = reached(r["curve"], "test_accuracy", args.target_accuracy, True)
        loss = reached(r["curve"], "train_loss", args.target_loss, False)
        r["to_accuracy"] = None if acc is None else {k: acc[k] for k in ("epoch", "seconds")}
        r["to_loss"] = None if loss is None else {k: loss[k] for k in ("epoch", "seconds")}
        r["final"] = {k: r["curve"][-1][k] for k in ("train_loss", "test_accuracy")}
    adams = [r for r in results if r["method"].startswith("adam")]
    if adams:
        best = min(
            adams,
            key=lambda r: (
                r["to_accuracy"]["seconds"] if r["to_accuracy"] else np.inf,
                r["final"]["train_loss"],
            ),
        )
        for r in results:
            r["best_adam"] = r is best
            r["epoch_cost"] = r["seconds_per_epoch"] / best["seconds_per_epoch"]
            r["memory"] = (r["params_bytes"] + r["state_bytes"]) / (
                best["params_bytes"] + best["state_bytes"]
            )
            for key in ("to_accuracy", "to_loss"):
                mine, theirs = r[key], best[key]
                r[f"{key}_vs_adam"] = (
                    mine["seconds"] / theirs["seconds"] if mine and theirs else None
                )
    return results


def _cell(x, spec=".2f", none="not reached"):
    return none if x is None else f"{x:{spec}}"


def markdown(model: str, results: list[dict], args) -> str:
    acc, loss = f"{args.target_accuracy:.0%} test", f"train loss {args.target_loss:g}"
    lines = [
        f"| {model}: method | epoch cost / Adam | epochs to {acc} | s to {acc} | "
        f"/ Adam | epochs to {loss} | s to {loss} | / Adam | final train loss | "
        "final test acc. | memory / Adam |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ta, tl = r["to_accuracy"] or {}, r["to_loss"] or {}
        name = r["method"] + (" (best Adam)" if r.get("best_adam") else "")
        lines.append(
            f"| {name} | {_cell(r.get('epoch_cost'))} | {_cell(ta.get('epoch'))} | "
            f"{_cell(ta.get('seconds'), '.1f')} | {_cell(r.get('to_accuracy_vs_adam'), '.2f', '-')}"
            f" | {_cell(tl.get('epoch'))} | {_cell(tl.get('seconds'), '.1f')} | "
            f"{_cell(r.get('to_loss_vs_adam'), '.2f', '-')} | {r['final']['train_loss']:.3f} | "
            f"{r['final']['test_accuracy']:.3f} | {_cell(r.get('memory'))} |"
        )
    return "\n".join(lines)


def figure(path: Path, model: str, results: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        t = [p["seconds"] for p in r["curve"]]
        axes[0].plot(t, [p["train_loss"] for p in r["curve"]], marker=".", label=r["method"])
        axes[1].plot(t, [p["test_accuracy"] for p in r["curve"]], marker=".", label=r["method"])
    axes[0].axhline(args.target_loss, color="grey", lw=0.8, ls="--")
    axes[1].axhline(args.target_accuracy, color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="training wall time (s)", ylabel="train loss", yscale="log")
    axes[1].set(xlabel="training wall time (s)", ylabel="test accuracy")
    axes[1].set_ylim(max(0.0, args.target_accuracy - 0.25), 1.0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model} on {args.dataset_name}: same init and minibatches")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_evaluate(model, data: Dataset, n_train_eval: int) -> Callable:
    x_tr = jnp.asarray(data.x_train[:n_train_eval])
    y_tr = jnp.asarray(data.y_train[:n_train_eval])
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    @jax.jit
    def loss_acc(params, x, y):
        logits = jnp.concatenate(
            [model.apply(params, c) for c in jnp.array_split(x, max(1, len(x) // 2000))]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    def evaluate(params) -> dict[str, float]:
        loss, _ = loss_acc(params, x_tr, y_tr)
        _, acc = loss_acc(params, x_te, y_te)
        return {"train_loss": float(loss), "test_accuracy": float(acc)}

    return evaluate


def run_model(name: str, data: Dataset, args, bar) -> dict:
    model = model_of(name, data, args.quick)
    loss = lnb_models.loss_fn(model)
    batch = args.batch or (64 if args.quick else BATCH[name])
    init = model.init(np.random.default_rng(0))
    first = (jnp.asarray(data.x_train[:batch]), jnp.asarray(data.y_train[:batch]))
    table = lnb_fast.value_and_grad(loss).table(init, first)
    steps = len(data.x_train) // batch
    methods, skipped = runners(args, model, loss, table, steps)
    evaluate = make_evaluate(model, data, args.train_eval)
    results, failed = train_all(methods, init, data, evaluate, args, batch, bar)
    skipped.update(failed)
    results = summarise(results, args)
    return {
        "model": model.name,
        "name": name,
        "batch": batch,
        "results": results,
        "skipped": skipped,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp", help="comma-separated: mlp, cnn, vit")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {', '.join(METHODS + EXTRA_METHODS)}",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--batch", type=int, default=None, help="default: mlp 1000, cnn 256, vit 128"
    )
    parser.add_argument("--adam-lrs", default="1e-3,3e-4", help="Adam's grid")
    parser.add_argument("--lnb-eps", type=float, default=0.3, help="LNB's ε (×0.75 per epoch)")
    parser.add_argument("--muon-lr", type=float, default=0.02)
    parser.add_argument("--psgd-lr", type=float, default=1e-3)
    parser.add_argument("--target-accuracy", type=float, default=0.85)
    parser.add_argument("--target-loss", type=float, default=0.3)
    parser.add_argument("--evals-per-epoch", type=int, default=4)
    parser.add_argument(
        "--run-all-epochs",
        dest="stop_at_targets",
        action="store_false",
        help="train every method for --epochs (default: stop once both targets are reached)",
    )
    parser.add_argument("--train-eval", type=int, default=10_000, help="train images evaluated")
    parser.add_argument("--warmup", type=int, default=6, help="throwaway steps that compile")
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument(
        "--data-path",
        default=None,
        help="folder of Fashion-MNIST's four IDX files (default: the Debian package's folder)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/peers.json"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: generated data, tiny models, 1 epoch"
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.adam_lrs = [float(v) for v in args.adam_lrs.split(",")]
    bad = [m for m in args.models if m not in BATCH] + [
        m for m in args.methods if m not in METHODS + EXTRA_METHODS
    ]
    if bad or not args.models or not args.methods:
        parser.error(f"unknown or missing models/methods: {bad}")
    if args.quick:
        args.epochs, args.train_eval = 1, 512
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if step_time.unwritable(args.out):
        return 2
    step_time.pin_blas(args.blas_threads)
    if args.quick:
        data = generated()
    else:
        from lnb.data import load

        data = load("fashion-mnist", path=args.data_path)
    args.dataset_name = data.name
    start = time.perf_counter()
    with tqdm(total=len(args.models) * args.epochs, desc="epochs", disable=args.quiet) as bar:
        rows = [run_model(name, data, args, bar) for name in args.models]
    elapsed = time.perf_counter() - start
    info = step_time.machine()
    text = [
        f"{data.name}, {args.epochs} epochs, {args.evals_per_epoch} evaluations per epoch; device "
        f"{info['device']}, JAX {info['jax']}, BLAS threads {args.blas_threads}; {elapsed:.0f} s.",
    ]
    for row in rows:
        text += [
            "",
            f"{row['model']}, batch {row['batch']}:",
            "",
            markdown(row["name"], row["results"], args),
        ]
        for method, why in row["skipped"].items():
            text.append(f"\nskipped {method}: {why}")
    print("\n".join(text))
    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "total_s": elapsed,
        "models": rows,
    }
    # the results first (atomic JSON, then Markdown), the figures after: a figure that cannot be
    # saved costs the figure, not the run's numbers
    if step_time.write_results(args.out, record, "\n".join(text)):
        return 2
    for row in rows:
        path = args.out.parent / f"{args.out.stem}_{row['name']}.png"
        try:
            figure(path, row["model"], row["results"], args)
        except OSError as err:
            print(f"error: figure {path}: {err}", file=sys.stderr)
            return 2
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
