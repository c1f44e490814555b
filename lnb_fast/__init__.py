"""lnb_fast: Linear Neuron Boosting in JAX — matrix-free, jit-compiled, optax-compatible.

    value_grad_features = lnb_fast.value_and_grad(loss_fn)
    opt = lnb_fast.lnb(learning_rate=0.01)
    state = opt.init(params)
    loss, grads, features = value_grad_features(params, batch)
    updates, state = opt.update(grads, state, params, features=features)
    params = optax.apply_updates(params, updates)

The neurons (dense, convolution, elementwise scale, their biases; additive embeddings and class
tokens with the identity metric) are found in the traced loss function; see
:func:`describe` for what was found.
"""

from .capture import Features, ValueAndGrad, value_and_grad
from .describe import describe, format_table
from .discovery import NeuronTable
from .errors import DiscoveryError, LNBError, NonFiniteError, StructureError
from .foof import FOOFState, foof
from .locoprop import LocalState, locoprop_m, locoprop_s
from .neuron import Neuron
from .pcg import PCGResult, pcg
from .proxprop import proxprop
from .strategy import STRATEGIES
from .tagging import tag_neuron
from .transform import LNBState, lnb

__all__ = [
    "DiscoveryError",
    "FOOFState",
    "Features",
    "LNBError",
    "LNBState",
    "LocalState",
    "Neuron",
    "NeuronTable",
    "NonFiniteError",
    "PCGResult",
    "STRATEGIES",
    "StructureError",
    "ValueAndGrad",
    "describe",
    "foof",
    "format_table",
    "lnb",
    "locoprop_m",
    "locoprop_s",
    "pcg",
    "proxprop",
    "tag_neuron",
    "value_and_grad",
]
