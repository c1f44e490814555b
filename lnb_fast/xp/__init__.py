"""``lnb_fast.xp``: Linear Neuron Boosting for *explicit* dense and conv neurons on any
array-API library — NumPy on the CPU, CuPy on a CUDA GPU — with no autodiff.

For a training loop that computes its own gradients (hand-written backprop, a NumPy or CuPy
model) and can hand over each neuron's input features. The same code runs on every library: the
namespace is read from the arrays (``x.__array_namespace__()``), dtype and device follow them.
Parameters are laid out as in :mod:`lnb_ref` (θ of shape ``(K, D)``, bias last)::

    from lnb_fast import xp as lnbxp
    neurons = [lnbxp.Dense(784, 800, bias=True), lnbxp.Dense(800, 10, bias=True)]
    opt = lnbxp.OnlineLNB(neurons, epsilon=1e-2, ridge=1e-3)
    state = opt.init(params)
    params, state, info = opt.step(params, grads, features, state)

Nothing in this subpackage imports JAX, optax or :mod:`lnb_ref`, and ``lnb_fast/__init__``
loads its JAX names lazily, so ``lnb_fast.xp`` works without the ``fast`` extra. Shape
mismatches raise :class:`lnb_fast.errors.StructureError` (a ``ValueError``), the class the JAX
optimizers raise.
"""

from .metric import design_moments, metric_matvec, metric_operator, row_metric
from .neurons import Conv2d, Dense, Neuron
from .online import OnlineLNB, StepInfo, boosting_update
from .pcg import PCGResult, pcg
from .preconditioner import (
    DiagonalPreconditioner,
    IncompleteCholeskyPreconditioner,
    paper_preconditioner,
)

__all__ = [
    "Conv2d",
    "Dense",
    "DiagonalPreconditioner",
    "IncompleteCholeskyPreconditioner",
    "Neuron",
    "OnlineLNB",
    "PCGResult",
    "StepInfo",
    "boosting_update",
    "design_moments",
    "metric_matvec",
    "metric_operator",
    "paper_preconditioner",
    "pcg",
    "row_metric",
]
