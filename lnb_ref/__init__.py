"""``lnb_ref``: the exact, educational NumPy/SciPy reference of Linear Neuron Boosting.

Munoz (2025), *Simple Linear Neuron Boosting*. Every matrix is materialised, every solve is
exact or returns its iterates, and every function cites the equation it implements. It is the
oracle the fast backend (``lnb_fast``) is tested against, and the code the notebooks teach from.

Map of the package, in the paper's order:

=====================  =============================================================
``neurons``            linear neurons ``f(X; θ) = Φ(X) θ`` (§3.1): dense, conv, scale, embedding
``metric``             ``M_i = JᵀJ/n_i`` from the forward alone, closed forms, Eq. 11 matvec
``whiten``             Eq. 12's factorization ``M = LᵀL``, ``M⁻¹ = WWᵀ``, whitening (§3.3)
``solvers``            exact Cholesky solve, PCG and the §3.5 preconditioners
``lnb``                Algorithm 1 (:class:`ExactLNB`) and Algorithm 2 (:class:`OnlineLNB`)
``covariance``         §3.5's EMA-covariance option (:class:`CovarianceLNB`) and FOOF
``baselines``          gradient descent and Adam in NumPy
``network``            an MLP and a small CNN with hand-written backprop (Eq. 6)
``matfact``            the matrix-factorization problem of §5.1
=====================  =============================================================
"""

from .baselines import Adam, GradientDescent
from .covariance import FOOF, CovarianceLNB
from .errors import LNBError, NeuronShapeError, NonFiniteError, NotPositiveDefiniteError
from .lnb import ExactLNB, OnlineLNB, StepInfo, boosting_update
from .metric import (
    dense_bias_metric,
    expand_row_metric,
    feature_moments,
    jacobian,
    metric_from_forward,
    metric_matvec,
    row_metric,
    second_moment,
    step_norm,
)
from .network import CNN, MLP
from .neurons import Conv2d, Dense, Embedding, LinearNeuron, Scale
from .schedules import constant, exponential_decay
from .solvers import (
    DiagonalPreconditioner,
    IncompleteCholeskyPreconditioner,
    paper_preconditioner,
    pcg,
    solve_exact,
)
from .whiten import covariance_sqrt, metric_factor, whiten, whitened_features

__all__ = [
    "CNN",
    "MLP",
    "Adam",
    "Conv2d",
    "CovarianceLNB",
    "Dense",
    "DiagonalPreconditioner",
    "Embedding",
    "ExactLNB",
    "FOOF",
    "GradientDescent",
    "IncompleteCholeskyPreconditioner",
    "LNBError",
    "LinearNeuron",
    "NeuronShapeError",
    "NonFiniteError",
    "NotPositiveDefiniteError",
    "OnlineLNB",
    "Scale",
    "StepInfo",
    "boosting_update",
    "constant",
    "covariance_sqrt",
    "dense_bias_metric",
    "expand_row_metric",
    "exponential_decay",
    "feature_moments",
    "jacobian",
    "metric_factor",
    "metric_from_forward",
    "metric_matvec",
    "paper_preconditioner",
    "pcg",
    "row_metric",
    "second_moment",
    "solve_exact",
    "step_norm",
    "whiten",
    "whitened_features",
]
