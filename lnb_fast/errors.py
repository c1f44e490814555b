"""Errors a user can cause, each naming the parameter (pytree path) it is about.

`lnb_fast` never imports `lnb_ref` at run time, so it has its own small hierarchy; the classes
mirror `lnb_ref.errors`.
"""

from __future__ import annotations


class LNBError(ValueError):
    """Base class of every error `lnb_fast` raises on purpose."""


class DiscoveryError(LNBError):
    """The loss function could not be traced or its parameters could not be matched."""


class StructureError(LNBError):
    """Gradients, parameters, state and features do not describe the same parameter tree."""


class NonFiniteError(LNBError, FloatingPointError):
    """NaN or Inf in a gradient or a neuron's input features: refusing to take a NaN step."""


class CompositionError(LNBError):
    """An optax wrapper the transformation cannot run under (``optax.MultiSteps``), named."""


class AxisError(LNBError):
    """A transformation runs under a mapped mesh axis (``shard_map``, ``pmap``) that its
    ``axis_name`` does not name, or names an axis it does not run under (docs/scaling.md)."""
