"""Gauss-Newton, generalized Gauss-Newton, natural gradient and LNB as explicit metrics (§2.2,
§4.2), for tiny networks: every ``P × P`` matrix is materialised, for comparison and teaching.

All of them are choices of the metric ``M`` in the trust-region step of Eq. 1–2::

    θ̂ = (M + δI)⁻¹ g,      z = g · θ̂,      θ ← θ − √(ε/z) θ̂         (δ: damping)

so that ``α² θ̂ᵀ(M + δI)θ̂ = ε`` with ``α = √(ε/z)``. With ``J_s = ∂ŷ_s/∂θ`` (``k × P``) the
Jacobian of the network output for sample ``s`` over *all* parameters, and the loss a mean
``ℓ = (1/n) Σ_s l(ŷ_s, y_s)``:

* ``gauss_newton_metric`` (GN): ``(1/n) Σ_s J_sᵀ J_s``, the squared change of the network output;
* ``ggn_metric`` (GGN): ``(1/n) Σ_s J_sᵀ H_s J_s`` with ``H_s = ∂²l/∂ŷ²`` (:func:`loss_hessians`):
  ``2I`` for the squared error, ``diag(p) − ppᵀ`` for softmax cross-entropy;
* ``fisher_metric`` (natural gradient): ``(1/n) Σ_s E_{y∼p(·|x_s)}[∇_θ log p ∇_θ log pᵀ]``,
  equal to the GGN for softmax-CE and for the squared error read as ``y ∼ N(ŷ, ½I)``;
* ``empirical_fisher_metric``: ``(1/n) Σ_s ∇l_s ∇l_sᵀ`` at the observed labels;
* ``lnb_metric``: ``blockdiag_i(M_i)``, ``M_i = J_iᵀJ_i/n_i`` of each neuron's *own* output
  (Eq. 10–11): LNB ignores the layers downstream and the cross-layer blocks.

Parameters are flattened in the order of ``net.neurons``, each ``θ_i.ravel()`` (rows of
``(K, D)``, bias last): the order of :func:`flatten`. The output Jacobian is built by reverse
mode from the neurons' own ``vjp_theta`` / ``vjp_input`` (:func:`network_jacobian`): one
backward pass per output coordinate, keeping each sample's gradient apart.

§4.2: if the last neuron has no activation, the network output *is* that neuron's output, so GN's
last diagonal block equals LNB's last block; the other blocks differ by the downstream Jacobian.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg

from .errors import NotPositiveDefiniteError, check_finite
from .lnb import StepInfo
from .metric import metric_from_forward
from .network import Network, get_activation
from .schedules import Schedule, as_schedule
from .solvers import cholesky_or_raise

METRICS = ("gn", "ggn", "fisher", "empirical_fisher", "lnb", "identity")


def flatten(params: Sequence[np.ndarray]) -> np.ndarray:
    """All parameters as one vector: ``θ_0.ravel(), θ_1.ravel(), ...`` (the metrics' order)."""
    return np.concatenate([np.ravel(p) for p in params])


def unflatten(net: Network, vector: np.ndarray) -> list[np.ndarray]:
    """The inverse of :func:`flatten`: one array of ``theta_shape`` per neuron."""
    vector = np.asarray(vector, dtype=np.float64)
    if vector.shape != (net.n_params,):
        raise ValueError(f"vector has shape {vector.shape}, expected ({net.n_params},)")
    out, start = [], 0
    for neuron in net.neurons:
        out.append(vector[start : start + neuron.n_params].reshape(neuron.theta_shape))
        start += neuron.n_params
    return out


def network_jacobian(net: Network, params: Sequence[np.ndarray], X: np.ndarray) -> np.ndarray:
    """``J = ∂ŷ/∂θ`` of the network output over all parameters, shape ``(n·k, P)``.

    Row ``s·k + j`` is ``∂ŷ_{s,j}/∂θ`` (sample-major, as ``ŷ.ravel()``), columns in the order of
    :func:`flatten`. Built by backprop (Eq. 6) from the cotangent ``e_j`` on every sample's
    output ``j``: samples do not interact in the network, so row ``s`` of each error is sample
    ``s``'s alone, and ``vjp_theta`` on that one sample gives ``∂ŷ_{s,j}/∂θ_i``.
    """
    params = net.check_params(params)
    records = net.forward(params, X)
    n, k = records[-1].post.shape
    offsets = np.cumsum([0] + [neuron.n_params for neuron in net.neurons])
    J = np.zeros((n, k, offsets[-1]))
    for j in range(k):
        lam = np.zeros((n, k))
        lam[:, j] = 1.0
        for i in reversed(range(len(net.neurons))):
            neuron, rec = net.neurons[i], records[i]
            lam = get_activation(net.activations[i]).grad(rec.pre, rec.post) * lam
            for s in range(n):
                g = neuron.vjp_theta(rec.features[s : s + 1], lam[s : s + 1])
                J[s, j, offsets[i] : offsets[i + 1]] = g.ravel()
            if i > 0:
                lam = neuron.vjp_input(rec.features, params[i], lam)
                lam = lam.reshape(records[i - 1].post.shape)
    return J.reshape(n * k, -1)


def _per_sample_jacobian(net, params, X) -> tuple[np.ndarray, np.ndarray]:
    """``(J_s)`` of shape ``(n, k, P)`` and the output ``ŷ`` (n, k)."""
    out = net.predict(params, X)
    n, k = out.shape
    return network_jacobian(net, params, X).reshape(n, k, -1), out


def loss_hessians(net: Network, outputs: np.ndarray) -> np.ndarray:
    """``H_s = ∂²l(ŷ_s, y)/∂ŷ_s²`` per sample, shape ``(n, k, k)`` (independent of ``y`` here).

    Squared error ``l = ‖ŷ − y‖²`` (no ½, :func:`lnb_ref.network.mean_squared_error`): ``2I``.
    Softmax cross-entropy on logits ``ŷ``: ``diag(p) − ppᵀ`` with ``p = softmax(ŷ)``.
    """
    n, k = outputs.shape
    if net.loss_name == "mse":
        return np.broadcast_to(2.0 * np.eye(k), (n, k, k)).copy()
    p = _softmax(outputs)
    return np.einsum("sa,ab->sab", p, np.eye(k)) - np.einsum("sa,sb->sab", p, p)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def gauss_newton_metric(net: Network, params, X: np.ndarray) -> np.ndarray:
    """GN: ``(1/n) Σ_s J_sᵀ J_s = JᵀJ/n``, ``(P, P)``: the squared change of the output."""
    J = network_jacobian(net, params, X)
    return J.T @ J / np.shape(X)[0]


def ggn_metric(net: Network, params, X: np.ndarray) -> np.ndarray:
    """GGN: ``(1/n) Σ_s J_sᵀ H_s J_s`` with the loss Hessian of :func:`loss_hessians` (§4.2).

    It is the Hessian of ``ℓ`` with the second-derivative terms of the network dropped; for the
    squared error ``H_s = 2I`` and GGN = 2·GN.
    """
    J, out = _per_sample_jacobian(net, params, X)
    H = loss_hessians(net, out)
    return np.einsum("sap,sab,sbq->pq", J, H, J) / len(J)


def fisher_metric(net: Network, params, X: np.ndarray) -> np.ndarray:
    """The Fisher information ``(1/n) Σ_s E_{y∼p(·|x_s)}[∇_θ log p(y|x_s) ∇_θ log p(y|x_s)ᵀ]``.

    Softmax-CE: the model is ``p(y|x) = softmax(ŷ)_y`` and ``∇_θ log p(y|x) = J_sᵀ(e_y − p)``;
    the expectation is the explicit sum over the ``k`` classes weighted by ``p_y`` (equal to the
    GGN since ``Σ_y p_y (e_y − p)(e_y − p)ᵀ = diag(p) − ppᵀ``). Squared error: the model is
    ``y ∼ N(ŷ, ½I)`` (so that ``−log p = ‖y − ŷ‖² + const``), whose score ``2(y − ŷ)`` has
    covariance ``4 · ½I = 2I``: this expectation is taken in closed form, ``(1/n) Σ 2 J_sᵀJ_s``.
    """
    J, out = _per_sample_jacobian(net, params, X)
    n, k, P = J.shape
    if net.loss_name == "mse":
        return 2.0 * np.einsum("sap,saq->pq", J, J) / n
    p = _softmax(out)
    F = np.zeros((P, P))
    for y in range(k):
        score = np.einsum("sap,sa->sp", J, np.eye(k)[y] - p)  # ∇_θ log p(y|x_s), (n, P)
        F += np.einsum("s,sp,sq->pq", p[:, y], score, score)
    return F / n


def empirical_fisher_metric(net: Network, params, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """The empirical Fisher ``(1/n) Σ_s ∇_θ l_s ∇_θ l_sᵀ`` at the observed targets ``Y``.

    ``∇_θ l_s = J_sᵀ ∂l/∂ŷ_s`` is sample ``s``'s own loss gradient (``n`` times its row of the
    mean loss's gradient). Not a curvature: it vanishes wherever every sample is fitted.
    """
    J, out = _per_sample_jacobian(net, params, X)
    n = len(J)
    _, lam = net._loss_fn(out, net.check_targets(Y, n))
    G = np.einsum("sap,sa->sp", J, n * lam)
    return G.T @ G / n


def lnb_metric(net: Network, params, X: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """LNB's metric ``blockdiag_i(M_i)``, ``M_i = J_iᵀJ_i/n_i (+ γ I_{non-bias})`` (Eq. 10–11).

    Each block is :func:`lnb_ref.metric_from_forward` of the neuron on its input features
    ``X_i`` from the forward pass; the cross-neuron blocks are zero.
    """
    records = net.forward(params, X)
    blocks = [
        metric_from_forward(neuron, rec.features, ridge)
        for neuron, rec in zip(net.neurons, records, strict=True)
    ]
    return scipy.linalg.block_diag(*blocks)


def metric_matrix(name: str, net: Network, params, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """The ``(P, P)`` metric ``name`` (one of :data:`METRICS`) at ``params`` on ``(X, Y)``."""
    if name == "gn":
        return gauss_newton_metric(net, params, X)
    if name == "ggn":
        return ggn_metric(net, params, X)
    if name == "fisher":
        return fisher_metric(net, params, X)
    if name == "empirical_fisher":
        return empirical_fisher_metric(net, params, X, Y)
    if name == "lnb":
        return lnb_metric(net, params, X)
    if name == "identity":
        return np.eye(net.n_params)
    raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(METRICS)}")


class SecondOrder:
    """The trust-region step of Eq. 1–2 under a materialised metric, for tiny networks.

    Per step on a batch ``(X, Y)``::

        g = ∇ℓ(θ),   A = M(θ; X, Y) + δI,   θ̂ = A⁻¹g (Cholesky),   z = g·θ̂,
        θ ← θ − √(ε/z) θ̂                (no step if z = 0)

    ``metric="lnb"`` with ``damping=0`` is Algorithm 1 (:class:`lnb_ref.ExactLNB`) exactly;
    note that the damping here is on *every* diagonal entry (Levenberg–Marquardt), while
    ExactLNB's ridge γ skips the biases (§3.4). ``"identity"`` is normalised gradient descent.

    Args:
        net: the network (tiny: ``P × P`` matrices and ``n·k`` backward passes per step).
        epsilon: ``ε``, a number or a schedule ``t ↦ ε_t``.
        metric: one of ``"gn"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``, ``"lnb"``,
            ``"identity"``.
        damping: ``δ ≥ 0``. GN/GGN/Fisher are singular for most networks (rank ≤ n·k, and
            softmax's ``H_s`` has the null vector 1), so they need ``δ > 0``.

    Raises:
        NotPositiveDefiniteError: at a step, if ``M + δI`` is (numerically) singular.
    """

    def __init__(
        self, net: Network, epsilon: float | Schedule, metric: str = "gn", damping: float = 0.0
    ):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; valid names: {', '.join(METRICS)}")
        if not damping >= 0.0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.net, self.metric, self.damping = net, metric, float(damping)
        self.epsilon = as_schedule(epsilon)

    def init(self, params: Sequence[np.ndarray]) -> dict:
        """No state but the step count ``t`` (for the schedule ε_t)."""
        return {"t": 0}

    def direction(self, params, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(θ̂, g)`` as flat vectors: ``θ̂ = (M + δI)⁻¹ g`` at ``params`` on ``(X, Y)``."""
        tape = self.net.backprop(params, X, Y)
        g = flatten(tape.grads)
        check_finite(self.net.output_neuron.name, "gradient", g)
        A = metric_matrix(self.metric, self.net, params, X, Y) + self.damping * np.eye(g.size)
        try:
            factor = cholesky_or_raise(self.metric, A)
        except NotPositiveDefiniteError:
            raise NotPositiveDefiniteError(
                f"SecondOrder(metric={self.metric!r}, damping={self.damping}): M + damping·I is "
                f"(numerically) singular; GN, GGN and the Fisher are rank-deficient for most "
                f"networks, use damping > 0"
            ) from None
        return scipy.linalg.cho_solve(factor, g), g

    def step_batch(self, params, X: np.ndarray, Y: np.ndarray, state: dict):
        """One step of Eq. 1–2 on ``(X, Y)``; returns ``(params, state, StepInfo)``."""
        eps = self.epsilon(state["t"])
        theta_hat, g = self.direction(params, X, Y)
        z = float(theta_hat @ g)
        scale = np.sqrt(eps / z) if z > 0 else 0.0
        new = unflatten(self.net, flatten(params) - scale * theta_hat)
        directions = unflatten(self.net, theta_hat)
        return new, {"t": state["t"] + 1}, StepInfo(eps, max(z, 0.0), z, directions)
