"""The matrix-factorization problem of the paper's §5.1 (Fig. 1), after Recht (2017).

A two-layer *linear* network ``x ↦ W₁ W₂ x`` is fit to ``y = A x`` where ``A`` is badly
conditioned, with the loss (a mean over samples; Recht's notebook uses the sum, which only
rescales it, and LNB's step is invariant to that scale)::

    ℓ(W₁, W₂) = (1/n) Σ_k ‖W₁ W₂ x_k − y_k‖²

Construction, as in Recht's ``shallow-linear-net`` notebook scaled ×10 as the paper says:
``A = linspace(1, 1e-5, y_dim)[:, None] · U[0, 1)^{y_dim × x_dim}`` (rows scaled down to 1e-5),
``x ~ N(0, I)``, ``W₁ ~ N(0, 1)^{y_dim × hidden}``, ``W₂ ~ N(0, 1)^{hidden × x_dim}``, with
``n = 10⁴``, ``hidden = 60``, ``y_dim = 100``. The paper writes ``W₂ ∈ R^{60×60}``, which does not
match ``y = A x`` with a 100×100 ``A``; we read the ×10 scaling literally, ``x_dim = 100``
(``W₂ ∈ R^{60×100}``), and keep ``x_dim`` a parameter.

Two facts make the reference fast here:

* **The best achievable loss.** ``W₁ W₂`` has rank ≤ ``hidden`` < ``y_dim``, so the loss cannot
  reach 0. With ``S = XᵀX/n = R Rᵀ`` (Cholesky), ``ℓ = ‖(W₁W₂ − A) R‖²_F`` and ``B ↦ B R`` is a
  bijection on rank-``hidden`` matrices, so by Eckart–Young the optimum is the energy of ``A R``
  beyond its ``hidden`` largest singular values: ``ℓ* = Σ_{k > hidden} σ_k(A R)²``. We report the
  *excess* loss ``ℓ − ℓ*``.
* **Compression.** The loss, the gradients and every neuron's metric depend on the data only
  through ``S``. The ``x_dim`` rows of ``X̃ = √x_dim · Rᵀ`` (with ``Ỹ = X̃ Aᵀ``) have the same
  second moment, so full-batch training on ``(X̃, Ỹ)`` is *exactly* full-batch training on the
  ``n`` samples, at ``x_dim/n`` of the cost (checked in the tests). Only the feature *mean*
  differs, which no neuron here uses (none has a bias).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from .network import MLP


@dataclass
class MatrixFactorization:
    """One instance of the problem: data, initial weights and the network that fits them."""

    A: np.ndarray
    X: np.ndarray
    Y: np.ndarray
    init_params: list[np.ndarray]
    hidden: int

    @classmethod
    def make(
        cls,
        seed: int = 0,
        n: int = 10_000,
        x_dim: int = 100,
        hidden: int = 60,
        y_dim: int = 100,
        smallest_row_scale: float = 1e-5,
    ) -> MatrixFactorization:
        """Draw A, the data and the initial ``[W₂, W₁]`` (module docstring) from ``seed``."""
        rng = np.random.default_rng(seed)
        A = np.linspace(1.0, smallest_row_scale, y_dim)[:, None] * rng.random((y_dim, x_dim))
        X = rng.standard_normal((n, x_dim))
        W1 = rng.standard_normal((y_dim, hidden))
        W2 = rng.standard_normal((hidden, x_dim))
        return cls(A=A, X=X, Y=X @ A.T, init_params=[W2, W1], hidden=hidden)

    @property
    def network(self) -> MLP:
        """``x ↦ W₁ W₂ x``: two dense neurons, no bias, identity activation, mean squared error.
        Parameters are ``[W₂, W₁]`` (input side first)."""
        return MLP(
            [self.A.shape[1], self.hidden, self.A.shape[0]],
            activation="identity",
            bias=False,
            loss="mse",
        )

    def second_moment(self) -> np.ndarray:
        """``S = XᵀX / n``."""
        return self.X.T @ self.X / self.X.shape[0]

    def optimum(self) -> float:
        """``ℓ* = Σ_{k > hidden} σ_k(A R)²``, the least loss a rank-``hidden`` product can reach."""
        R = scipy.linalg.cholesky(self.second_moment(), lower=True)
        s = scipy.linalg.svdvals(self.A @ R)
        return float(np.sum(s[self.hidden :] ** 2))

    def compressed(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X̃, Ỹ)``: ``x_dim`` rows with the same second moment as the ``n`` samples."""
        R = scipy.linalg.cholesky(self.second_moment(), lower=True)
        Xc = math.sqrt(R.shape[0]) * R.T
        return Xc, Xc @ self.A.T

    def condition_number(self) -> float:
        """``κ(A)``: ratio of A's largest to smallest singular value."""
        s = scipy.linalg.svdvals(self.A)
        return float(s[0] / s[-1])


