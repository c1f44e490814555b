"""Boosted backpropagation (Grubb & Bagnell 2010; paper §2.3–2.4): the unreduced form of LNB.

Instead of a parameter vector, each layer ``i`` of the network holds a *strong learner*: its
linear neuron plus a growing sum of weak learners fitted to the backpropagated errors,

    F_i(x) = f_i(x; θ_i) + Σ_t c_{i,t} h_{i,t}(x).

One step on a batch ``(X, Y)`` of ``n`` samples (:meth:`BoostedBackprop.step_batch`):

1. forward and backward through the strong learners (Eq. 5–6); the backward pass gives every
   layer's errors on its output, ``λ_i = ∂ℓ/∂z_i`` (Eq. 7). Our losses are means over the batch,
   so the per-sample functional gradient of Eq. 6 is ``t_i = n · λ_i`` (row ``s`` is
   ``∂l_{y_s}/∂z_{i,s}``, without the ``1/n``); these are the regression targets.
2. For every layer fit a weak learner to the dataset ``{(x_{i-1,s}, t_{i,s})}`` by least squares
   (Eq. 3 and Eq. 8): ``h_i = argmin_{h ∈ H} mean_s ‖h(x_{i-1,s}) − t_{i,s}‖²``.
3. The norm of Eq. 2, one scalar for the whole network, with the function-space inner product
   ``⟨f, g⟩_F = E_x[f(x)·g(x)]`` of §2.3 over the batch::

       z = Σ_i ⟨h_i, t_i⟩_F = Σ_i (1/n) Σ_s h_i(x_{i-1,s}) · t_{i,s}

   the projection of the functional gradient onto the weak learners. For an exact least-squares
   fit in a hypothesis space that is a linear space of functions (every learner here), the
   residual ``t_i − h_i`` is orthogonal to ``h_i``, so ``z = Σ_i ‖h_i‖²_F`` too: the squared
   length of the step, which is therefore exactly ``ε`` (Eq. 1). For the linear learner of the
   neuron's own class, ``h_i = f_i(·; θ̂_i)`` with ``M_i θ̂_i = g_i`` (Eq. 10), and
   ``⟨h_i, t_i⟩_F = θ̂_i · Φᵀλ_i = θ̂_i · g_i``: Algorithm 1's ``z`` (line 9), also with a ridge.
4. Weight decay and step (Eq. 4, with the ``√ε`` step of Eq. 2 as in :mod:`lnb_ref.lnb`)::

       F_i ← (1 − √ε·ρ) F_i − √(ε/z) h_i        (z ← max(z0, z); no step if z = 0)

   The decay multiplies θ_i and every earlier coefficient ``c_{i,t}``; the new weak learner
   enters with coefficient ``−√(ε/z)``.

With :class:`LinearLeastSquares` (the neuron's own hypothesis space, same bias) adding
``−α h_i = f_i(·; −α θ̂_i)`` to the layer *is* the parameter update ``θ_i ← θ_i − α θ̂_i``: the
weak learner is folded into θ_i and boosted backprop is Algorithm 1 (:class:`lnb_ref.ExactLNB`)
step for step. Any other learner (:class:`RandomFeatureLeastSquares`) is kept in the ensemble.

Strong learners are implemented for dense MLPs only (:class:`lnb_ref.MLP`): a convolutional
layer's weak learner would have to regress a feature map per sample (the paper's footnote 2).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from .errors import NeuronShapeError, check_finite
from .network import Network, Tape
from .neurons import Dense
from .schedules import Schedule, as_schedule
from .solvers import cholesky_or_raise

# --------------------------------------------------------------------------------------------
# Weak learners: fit(X, targets) -> self, __call__(X), vjp_input(X, cotangent)
# --------------------------------------------------------------------------------------------


def _check_fit_data(name: str, X: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    X = np.asarray(X, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if X.ndim != 2 or targets.ndim != 2 or X.shape[0] != targets.shape[0] or not len(X):
        raise NeuronShapeError(
            f"{name}.fit: X must be (n, d) and targets (n, k) with the same n >= 1, "
            f"got {X.shape} and {targets.shape}"
        )
    check_finite(name, "inputs X", X)
    check_finite(name, "targets", targets)
    return X, targets


class LinearLeastSquares:
    """The linear weak learner ``h(x) = W x (+ b)``: the hypothesis space of a dense neuron.

    ``fit`` solves Eq. 8 through its normal equation (Eq. 10), with ``x̂ = [x; 1]`` if ``bias``::

        (E[x̂ x̂ᵀ] + γ I_{non-bias}) θ̂ᵀ = E[x̂ tᵀ]        θ̂ of shape (k, d + bias), bias last

    by Cholesky — exactly Algorithm 1's solve ``θ̂ = M⁻¹ g`` once ``t = n·λ`` (then
    ``E[x̂ tᵀ] = Φᵀλ = gᵀ``). ``γ`` (``ridge``) is §3.4's, on the non-bias entries.

    Attributes (after ``fit``): ``theta``, shape ``(k, d + bias)``, the layout of
    :class:`lnb_ref.Dense`.
    """

    def __init__(self, bias: bool = True, ridge: float = 0.0):
        if not ridge >= 0.0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.bias, self.ridge = bool(bias), float(ridge)
        self.theta: np.ndarray | None = None

    def _design(self, X: np.ndarray) -> np.ndarray:
        return np.hstack([X, np.ones((X.shape[0], 1))]) if self.bias else X

    def fit(self, X: np.ndarray, targets: np.ndarray) -> LinearLeastSquares:
        """Least squares of ``targets`` (n, k) on ``X`` (n, d); returns ``self``."""
        X, targets = _check_fit_data("LinearLeastSquares", X, targets)
        Phi = self._design(X)
        n, D = Phi.shape
        C = Phi.T @ Phi / n
        C[np.arange(X.shape[1]), np.arange(X.shape[1])] += self.ridge  # not on the bias entry
        rhs = Phi.T @ targets / n  # (D, k)
        self.theta = scipy.linalg.cho_solve(cholesky_or_raise("LinearLeastSquares", C), rhs).T
        return self

    def _fitted(self) -> np.ndarray:
        if self.theta is None:
            raise ValueError("LinearLeastSquares: call fit(X, targets) before using the learner")
        return self.theta

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """``h(X)``, shape ``(n, k)``."""
        return self._design(np.asarray(X, dtype=np.float64)) @ self._fitted().T

    def vjp_input(self, X: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
        """``(∂h/∂x)ᵀ u = u W`` per sample (the bias column does not depend on x)."""
        W = self._fitted()[:, : np.shape(X)[1]]
        return np.asarray(cotangent) @ W


class RandomFeatureLeastSquares:
    """A nonlinear weak learner: least squares on random tanh features (a random-feature net).

    ``h(x) = β ψ(x)`` with ``ψ(x) = [tanh(A x + b); 1]``, ``A`` (m, d) and ``b`` (m,) drawn
    afresh at every ``fit`` (``A ~ N(0, scale²/d)``, ``b ~ N(0, scale²)``) from the learner's
    own random generator, and ``β`` (k, m + 1) the least-squares fit (Eq. 3)::

        β = argmin_β mean_s ‖β ψ(x_s) − t_s‖² + γ ‖β_{:, :m}‖²

    solved with ``scipy.linalg.lstsq`` on the ridge-augmented system (stable when the features
    are nearly dependent). Its normal equation ``(ΨᵀΨ/n + γ I') βᵀ = Ψᵀ t / n`` holds at the
    solution. The hypothesis space for fixed ``(A, b)`` is linear in β, so the fitted
    ``h`` satisfies ``⟨h, t⟩_F = ‖h‖²_F`` when ``γ = 0`` (see the module docstring).

    Args:
        n_features: ``m``, the number of random tanh features.
        scale: the scale of the random projection.
        ridge: ``γ`` on the feature coefficients (not on the intercept).
        seed: seed of the generator the features are drawn from.
    """

    def __init__(self, n_features: int = 32, scale: float = 1.0, ridge: float = 0.0, seed=0):
        if int(n_features) != n_features or n_features < 1:
            raise ValueError(f"n_features must be a positive integer, got {n_features}")
        if not scale > 0.0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not ridge >= 0.0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.n_features, self.scale, self.ridge = int(n_features), float(scale), float(ridge)
        self.rng = np.random.default_rng(seed)
        self.A: np.ndarray | None = None
        self.b: np.ndarray | None = None
        self.beta: np.ndarray | None = None

    def features(self, X: np.ndarray) -> np.ndarray:
        """``Ψ(X) = [tanh(X Aᵀ + b), 1]``, shape ``(n, m + 1)``."""
        if self.A is None:
            raise ValueError("RandomFeatureLeastSquares: call fit(X, targets) first")
        X = np.asarray(X, dtype=np.float64)
        return np.hstack([np.tanh(X @ self.A.T + self.b), np.ones((X.shape[0], 1))])

    def fit(self, X: np.ndarray, targets: np.ndarray) -> RandomFeatureLeastSquares:
        """Draw new random features and fit β by least squares; returns ``self``."""
        X, targets = _check_fit_data("RandomFeatureLeastSquares", X, targets)
        n, d = X.shape
        m = self.n_features
        self.A = self.rng.normal(0.0, self.scale / np.sqrt(d), size=(m, d))
        self.b = self.rng.normal(0.0, self.scale, size=m)
        Psi = self.features(X) / np.sqrt(n)  # mean, not sum, of squares
        rhs = targets / np.sqrt(n)
        if self.ridge > 0:
            Psi = np.vstack([Psi, np.sqrt(self.ridge) * np.eye(m, m + 1)])
            rhs = np.vstack([rhs, np.zeros((m, targets.shape[1]))])
        self.beta = scipy.linalg.lstsq(Psi, rhs)[0].T
        return self

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """``h(X) = Ψ(X) βᵀ``, shape ``(n, k)``."""
        return self.features(X) @ self.beta.T

    def vjp_input(self, X: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
        """``(∂h/∂x)ᵀ u = Aᵀ [(1 − tanh²(Ax + b)) ⊙ (β_{:, :m}ᵀ u)]`` per sample."""
        T = np.tanh(np.asarray(X, dtype=np.float64) @ self.A.T + self.b)
        inner = (np.asarray(cotangent) @ self.beta[:, : self.n_features]) * (1.0 - T * T)
        return inner @ self.A


# --------------------------------------------------------------------------------------------
# A network whose layers are strong learners
# --------------------------------------------------------------------------------------------

#: One layer's ensemble: ``[(c_1, h_1), (c_2, h_2), ...]``.
Ensemble = list[tuple[float, object]]


class BoostedNetwork:
    """A dense network whose layer ``i`` computes ``z_i = f_i(X_i; θ_i) + Σ_t c_t h_{i,t}(X_i)``.

    Wraps a :class:`lnb_ref.network.Network` made of :class:`~lnb_ref.Dense` neurons (an
    :class:`lnb_ref.MLP`): same activations, same loss. ``ensembles[i]`` is the list of
    ``(coefficient, weak learner)`` pairs added to layer ``i``; with empty ensembles it is the
    plain network.

    Raises:
        ValueError: if some neuron of ``net`` is not Dense (conv strong learners are not
            implemented: footnote 2 of the paper).
    """

    def __init__(self, net: Network):
        for neuron in net.neurons:
            if not isinstance(neuron, Dense):
                raise ValueError(
                    f"boosted backprop's strong learners are implemented for dense (MLP) layers "
                    f"only; neuron {neuron.name!r} is a {type(neuron).__name__}"
                )
        self.net = net

    def empty_ensembles(self) -> list[Ensemble]:
        """No weak learners yet: one empty list per layer."""
        return [[] for _ in self.net.neurons]

    def _check_ensembles(self, ensembles: Sequence[Ensemble]) -> None:
        if len(ensembles) != len(self.net.neurons):
            raise NeuronShapeError(
                f"got {len(ensembles)} ensembles for {len(self.net.neurons)} layers"
            )

    def forward(self, params, ensembles: Sequence[Ensemble], X: np.ndarray):
        """The forward pass through the strong learners; one ``Record`` per layer
        (:meth:`Network.forward` with the ensembles)."""
        self._check_ensembles(ensembles)
        return self.net.forward(params, X, ensembles)

    def predict(self, params, ensembles: Sequence[Ensemble], X: np.ndarray) -> np.ndarray:
        """The network output (logits for cross-entropy), shape ``(n, n_outputs)``."""
        return self.forward(params, ensembles, X)[-1].post

    def loss(self, params, ensembles: Sequence[Ensemble], X: np.ndarray, Y: np.ndarray) -> float:
        """The mean loss ℓ on ``(X, Y)``."""
        out = self.predict(params, ensembles, X)
        return self.net._loss_fn(out, self.net.check_targets(Y, out.shape[0]))[0]

    def backprop(self, params, ensembles: Sequence[Ensemble], X: np.ndarray, Y) -> Tape:
        """Forward and backward through the strong learners (Eq. 6): the error passed down
        through layer ``i`` is ``(∂F_i/∂x)ᵀ λ_i = Wᵀλ_i + Σ_t c_t (∂h_{i,t}/∂x)ᵀ λ_i``
        (:meth:`Network.backprop` with the ensembles; ``grads[i]`` is still ``∂ℓ/∂θ_i``)."""
        self._check_ensembles(ensembles)
        return self.net.backprop(params, X, Y, ensembles)


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------


@dataclass
class BoostingInfo:
    """What one boosted-backprop step did.

    Attributes:
        epsilon: ``ε`` of this step.
        loss: the loss before the step.
        z: ``max(z0, raw_z)``, the norm used for the step size ``√(ε/z)``.
        raw_z: ``Σ_i ⟨h_i, t_i⟩_F``, the projection of the functional gradient (Eq. 2–3).
        squared_norm: ``Σ_i ‖h_i‖²_F`` (equals ``raw_z`` for exact unregularised LS fits).
        learners: the weak learners fitted this step, one per layer.
        folded: per layer, whether the learner was folded into θ_i.
    """

    epsilon: float
    loss: float
    z: float
    raw_z: float
    squared_norm: float
    learners: list = field(default_factory=list)
    folded: list[bool] = field(default_factory=list)


class BoostedBackprop:
    """Boosted backpropagation with a general weak learner (see the module docstring).

    Unlike the optimizers of :mod:`lnb_ref.lnb`, a step needs the data (to fit the weak
    learners), not only the gradients::

        opt = BoostedBackprop(net, epsilon=0.01, weak_learner=LinearLeastSquares(bias=True))
        state = opt.init(params)
        params, state, info = opt.step_batch(params, X, Y, state)
        opt.model.predict(params, state["ensembles"], X)     # the strong learners' output

    Args:
        net: a dense network (:class:`lnb_ref.MLP`).
        epsilon: ``ε``, a number or a schedule ``t ↦ ε_t``.
        weak_learner: a prototype learner with ``fit(X, targets) -> self``, ``__call__(X)`` and
            ``vjp_input(X, cotangent)``; it is copied (``copy.copy``) before every fit.
            Default: ``LinearLeastSquares(bias=...)`` matching the network's first neuron.
        weight_decay: ``ρ`` of Eq. 4 (decay factor ``1 − √ε·ρ`` on θ and on all coefficients).
        z0: lower bound on ``z`` (as in Algorithm 2).
        fold_linear: fold a :class:`LinearLeastSquares` learner whose bias matches the neuron's
            into θ_i (exactly equivalent; False keeps it in the ensemble, for demonstration).
    """

    def __init__(
        self,
        net: Network,
        epsilon: float | Schedule,
        weak_learner=None,
        weight_decay: float = 0.0,
        z0: float = 0.0,
        fold_linear: bool = True,
    ):
        self.model = BoostedNetwork(net)
        self.net = net
        self.epsilon = as_schedule(epsilon)
        if weak_learner is None:
            weak_learner = LinearLeastSquares(bias=net.neurons[0].bias)
        for method in ("fit", "__call__", "vjp_input"):
            if not callable(getattr(weak_learner, method, None)):
                raise ValueError(
                    f"weak_learner must have fit(X, targets), __call__(X) and "
                    f"vjp_input(X, cotangent); {type(weak_learner).__name__} lacks {method}"
                )
        if weight_decay < 0 or z0 < 0:
            raise ValueError(f"weight_decay and z0 must be >= 0, got {weight_decay}, {z0}")
        self.weak_learner = weak_learner
        self.weight_decay, self.z0, self.fold_linear = weight_decay, z0, fold_linear

    def init(self, params: Sequence[np.ndarray]) -> dict:
        """Step count ``t`` and empty ensembles (the strong learners start as the neurons)."""
        return {"t": 0, "ensembles": self.model.empty_ensembles()}

    def _folds(self, neuron: Dense, learner) -> bool:
        return (
            self.fold_linear
            and isinstance(learner, LinearLeastSquares)
            and learner.bias == neuron.bias
        )

    def step_batch(self, params, X: np.ndarray, Y: np.ndarray, state: dict):
        """One boosting step on the batch ``(X, Y)``: backprop, fit, normalise, add.

        Returns ``(params, state, BoostingInfo)``; ``state["ensembles"]`` holds the strong
        learners' weak-learner sums.
        """
        ensembles = state["ensembles"]
        tape = self.model.backprop(params, ensembles, X, Y)
        n = tape.records[0].features.shape[0]
        learners, inner, sq = [], 0.0, 0.0
        for rec, lam in zip(tape.records, tape.errors_pre, strict=True):
            targets = n * lam  # per-sample functional gradient (Eq. 6) of the mean loss
            learner = copy.copy(self.weak_learner).fit(rec.features, targets)
            H = learner(rec.features)
            inner += float(np.sum(H * targets)) / n  # ⟨h_i, t_i⟩_F
            sq += float(np.sum(H * H)) / n  # ‖h_i‖²_F
            learners.append(learner)
        eps = self.epsilon(state["t"])
        z = max(self.z0, inner)
        alpha = np.sqrt(eps / z) if z > 0 else 0.0
        decay = 1.0 - np.sqrt(eps) * self.weight_decay
        new_params, new_ens, folded = [], [], []
        for neuron, theta, ens, learner in zip(
            self.net.neurons, params, ensembles, learners, strict=True
        ):
            theta = decay * np.asarray(theta, dtype=np.float64)
            ens = [(decay * c, h) for c, h in ens]
            fold = self._folds(neuron, learner)
            if fold:  # −α f_i(·; θ̂) = f_i(·; −α θ̂): the weak learner is a parameter update
                theta = theta - alpha * learner.theta
            elif alpha > 0:
                ens.append((-alpha, learner))
            new_params.append(theta)
            new_ens.append(ens)
            folded.append(fold)
        new_state = {"t": state["t"] + 1, "ensembles": new_ens}
        info = BoostingInfo(eps, tape.loss, z, inner, sq, learners, folded)
        return new_params, new_state, info
