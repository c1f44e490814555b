"""The training loop every experiment shares: one model, one dataset, one optimizer.

Each optimizer starts from the same initial parameters (``seed``) and sees the same minibatches
(shuffled per epoch from ``seed``). A step is one ``jax.jit``-compiled function — gradient,
update and ``optax.apply_updates`` — compiled *before* the clock starts, so the per-epoch wall
time excludes compilation (as the paper reports). After every epoch (and before the first) the
loss and accuracy (or mean IoU for segmentation) are evaluated on the whole train and test sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lnb_fast

from .data import DataError, Dataset

#: Optimizers ``lnb reproduce --optimizers`` accepts, with what their learning rate means.
OPTIMIZERS = {
    "lnb": "lnb_fast.lnb (Algorithm 2); learning rate = ε, the squared function-space step",
    "foof": "lnb_fast.foof (Benzing 2022); learning rate of the step −lr·(A + λ)⁻¹g",
    "locoprop-s": "lnb_fast.locoprop_s (Amid et al. 2022); learning rate = η of the local targets",
    "locoprop-m": "lnb_fast.locoprop_m (matched losses); learning rate = η of the local targets",
    "proxprop": "lnb_fast.proxprop (Frerix et al. 2018); learning rate = τ, the proximal step",
    "adam": "optax.adam (β = 0.9, 0.999)",
    "sgd": "optax.sgd (plain gradient descent)",
}

#: The optimizers that need every neuron's input features (lnb_fast.value_and_grad).
FEATURE_OPTIMIZERS = ("lnb", "foof", "locoprop-s", "locoprop-m", "proxprop")

#: Each optimizer's constructor (its learning rate first), and whether it takes the model's
#: neuron table (``neurons=``).
CONSTRUCTORS = {
    "lnb": (lnb_fast.lnb, True),
    "foof": (lnb_fast.foof, True),
    "locoprop-s": (lnb_fast.locoprop_s, False),
    "locoprop-m": (lnb_fast.locoprop_m, False),
    "proxprop": (lnb_fast.proxprop, False),
    "adam": (optax.adam, False),
    "sgd": (optax.sgd, False),
}


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer by name with its learning rate (a number, multiplied by ``decay`` per epoch,
    smoothly: ``lr · decay^(step / steps_per_epoch)``) and the optimizer's keyword arguments
    (for LNB, those of :func:`lnb_fast.lnb`)."""

    name: str
    learning_rate: float
    decay: float = 1.0
    options: dict = field(default_factory=dict)

    @property
    def uses_features(self) -> bool:
        """Whether the optimizer's update needs the neurons' input features."""
        return self.name in FEATURE_OPTIMIZERS

    def label(self) -> str:
        """``"adam (lr 0.001)"``; LNB's rate is its trust-region size ε (Eq. 1), not a learning
        rate: ``"lnb (ε 0.01·0.75^epoch)"``."""
        rate = f"{self.learning_rate:g}" + (f"·{self.decay:g}^epoch" if self.decay != 1.0 else "")
        return f"{self.name} ({'ε' if self.name == 'lnb' else 'lr'} {rate})"

    def record(self, seed: int) -> dict[str, Any]:
        """The header of a run's JSON record: which optimizer, with what settings."""
        return {
            "optimizer": self.name,
            "label": self.label(),
            "learning_rate": self.learning_rate,
            "decay": self.decay,
            "options": self.options,
            "seed": seed,
        }

    def build(self, steps_per_epoch: int = 1, neurons=None) -> optax.GradientTransformation:
        """The optax transformation. ``neurons`` (the :class:`lnb_fast.NeuronTable` of the
        model, from ``lnb_fast.value_and_grad(loss).table(params, batch)``) is required by FOOF
        and by LNB's ``"covariance"`` strategy, and gives LNB compact moments."""
        if self.name not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.name!r}; choose from {', '.join(OPTIMIZERS)}"
            )
        lr: Any = self.learning_rate
        if self.decay != 1.0:
            lr = optax.exponential_decay(self.learning_rate, steps_per_epoch, self.decay)
        make, takes_table = CONSTRUCTORS[self.name]
        table = {"neurons": neurons} if takes_table else {}
        return make(lr, **table, **self.options)


def neuron_table(loss: Callable, params, batch) -> lnb_fast.NeuronTable:
    """The neurons ``lnb_fast`` finds in ``loss(params, batch)`` (for ``OptimizerSpec.build``)."""
    return lnb_fast.value_and_grad(loss).table(params, batch)


def make_step(
    loss: Callable, opt: optax.GradientTransformation, uses_features: bool, donate: bool = False
) -> Callable:
    """The jitted training step ``(params, state, batch) -> (params, state, loss)`` of
    ``loss(params, batch)``: gradient, ``opt.update`` and ``optax.apply_updates`` in one XLA
    computation. With ``uses_features`` (LNB and the related methods) the gradient comes from
    :func:`lnb_fast.value_and_grad` and the features go to ``opt.update``."""
    if uses_features:
        vgf = lnb_fast.value_and_grad(loss)

        def step(params, state, batch):
            value, grads, features = vgf(params, batch)
            updates, state = opt.update(grads, state, params, features=features)
            return optax.apply_updates(params, updates), state, value

    else:

        def step(params, state, batch):
            value, grads = jax.value_and_grad(loss)(params, batch)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

    # Donating the parameters and the state lets XLA update them in place (the memory analysis of
    # benchmarks/step_time.py compares donated steps); the caller must not reuse the old ones.
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def make_eval(model, n_classes: int) -> Callable:
    """Jitted ``(params, x, y) -> (summed loss, summed correct or per-class [inter, union])``."""

    @jax.jit
    def evaluate(params, x, y):
        logits = model.apply(params, x)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        pred = jnp.argmax(logits, axis=-1)
        if model.task == "classification":
            return jnp.sum(nll), jnp.sum(pred == y).astype(jnp.float32)
        onehot_p = jax.nn.one_hot(pred, n_classes, dtype=jnp.float32).reshape(-1, n_classes)
        onehot_y = jax.nn.one_hot(y, n_classes, dtype=jnp.float32).reshape(-1, n_classes)
        inter = jnp.sum(onehot_p * onehot_y, axis=0)
        union = jnp.sum(jnp.maximum(onehot_p, onehot_y), axis=0)
        return jnp.sum(nll) / (nll.size / len(y)), jnp.stack([inter, union])

    return evaluate