def run(
    problem: MatrixFactorization,
    optimizer,
    steps: int,
    data: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Full-batch training for ``steps`` steps; returns the loss before each step and after the
    last (``steps + 1`` values). ``data`` defaults to the compressed data set. A run that
    diverges (non-finite loss) stops there and the rest of the curve is ``inf``."""
    X, Y = problem.compressed() if data is None else data
    net = problem.network
    params = [p.copy() for p in problem.init_params]
    state = optimizer.init(params)
    losses = np.full(steps + 1, np.inf)
    for t in range(steps + 1):
        loss, grads, features = net.loss_grads_features(params, X, Y)
        if not np.isfinite(loss) or loss > 1e30:
            break
        losses[t] = loss
        if t == steps:
            break
        params, state, _ = optimizer.step(params, grads, features, state)
    return losses


def steps_to_reach(excess: np.ndarray, level: float) -> int | None:
    """First step at which the excess loss is ≤ ``level`` (None if never)."""
    hit = np.nonzero(excess <= level)[0]
    return int(hit[0]) if hit.size else None


def best_of_grid(
    problem: MatrixFactorization,
    make_optimizer: Callable[[float], object],
    grid: Sequence[float],
    steps: int,
    at: Sequence[int],
    progress=None,
) -> tuple[dict[float, np.ndarray], dict[int, float]]:
    """Run every grid value; return the excess curves and, for each step count in ``at``, the
    grid value with the least excess loss there — the baselines are grid-searched (§5.1)."""
    optimum = problem.optimum()
    curves = {}
    for lr in grid:
        curves[lr] = run(problem, make_optimizer(lr), steps) - optimum
        if progress is not None:
            progress.update(1)
    return curves, {step: min(grid, key=lambda v: curves[v][step]) for step in at}


#: The step-size schedules we measured to work on this problem (``python -m lnb_ref demo``,
#: and the schedule study in ``docs/matfact.md``): ε is a squared length in function space,
#: here on the scale of the initial loss (≈ 6e5), so it starts large and decays fast.
EXACT_LNB_SCHEDULE = (1e5, 0.9)
ONLINE_LNB_SCHEDULE = (1e2, 0.95)
#: Grids bracketing each baseline's best value: GD diverges at 5e-3 and Adam is unstable at 3.
GD_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 5e-3)
ADAM_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
LEVELS = (1e4, 1e3, 1e2, 1e1, 1.0, 1e-1)


def compare(
    seed: int = 0, steps: int = 1000, at: Sequence[int] = (10, 100, 1000), progress: bool = False
) -> dict:
    """LNB (Algorithms 1 and 2) against gradient descent and Adam, each baseline at its best
    grid step for each step count in ``at``. Returns a dict of rows and curves (excess loss),
    and ``ahead_from``: for each LNB variant, the first step from which its excess loss is below
    every baseline curve at every later step (``steps + 1`` if never).

    Algorithm 2 runs full batch here, so its gradient EMA is off (``b1 = 0``): there is no
    minibatch noise to average, and the EMA's lag is costly (seed 0, ε_t = 100·0.95ᵗ: excess
    732 at step 100 with b1 = 0.9 against 8.9 with b1 = 0; ``benchmarks/matfact_schedules.py``).
    """
    from tqdm.auto import tqdm

    from .baselines import Adam, GradientDescent
    from .lnb import ExactLNB, OnlineLNB
    from .schedules import exponential_decay

    at = [step for step in at if step <= steps]
    problem = MatrixFactorization.make(seed)
    net = problem.network
    optimum = problem.optimum()
    bar = tqdm(total=2 + len(GD_GRID) + len(ADAM_GRID), desc="matfact", disable=not progress)
    rows, curves = [], {}

    def add_row(name, setting, curve):
        rows.append(
            {
                "optimizer": name,
                "setting": setting,
                "excess": {step: float(curve[step]) for step in at},
                "steps_to": {level: steps_to_reach(curve, level) for level in LEVELS},
            }
        )

    for name, make, schedule in (
        ("LNB, Algorithm 1 (exact)", lambda e: ExactLNB(net.neurons, e), EXACT_LNB_SCHEDULE),
        (
            "LNB, Algorithm 2 (2 PCG its)",
            lambda e: OnlineLNB(net.neurons, e, b1=0.0),
            ONLINE_LNB_SCHEDULE,
        ),
    ):
        curve = run(problem, make(exponential_decay(*schedule)), steps) - optimum
        curves[name] = curve
        add_row(name, f"eps_t = {schedule[0]:g} * {schedule[1]}^t", curve)
        bar.update(1)
    for name, make, grid, fmt in (
        ("gradient descent", GradientDescent, GD_GRID, "lr = {:g}"),
        ("Adam", Adam, ADAM_GRID, "lr = {:g}"),
    ):
        grid_curves, best = best_of_grid(problem, make, grid, steps, at, progress=bar)
        for lr in dict.fromkeys(best[step] for step in at):  # each winner once, in step order
            won = ", ".join(str(step) for step in at if best[step] == lr)
            label = f"{name} (best at step {won})"
            curves[label] = grid_curves[lr]
            add_row(label, fmt.format(lr), grid_curves[lr])
    bar.close()
    baselines = np.minimum.reduce([c for k, c in curves.items() if not k.startswith("LNB")])
    ahead_from = {}
    for name in (k for k in curves if k.startswith("LNB")):
        behind = np.nonzero(curves[name] >= baselines)[0]
        ahead_from[name] = int(behind.max()) + 1 if behind.size else 0
    return {
        "seed": seed,
        "steps": steps,
        "optimum": optimum,
        "initial_loss": float(net.loss(problem.init_params, problem.X, problem.Y)),
        "condition_number": problem.condition_number(),
        "rows": rows,
        "curves": curves,
        "ahead_from": ahead_from,
    }


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: the file is either the previous one or the complete new one, never a
    truncated mix, whatever interrupts the write (an exception, a kill, a full disk). The new
    file gets the usual permissions (``0o666`` less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_json(path, payload: dict, indent: int = 1) -> None:
    """Write ``payload`` as JSON: numpy arrays become lists, numpy scalars Python numbers, and
    non-finite floats (inf, nan) null. The whole text is serialised before anything is written
    and then written atomically (:func:`write_text_atomic`): a failure leaves the previous file
    in place."""

    def clean(v):
        if isinstance(v, np.generic):
            return clean(v.item())
        if isinstance(v, np.ndarray):
            return [clean(x) for x in v.tolist()]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    write_text_atomic(path, json.dumps(clean(payload), indent=indent) + "\n")
