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

The names below are loaded on first use, so ``lnb_fast.xp`` (the array-API path) and
``lnb_fast.errors`` import without JAX or optax; ``lnb_fast.lnb`` and the rest import them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs
    from .capture import Features, ValueAndGrad, value_and_grad
    from .describe import describe, format_table
    from .discovery import NeuronTable
    from .errors import (
        AxisError,
        CompositionError,
        DiscoveryError,
        LNBError,
        NonFiniteError,
        StructureError,
    )
    from .foof import FOOFState, foof
    from .locoprop import LocalState, locoprop_m, locoprop_s
    from .measure import StrategyTimes, measure_strategies
    from .neuron import Neuron
    from .pcg import PCGResult, pcg
    from .plumbing import check_finite
    from .proxprop import proxprop
    from .spmd import state_specs
    from .strategy import SPEED, STRATEGIES
    from .tagging import tag_neuron
    from .transform import LNBState, lnb, scale_by_lnb

# public name -> the submodule that defines it
_SOURCES = {
    "Features": "capture",
    "ValueAndGrad": "capture",
    "value_and_grad": "capture",
    "describe": "describe",
    "format_table": "describe",
    "NeuronTable": "discovery",
    "AxisError": "errors",
    "CompositionError": "errors",
    "DiscoveryError": "errors",
    "LNBError": "errors",
    "NonFiniteError": "errors",
    "StructureError": "errors",
    "FOOFState": "foof",
    "foof": "foof",
    "LocalState": "locoprop",
    "locoprop_m": "locoprop",
    "locoprop_s": "locoprop",
    "StrategyTimes": "measure",
    "measure_strategies": "measure",
    "Neuron": "neuron",
    "PCGResult": "pcg",
    "pcg": "pcg",
    "check_finite": "plumbing",
    "proxprop": "proxprop",
    "state_specs": "spmd",
    "SPEED": "strategy",
    "STRATEGIES": "strategy",
    "tag_neuron": "tagging",
    "LNBState": "transform",
    "lnb": "transform",
    "scale_by_lnb": "transform",
}

__all__ = [
    "AxisError",
    "CompositionError",
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
    "SPEED",
    "STRATEGIES",
    "StrategyTimes",
    "StructureError",
    "ValueAndGrad",
    "check_finite",
    "describe",
    "foof",
    "format_table",
    "lnb",
    "locoprop_m",
    "locoprop_s",
    "measure_strategies",
    "pcg",
    "proxprop",
    "scale_by_lnb",
    "state_specs",
    "tag_neuron",
    "value_and_grad",
]


def __getattr__(name: str):
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{source}", __name__)
    except ImportError as err:
        if err.name is None or err.name.split(".")[0] not in ("jax", "jaxlib", "optax"):
            raise
        raise ImportError(
            f"lnb_fast.{name} needs JAX and optax ({err}); install the `fast` extra "
            "(pip install 'lnb[fast]'), or use lnb_fast.xp, which needs neither",
            name=err.name,
        ) from err
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``lnb_fast.describe``, ``.foof`` and ``.pcg`` the functions, as the eager imports
    had them: importing a submodule of the same name (``import lnb_fast.pcg``, or any module
    doing ``from .pcg import pcg``) binds the submodule on its package; the function wins."""

    def __setattr__(self, name: str, value) -> None:
        if (
            isinstance(value, types.ModuleType)
            and value.__name__ == f"{self.__name__}.{name}"
            and _SOURCES.get(name) == name
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
