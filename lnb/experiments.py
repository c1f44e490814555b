"""The paper's §5 experiments, scaled to a 2-core CPU.

* ``matfact`` — §5.1, Fig. 1: the two-layer linear net of :mod:`lnb_ref.matfact`
  (κ(A) = 1.3e7, n = 1e4), full batch, with ``lnb_fast``; the metric is the excess loss.
* ``mlp`` / ``mlp-inverted`` — §5.2, Fig. 2: 800-800 tanh MLP, Glorot normal, on digits (the
  paper: MNIST, batch 1000; here batch 100, Fashion-MNIST with ``--dataset fashion-mnist``),
  original pixels and ``1 − x``.
* ``cnn`` — convolution neurons with bias and strides: convs 16, 32 (3×3, strides 1, 2) + dense.
* ``vit`` — §5.3 (the paper: CIFAR-10): patch 2, dim 64, depth 2, 4 heads, LayerNorm without
  affine, on digits.
* ``unet`` — §5.4 (the paper: VOC, mean IoU): a small UNet on synthetic shapes
  (:mod:`lnb.shapes`), 1000 training images.

Learning rates: Adam's is grid-searched as the paper does (``benchmarks/convergence.py``
measures the grid); the defaults below are the best of those grids, LNB's ε likewise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import data as datasets
from .train import OptimizerSpec, make_step, neuron_table


class ModelOptionError(ValueError):
    """The model cannot be built with the options given (``lnb reproduce --model``) for the
    experiment's data: the message names the model, its options and the builder's reason."""


@dataclass(frozen=True)
class Experiment:
    """One of the paper's experiments: data, model, schedule and default optimizers."""

    name: str
    description: str
    dataset: str = "digits"
    inverted: bool = False
    model: str = "mlp"
    model_options: dict = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 100
    n_train: int | None = None
    target: float = 0.95
    optimizers: dict[str, OptimizerSpec] = field(default_factory=dict)


#: LNB on minibatches: no gradient EMA (b1 = 0 converged faster than 0.9 in every sweep of
#: benchmarks/convergence.py) and a ridge γ = 0.1 (the paper's "fixed (ridge) regularizer").
LNB_OPTIONS = {"ridge": 0.1, "b1": 0.0}


#: The related methods keep training when a step is non-finite (``nonfinite="skip"``: a
#: diverged run then keeps a non-finite loss and is reported as diverged, as LNB's and Adam's
#: are, instead of stopping a learning-rate sweep with an error).
SKIP = {"nonfinite": "skip"}

#: The related methods (issue 6) on minibatches, at their best learning rates on the MLP in the
#: grids of ``benchmarks/convergence.py --related``; ``reproduce --lr NAME=VALUE`` overrides.
RELATED_OPTIMIZERS = {
    "foof": OptimizerSpec("foof", 0.3, 0.75, {"damping": 0.1, **SKIP}),
    "locoprop-s": OptimizerSpec("locoprop-s", 10.0, 0.75, SKIP),
    "locoprop-m": OptimizerSpec("locoprop-m", 10.0, 0.75, SKIP),
    "proxprop": OptimizerSpec("proxprop", 10.0, 0.75, SKIP),
}


def minibatch_optimizers(lnb_epsilon: float, adam_lr: float) -> dict[str, OptimizerSpec]:
    """LNB (``LNB_OPTIONS``, ε ×0.75 per epoch), Adam and SGD (lr 0.1) for a minibatch
    experiment, at the best ε and Adam rate of ``benchmarks/convergence.py``'s grids, and the
    related methods of ``RELATED_OPTIMIZERS``."""
    return {
        "lnb": OptimizerSpec("lnb", lnb_epsilon, 0.75, LNB_OPTIONS),
        "adam": OptimizerSpec("adam", adam_lr),
        "sgd": OptimizerSpec("sgd", 0.1),
        **RELATED_OPTIMIZERS,
    }


