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
``boosting``           boosted backprop (§2.4) with linear and nonlinear weak learners
``gauss_newton``       GN, GGN, Fisher and LNB as explicit metrics on tiny networks (§4.2)
``locoprop``           LocoProp-S / LocoProp-M: local losses per layer (§4.1)
``proxprop``           ProxProp: implicit (proximal) steps per layer (§4.1)
=====================  =============================================================
"""

from .baselines import Adam, GradientDescent
from .boosting import (
    BoostedBackprop,
    BoostedNetwork,
    BoostingInfo,
    LinearLeastSquares,
    RandomFeatureLeastSquares,
)
from .covariance import FOOF, CovarianceLNB
from .errors import LNBError, NeuronShapeError, NonFiniteError, NotPositiveDefiniteError
from .gauss_newton import (
    SecondOrder,
    empirical_fisher_metric,
    fisher_metric,
    gauss_newton_metric,
    ggn_metric,
    lnb_metric,
    loss_hessians,
    network_jacobian,
)
from .lnb import ExactLNB, OnlineLNB, StepInfo, boosting_update
from .locoprop import LocalStepInfo, LocoPropM, LocoPropS, locoprop_s_minimizer
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
from .proxprop import ProxProp
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
    "BoostedBackprop",
    "BoostedNetwork",
    "BoostingInfo",
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
    "LinearLeastSquares",
    "LinearNeuron",
    "LocalStepInfo",
    "LocoPropM",
    "LocoPropS",
    "NeuronShapeError",
    "NonFiniteError",
    "NotPositiveDefiniteError",
    "OnlineLNB",
    "RandomFeatureLeastSquares",
    "ProxProp",
    "Scale",
    "SecondOrder",
    "StepInfo",
    "boosting_update",
    "constant",
    "covariance_sqrt",
    "dense_bias_metric",
    "empirical_fisher_metric",
    "expand_row_metric",
    "exponential_decay",
    "feature_moments",
    "fisher_metric",
    "gauss_newton_metric",
    "ggn_metric",
    "jacobian",
    "lnb_metric",
    "loss_hessians",
    "locoprop_s_minimizer",
    "metric_factor",
    "metric_from_forward",
    "metric_matvec",
    "network_jacobian",
    "paper_preconditioner",
    "pcg",
    "row_metric",
    "second_moment",
    "solve_exact",
    "step_norm",
    "whiten",
    "whitened_features",
]