def evaluate(fn: Callable, params, x: np.ndarray, y: np.ndarray, task: str, batch: int = 1000):
    """``(mean loss, accuracy or mean IoU)`` over a whole split, in batches."""
    total_loss, total = 0.0, 0.0
    for start in range(0, len(x), batch):
        loss, metric = fn(params, jnp.asarray(x[start : start + batch]), y[start : start + batch])
        total_loss += float(loss)
        total = total + np.asarray(metric)
    if task == "classification":
        return total_loss / len(x), float(total) / len(x)
    inter, union = total
    present = union > 0
    return total_loss / len(x), float(np.mean(inter[present] / union[present]))


def train(
    model,
    data: Dataset,
    spec: OptimizerSpec,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train ``model`` on ``data`` with ``spec`` and return the per-epoch curves.

    Returns a JSON-ready dict: ``optimizer``, ``label``, ``learning_rate``, ``options`` and
    lists indexed by epoch (0 = before training) ``train_loss``, ``test_loss``,
    ``train_metric``, ``test_metric`` (accuracy or mean IoU), ``epoch_seconds`` (training only,
    compilation excluded; 0 for epoch 0), plus ``compile_seconds`` and ``steps_per_epoch``.
    """
    if batch_size > len(data.x_train):
        raise DataError(
            f"batch size {batch_size} is larger than the training set ({len(data.x_train)})"
        )
    steps_per_epoch = len(data.x_train) // batch_size  # the remainder is dropped (fixed shapes)
    from .models import loss_fn

    params = model.init(np.random.default_rng(seed))
    x0, y0 = jnp.asarray(data.x_train[:batch_size]), jnp.asarray(data.y_train[:batch_size])
    neurons = neuron_table(loss_fn(model), params, (x0, y0)) if spec.uses_features else None
    opt = spec.build(steps_per_epoch, neurons)
    state = opt.init(params)
    step = make_step(loss_fn(model), opt, uses_features=spec.uses_features)
    evaluate_fn = make_eval(model, data.n_classes)

    start = time.perf_counter()
    compiled = step.lower(params, state, (x0, y0)).compile()
    compile_seconds = time.perf_counter() - start

    record: dict[str, Any] = {
        **spec.record(seed),
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "compile_seconds": compile_seconds,
        "train_loss": [],
        "test_loss": [],
        "train_metric": [],
        "test_metric": [],
        "epoch_seconds": [],
        "diverged": False,
    }

    def log_epoch(seconds: float) -> None:
        for split, x, y in (
            ("train", data.x_train, data.y_train),
            ("test", data.x_test, data.y_test),
        ):
            loss, metric = evaluate(evaluate_fn, params, x, y, data.task)
            record[f"{split}_loss"].append(loss)
            record[f"{split}_metric"].append(metric)
        record["epoch_seconds"].append(seconds)

    log_epoch(0.0)
    rng = np.random.default_rng(seed)
    bar = tqdm(range(epochs), desc=spec.label(), disable=not progress, leave=False)
    for _ in bar:
        order = rng.permutation(len(data.x_train))
        batches = [
            (
                jnp.asarray(data.x_train[order[i * batch_size : (i + 1) * batch_size]]),
                jnp.asarray(data.y_train[order[i * batch_size : (i + 1) * batch_size]]),
            )
            for i in range(steps_per_epoch)
        ]
        start = time.perf_counter()
        for x, y in batches:
            params, state, value = compiled(params, state, (x, y))
        jax.block_until_ready(params)
        log_epoch(time.perf_counter() - start)
        bar.set_postfix(
            loss=f"{record['train_loss'][-1]:.4f}", test=f"{record['test_metric'][-1]:.4f}"
        )
        if not np.isfinite(record["train_loss"][-1]):
            record["diverged"] = True
            break
    # Steps the optimizer skipped for a NaN/Inf (nonfinite="skip", lnb_fast's default): reported,
    # not silent, so that a run that kept skipping is told apart from one that trained.
    record["skipped_steps"] = skipped_steps(state)
    if record["skipped_steps"]:
        tqdm.write(f"{spec.label()}: {record['skipped_steps']} steps skipped for NaN/Inf")
    return record


def skipped_steps(state) -> int:
    """The ``skipped`` counters of every lnb_fast state inside an optimizer state (0 if none)."""
    total = 0
    if hasattr(state, "skipped") and state.skipped is not None:
        total += int(np.asarray(state.skipped))
    if isinstance(state, tuple | list):
        total += sum(skipped_steps(s) for s in state)
    return total