EXPERIMENTS: dict[str, Experiment] = {
    "matfact": Experiment(
        "matfact",
        "§5.1 matrix factorization: W₁W₂x ≈ Ax, κ(A)=1.3e7, n=1e4, full batch (loss vs step)",
        dataset="matfact",
        model="matfact",
        epochs=300,
        target=1.0,
        optimizers={
            "lnb": OptimizerSpec("lnb", 300.0, 0.95, {"b1": 0.0, "ridge": 0.0}),
            "adam": OptimizerSpec("adam", 1.0),
            "sgd": OptimizerSpec("sgd", 3e-3),
            "foof": OptimizerSpec("foof", 3e-3, 1.0, SKIP),
            "locoprop-s": OptimizerSpec("locoprop-s", 3e-2, 1.0, SKIP),
            "locoprop-m": OptimizerSpec("locoprop-m", 3e-2, 1.0, SKIP),
            "proxprop": OptimizerSpec("proxprop", 1e-2, 1.0, SKIP),
        },
    ),
    "mlp": Experiment(
        "mlp",
        "§5.2 MLP 800-800 tanh, Glorot normal, original pixels",
        model="mlp",
        optimizers=minibatch_optimizers(0.01, 3e-4),
    ),
    "cnn": Experiment(
        "cnn",
        "CNN: convs 16, 32 (3×3, strides 1, 2, bias, ReLU) + dense",
        model="cnn",
        # ε 0.1: the best of benchmarks/convergence.py's grid at a7c461f (docs/results.md)
        optimizers=minibatch_optimizers(0.1, 3e-3),
    ),
    "vit": Experiment(
        "vit",
        "§5.3 ViT: patch 2, dim 64, depth 2, 4 heads, LayerNorm without affine",
        model="vit",
        target=0.9,
        model_options={"patch": 2, "dim": 64, "depth": 2, "heads": 4, "mlp_dim": 128},
        optimizers=minibatch_optimizers(0.03, 3e-3),
    ),
    "unet": Experiment(
        "unet",
        "§5.4 UNet on synthetic shapes segmentation (mean IoU)",
        dataset="shapes",
        model="unet",
        target=0.4,
        batch_size=50,
        epochs=6,
        n_train=1000,
        optimizers=minibatch_optimizers(0.1, 3e-3),
    ),
}
EXPERIMENTS["mlp-inverted"] = replace(
    EXPERIMENTS["mlp"],
    name="mlp-inverted",
    description="§5.2 MLP 800-800 tanh, Glorot normal, inverted pixels 1 − x",
    inverted=True,
)


def load_data(exp: Experiment, seed: int, path: str | None, dataset: str | None):
    """The experiment's dataset (``dataset`` overrides it, e.g. ``fashion-mnist``)."""
    return datasets.load(dataset or exp.dataset, seed=seed, path=path, inverted=exp.inverted)


def run(
    name: str,
    optimizers: list[str] | None = None,
    *,
    epochs: int | None = None,
    seed: int = 0,
    dataset: str | None = None,
    data_path: str | None = None,
    batch_size: int | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    learning_rates: dict[str, float] | None = None,
    optimizer_options: dict[str, dict] | None = None,
    model_options: dict | None = None,
    target: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one experiment with each optimizer (same initial parameters and batches) and return
    a JSON-ready dict: ``config``, ``dataset``, ``runs`` (one per optimizer, see
    :func:`lnb.train.train`). ``learning_rates`` and ``optimizer_options`` (merged into the
    optimizer's keyword arguments) override the experiment's settings per optimizer name, e.g.
    ``optimizer_options={"lnb": {"relative_ridge": False}}``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    names = optimizers or ["lnb", "adam"]
    unknown = [o for o in names if o not in exp.optimizers]
    if unknown:
        raise ValueError(
            f"unknown optimizer(s) {', '.join(unknown)} for {name}; "
            f"choose from {', '.join(exp.optimizers)}"
        )
    specs = [exp.optimizers[o] for o in names]
    if learning_rates:
        specs = [
            replace(s, learning_rate=learning_rates.get(s.name, s.learning_rate)) for s in specs
        ]
    if optimizer_options:
        specs = [
            replace(s, options={**s.options, **optimizer_options.get(s.name, {})}) for s in specs
        ]
    epochs = exp.epochs if epochs is None else epochs
    config = {
        "experiment": name,
        "description": exp.description,
        "target": exp.target if target is None else target,
        "epochs": epochs,
        "seed": seed,
        "optimizers": [
            {
                "name": s.name,
                "learning_rate": s.learning_rate,
                "decay": s.decay,
                "options": s.options,
            }
            for s in specs
        ],
    }
    if exp.model == "matfact":
        return {"config": config, **run_matfact(specs, epochs, seed, progress)}

    from .models import build
    from .train import train

    n_train = exp.n_train if n_train is None else n_train
    data = datasets.subset(load_data(exp, seed, data_path, dataset), n_train, n_test, seed)
    options = {**exp.model_options, **(model_options or {})}
    try:
        model = build(exp.model, data.input_shape, data.n_classes, **options)
    except (TypeError, ValueError) as err:  # e.g. a patch size that does not divide the image
        raise ModelOptionError(f"{exp.model} with {options}: {err}") from None
    batch = batch_size or exp.batch_size
    config.update(batch_size=batch, model=exp.model, model_options=options)
    runs = [
        train(model, data, spec, epochs=epochs, batch_size=batch, seed=seed, progress=progress)
        for spec in specs
    ]
    return {
        "config": config,
        "dataset": data.summary(),
        "metric": metric_name(data.task),
        "runs": runs,
    }


def metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "mean IoU"


def to_target(run: dict, target: float, lower_is_better: bool) -> tuple[int | None, float | None]:
    """``(epochs, seconds)`` until the test metric first reaches ``target`` (None if never);
    seconds are cumulative training wall time, compilation excluded."""
    metric = np.asarray(run["test_metric"], dtype=float)
    hit = metric <= target if lower_is_better else metric >= target
    if not hit.any():
        return None, None
    epoch = int(np.argmax(hit))
    return epoch, float(np.sum(run["epoch_seconds"][: epoch + 1]))


# --- matrix factorization with lnb_fast ----------------------------------------------------------
def run_matfact(specs: list[OptimizerSpec], steps: int, seed: int, progress: bool) -> dict:
    """§5.1 with ``lnb_fast`` and optax on the problem :mod:`lnb_ref.matfact` builds (full
    batch). One "epoch" is one full-batch step; the excess loss over the best rank-60 loss ℓ*
    is the metric."""
    from lnb_ref.matfact import MatrixFactorization

    problem = MatrixFactorization.make(seed)
    optimum = problem.optimum()
    X, Y = jnp.asarray(problem.X, jnp.float32), jnp.asarray(problem.Y, jnp.float32)
    W2, W1 = problem.init_params
    params0 = {"W2": jnp.asarray(W2, jnp.float32), "W1": jnp.asarray(W1, jnp.float32)}

    def loss(p, batch):
        x, y = batch
        residual = (x @ p["W2"].T) @ p["W1"].T - y
        return jnp.sum(residual * residual) / x.shape[0]

    full_loss = jax.jit(lambda p: loss(p, (X, Y)))
    runs = []
    neurons = neuron_table(loss, params0, (X, Y))
    for spec in specs:
        opt = spec.build(1, neurons if spec.uses_features else None)
        step = make_step(loss, opt, uses_features=spec.uses_features)
        params, state = params0, opt.init(params0)
        start = time.perf_counter()
        compiled = step.lower(params, state, (X, Y)).compile()
        compile_seconds = time.perf_counter() - start
        # A full-batch step returns the loss of the parameters it starts from: the curve, without
        # a second forward pass per step; one pass at the end for the last parameters.
        losses, seconds = [], [0.0]
        for _ in tqdm(range(steps), desc=spec.label(), disable=not progress, leave=False):
            start = time.perf_counter()
            params, state, value = compiled(params, state, (X, Y))
            jax.block_until_ready(params)
            seconds.append(time.perf_counter() - start)
            losses.append(float(value))
        losses.append(float(full_loss(params)))
        excess = [v - optimum for v in losses]
        runs.append(
            {
                **spec.record(seed),
                "compile_seconds": compile_seconds,
                "train_loss": losses,
                "train_metric": excess,
                "test_loss": losses,
                "test_metric": excess,
                "epoch_seconds": seconds,
                "diverged": not np.isfinite(losses[-1]),
            }
        )
    return {
        "dataset": {
            "name": "matfact",
            "n": int(X.shape[0]),
            "optimal_loss": optimum,
            "condition_number": problem.condition_number(),
        },
        "metric": "excess loss",
        "runs": runs,
    }
