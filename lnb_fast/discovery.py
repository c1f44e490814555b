"""Finding the linear neurons of an unmodified model by walking its jaxpr.

``jax.make_jaxpr(loss_fn)(params, batch)`` turns any JAX model (plain functions, Equinox, Flax
NNX, ...) into a list of primitive applications. An *abstract interpretation* of that list
follows every parameter leaf to the op that consumes it:

* through shape-only linear ops (transpose, reshape, squeeze, broadcast, dtype conversion,
  multiplication by a literal constant): the leaf is still "a parameter, reshaped";
* into ``dot_general`` (dense neuron), the kernel of ``conv_general_dilated`` (convolution, any
  strides/padding/dilation/groups) or an elementwise ``mul`` with an activation (scale): a
  neuron, whose *other* operand is its input ``X`` (captured by :mod:`lnb_fast.capture`);
* an ``add`` of a parameter to a neuron's output (through reshapes/transposes that nothing else
  reads) is that neuron's bias; added to anything else it is an additive embedding, and
  concatenated it is a class token: both have the identity metric (§3.3), ``θ̂ = g``;
* into ``jit``/``pjit``, ``remat``/``checkpoint``, ``closed_call``, ``custom_jvp_call`` and
  ``custom_vjp_call``: the walk descends into the inner jaxpr;
* anything else (a leaf used twice, inside ``scan``/``cond``/``while``, in a nonlinear op) is
  *unclassified*: it falls back to the identity metric and :func:`lnb_fast.describe` lists it
  with the reason. Nothing is silently mishandled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jax.extend.core import Literal, jaxpr_as_fun

from ._jax_compat import bind
from .neuron import Neuron, Step

#: Ops that are linear in their single traced operand and only move or convert entries.
CHAIN_OPS = frozenset(
    {
        "transpose",
        "reshape",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "convert_element_type",
        "copy",
        "copy_p",
        "reduce_precision",
        "neg",
        "mul",
        "div",
    }
)
#: Ops allowed between a neuron's core op and the ``add`` of its bias.
OUT_CHAIN_OPS = frozenset(
    {"transpose", "reshape", "squeeze", "expand_dims", "convert_element_type", "copy", "copy_p"}
)
#: Call-like primitives whose inner jaxpr is walked (and, for capture, evaluated inline).
INLINE_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint"})
#: Call-like primitives with custom derivatives: walked, but bound as they are.
CUSTOM_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
#: Name prefix of the ``jit`` that :func:`lnb_fast.tag_neuron` wraps a neuron in.
TAG_PREFIX = "lnb_tagged_neuron"


def sub_jaxpr(eqn) -> tuple[Any, list]:
    """``(jaxpr, consts)`` of a call-like equation, or ``(None, [])``."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if inner is None:
            continue
        if hasattr(inner, "jaxpr") and hasattr(inner, "consts"):  # ClosedJaxpr
            return inner.jaxpr, list(inner.consts)
        if hasattr(inner, "eqns"):
            return inner, []
    return None, []


# --- abstract values ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamRef:
    """A parameter leaf after a chain of shape-only linear steps."""

    leaf: int
    chain: tuple[Step, ...] = ()


@dataclass(frozen=True)
class NeuronOut:
    """The output of neuron ``nid`` after ``chain`` (no bias attached yet)."""

    nid: int
    chain: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Data:
    """Any other value; ``batch`` says whether it depends on the data (not only constants)."""

    batch: bool = True


CONST = Data(batch=False)


@dataclass(frozen=True)
class Biased(Data):
    """The output of neuron ``nid`` with its bias added: data, remembered only so that the
    activation consuming it can be recorded as the neuron's transfer (:func:`_transfer`)."""

    nid: int = -1


@dataclass
class Use:
    """One use of a parameter leaf: its role and the neuron (or the reason it has none)."""

    role: str  # "weight" | "bias" | "additive" | "class token" | "unclassified"
    nid: int | None = None
    reason: str = ""


@dataclass
class Walk:
    """Everything the walk records."""

    shapes: list[tuple[int, ...]]
    neurons: list[Neuron] = field(default_factory=list)
    uses: dict[int, list[Use]] = field(default_factory=dict)
    # (call path, Var) -> (neuron index, slot): slot 0 is X, slots 1... the extra scale factors
    sites: dict[tuple, list[tuple[int, int]]] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)

    @property
    def n_leaves(self) -> int:
        return len(self.shapes)

    def use(self, leaf: int, use: Use) -> None:
        self.uses.setdefault(leaf, []).append(use)


def walk(closed_jaxpr, n_param_leaves: int, paths: list[str]) -> Walk:
    """Walk ``closed_jaxpr`` whose first ``n_param_leaves`` inputs are the parameters."""
    jaxpr = closed_jaxpr.jaxpr
    shapes = [tuple(v.aval.shape) for v in jaxpr.invars[:n_param_leaves]]
    w = Walk(shapes=shapes, paths=paths)
    ins = [ParamRef(i) if i < n_param_leaves else Data(True) for i in range(len(jaxpr.invars))]
    _walk(w, jaxpr, [CONST] * len(jaxpr.constvars), ins, path=())
    return w


def _walk(w: Walk, jaxpr, const_descs, in_descs, path: tuple) -> list:
    env: dict = {}
    for v, d in zip(jaxpr.constvars, const_descs, strict=True):
        env[v] = d
    for v, d in zip(jaxpr.invars, in_descs, strict=True):
        env[v] = d
    readers = Counter(v for e in jaxpr.eqns for v in e.invars if not isinstance(v, Literal))
    readers.update(v for v in jaxpr.outvars if not isinstance(v, Literal))

    def read(v):
        return CONST if isinstance(v, Literal) else env.get(v, CONST)

    for index, eqn in enumerate(jaxpr.eqns):
        outs = _rule(w, eqn, [read(v) for v in eqn.invars], readers, path + (index,))
        for v, d in zip(eqn.outvars, outs, strict=True):
            env[v] = d
    return [read(v) for v in jaxpr.outvars]


def _is_data(d) -> bool:
    return isinstance(d, NeuronOut) or (isinstance(d, Data) and d.batch)


def _default(eqn, ins) -> list:
    batch = any(_is_data(d) for d in ins)
    return [Data(batch) for _ in eqn.outvars]


def _rule(w: Walk, eqn, ins: list, readers: Counter, path: tuple) -> list:
    name = eqn.primitive.name
    params = [i for i, d in enumerate(ins) if isinstance(d, ParamRef)]

    # Follow a neuron's output towards a possible bias.
    if not params:
        # The transfer φ (LocoProp-M): an elementwise tanh / logistic / relu that is the only
        # reader of the neuron's output (after its bias, if any).
        found = [i for i, d in enumerate(ins) if isinstance(d, (NeuronOut, Biased))]
        if len(found) == 1 and readers[eqn.invars[found[0]]] == 1:
            transfer = _transfer(eqn, found[0])
            if transfer is not None:
                w.neurons[ins[found[0]].nid].transfer = transfer
        outs = [d for d in ins if isinstance(d, NeuronOut)]
        if (
            name in OUT_CHAIN_OPS
            and len(outs) == 1
            and readers[eqn.invars[ins.index(outs[0])]] == 1
            and all(
                isinstance(v, Literal) or v is eqn.invars[ins.index(outs[0])] for v in eqn.invars
            )
        ):
            pos = ins.index(outs[0])
            return [NeuronOut(outs[0].nid, outs[0].chain + (_step(eqn, pos),))]
        if name == "mul" and len(outs) == 1 and len(ins) == 2:
            extended = _extend_scale(w, eqn, ins, outs[0], readers, path)
            if extended is not None:
                return [extended]
        return _default(eqn, ins)

    if name.startswith(("jit", "pjit")) and str(eqn.params.get("name", "")).startswith(TAG_PREFIX):
        return _tagged(w, eqn, ins, params, path)

    if name in INLINE_CALLS or name in CUSTOM_CALLS:
        inner, consts = sub_jaxpr(eqn)
        if inner is None:
            return _unclassified(w, eqn, ins, params, f"inside `{name}`")
        outs = _walk(w, inner, [CONST] * len(consts), ins, path)
        if name in CUSTOM_CALLS:  # its derivative is custom: nothing continues across it
            return [Data(True) for _ in eqn.outvars]
        return outs

    others_literal = all(isinstance(v, Literal) for i, v in enumerate(eqn.invars) if i != params[0])
    if name in CHAIN_OPS and len(params) == 1 and others_literal:
        if name == "div" and params[0] != 0:
            return _unclassified(w, eqn, ins, params, "divides by a parameter")
        ref = ins[params[0]]
        return [ParamRef(ref.leaf, ref.chain + (_step(eqn, params[0]),))]

    if len(params) == 1 and len(ins) == 2:
        p = params[0]
        other, ref = ins[1 - p], ins[p]
        x_var = eqn.invars[1 - p]
        if name == "dot_general" and not isinstance(x_var, Literal):
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            contract, batch = (rc, rb) if p == 0 else (lc, lb)
            free = [a for a in range(x_var.aval.ndim) if a not in contract and a not in batch]
            n = int(np.prod([x_var.aval.shape[a] for a in free]))
            out = _neuron(w, "dense", eqn, ref, x_var, p, n, path)
            w.neurons[out.nid].free_axes = tuple(free)
            return [out]
        if name == "conv_general_dilated" and p == 1 and eqn.params["batch_group_count"] == 1:
            out = eqn.outvars[0].aval
            n = int(np.prod(out.shape)) // out.shape[eqn.params["dimension_numbers"].out_spec[1]]
            return [_neuron(w, "conv", eqn, ref, x_var, p, n, path)]
        if name == "mul" and _is_data(other) and not isinstance(x_var, Literal):
            size = int(np.prod(w_shape(w, ref.leaf)))
            n = int(np.prod(eqn.outvars[0].aval.shape)) // max(size, 1)
            return [_neuron(w, "scale", eqn, ref, x_var, p, n, path)]
        if name == "add" and isinstance(other, NeuronOut) and readers[x_var] == 1:
            neuron = w.neurons[other.nid]
            if neuron.bias is None and neuron.kind != "tagged":
                neuron.bias, neuron.bias_path = ref.leaf, w.paths[ref.leaf]
                neuron.bias_shape = tuple(w_shape(w, ref.leaf))
                neuron.b_chain, neuron.out_chain = ref.chain, other.chain
                w.use(ref.leaf, Use("bias", other.nid))
                return [Biased(nid=other.nid)]
        if name == "add" and _is_data(other):
            w.use(ref.leaf, Use("additive", reason="added to the activations (identity metric)"))
            return [Data(True)]
    if (
        name == "concatenate"
        and all(isinstance(d, ParamRef) or _is_data(d) for d in ins)
        and any(_is_data(d) for d in ins)
    ):
        for i in params:
            w.use(ins[i].leaf, Use("class token", reason="concatenated (identity metric)"))
        return [Data(True)]
    reason = f"used by `{name}`"
    if name in {"scan", "while", "cond"}:
        reason = f"used inside `{name}` (not walked)"
    elif name == "dot_general" and len(params) == 2:
        reason = "multiplied by another parameter"
    return _unclassified(w, eqn, ins, params, reason)


def _extend_scale(w: Walk, eqn, ins, out: NeuronOut, readers: Counter, path: tuple):
    """``(X₀ ⊙ s) ⊙ X₁``: a scale whose output is multiplied by activations is still a scale
    neuron (Flax's LayerNorm folds its scale into ``rsqrt(var)`` before multiplying by
    ``x − mean``); its input is then every factor, each captured."""
    pos = ins.index(out)
    neuron = w.neurons[out.nid]
    factor = eqn.invars[1 - pos]
    if (
        neuron.kind != "scale"
        or neuron.bias is not None
        or out.chain
        or readers[eqn.invars[pos]] != 1
        or isinstance(factor, Literal)
        or not _is_data(ins[1 - pos])
    ):
        return None
    neuron.extra = neuron.extra + ((1 - pos, tuple(factor.aval.shape)),)
    size = int(np.prod(neuron.weight_shape))
    neuron.n_samples = int(np.prod(eqn.outvars[0].aval.shape)) // max(size, 1)
    w.sites.setdefault((path[:-1], factor), []).append((out.nid, len(neuron.extra)))
    return NeuronOut(out.nid)


def _transfer(eqn, position: int = 0) -> str | None:
    """The name of the elementwise transfer ``eqn`` applies to its operand ``position``, or
    None: ``tanh``, ``logistic`` (``"sigmoid"``), ``max(·, 0)`` either way round (``"relu"``),
    also when wrapped in a call of one equation (``jax.nn.relu`` is a ``custom_jvp_call`` around
    ``jit(max(x, 0.0))``)."""
    name = eqn.primitive.name
    if name in ("tanh", "logistic") and len(eqn.invars) == 1:
        return "tanh" if name == "tanh" else "sigmoid"
    if name == "max" and len(eqn.invars) == 2:
        other = eqn.invars[1 - position]
        if isinstance(other, Literal) and np.all(np.asarray(other.val) == 0):
            return "relu"
        return None
    if position == 0 and (name in INLINE_CALLS or name in CUSTOM_CALLS):
        inner, _ = sub_jaxpr(eqn)
        if (
            inner is not None
            and len(inner.eqns) == 1
            and len(inner.invars) == 1
            and inner.eqns[0].invars[:1] == [inner.invars[0]]
            and list(inner.outvars) == list(inner.eqns[0].outvars)
        ):
            return _transfer(inner.eqns[0])
    return None


def w_shape(w: Walk, leaf: int) -> tuple[int, ...]:
    return w.shapes[leaf]


def _step(eqn, position: int) -> Step:
    operands = tuple(None if i == position else v.val for i, v in enumerate(eqn.invars))
    return Step(eqn.primitive, dict(eqn.params), operands, position)


def _core(eqn, p: int):
    prim, params = eqn.primitive, dict(eqn.params)

    def core(X, W):
        operands = (W, X) if p == 0 else (X, W)
        return bind(prim, params, operands)

    return core


def _neuron(w: Walk, kind, eqn, ref: ParamRef, x_var, p: int, n: int, path: tuple) -> NeuronOut:
    nid = len(w.neurons)
    w.neurons.append(
        Neuron(
            kind=kind,
            weight=ref.leaf,
            weight_path=w.paths[ref.leaf],
            weight_shape=tuple(w_shape(w, ref.leaf)),
            x_shape=tuple(x_var.aval.shape),
            x_dtype=x_var.aval.dtype,
            n_samples=n,
            core=_core(eqn, p),
            w_chain=ref.chain,
        )
    )
    w.use(ref.leaf, Use("weight", nid))
    w.sites.setdefault((path[:-1], x_var), []).append((nid, 0))
    return NeuronOut(nid)


def _tagged(w: Walk, eqn, ins, params, path) -> list:
    inner, consts = sub_jaxpr(eqn)
    x_var = eqn.invars[0]
    if isinstance(ins[0], ParamRef) or len(eqn.invars) not in (2, 3) or isinstance(x_var, Literal):
        return _unclassified(w, eqn, ins, params, "tag_neuron(f, x, w[, b]) misused")
    refs = [ins[i] for i in range(1, len(ins))]
    if not all(isinstance(r, ParamRef) and not r.chain for r in refs):
        return _unclassified(w, eqn, ins, params, "tag_neuron's w and b must be parameter leaves")
    closed = eqn.params["jaxpr"]
    out = eqn.outvars[0].aval
    n = int(str(eqn.params["name"])[len(TAG_PREFIX) + 1 :] or 0) or (
        int(np.prod(out.shape)) // out.shape[-1]
    )

    fun = jaxpr_as_fun(closed)

    def core(X, wv, b=None):
        return (fun(X, wv) if b is None else fun(X, wv, b))[0]

    nid = len(w.neurons)
    neuron = Neuron(
        kind="tagged",
        weight=refs[0].leaf,
        weight_path=w.paths[refs[0].leaf],
        weight_shape=tuple(w_shape(w, refs[0].leaf)),
        x_shape=tuple(x_var.aval.shape),
        x_dtype=x_var.aval.dtype,
        n_samples=n,
        core=core,
    )
    if len(refs) == 2:
        neuron.bias, neuron.bias_path = refs[1].leaf, w.paths[refs[1].leaf]
        neuron.bias_shape = tuple(w_shape(w, refs[1].leaf))
        w.use(refs[1].leaf, Use("bias", nid))
    w.neurons.append(neuron)
    w.use(refs[0].leaf, Use("weight", nid))
    w.sites.setdefault((path[:-1], x_var), []).append((nid, 0))
    return [Data(True)]


def _unclassified(w: Walk, eqn, ins, params, reason: str) -> list:
    for i in params:
        w.use(ins[i].leaf, Use("unclassified", reason=reason))
    return _default(eqn, ins)


# --- from uses to a table -------------------------------------------------------------------------
@dataclass(eq=False)
class NeuronTable:
    """What discovery found in a loss function, for one signature of its inputs.

    Attributes:
        treedef, paths, shapes: the parameter tree, each leaf's path and shape.
        neurons: the neurons LNB solves for (matrix-free metric).
        identity: leaf index -> why it uses the identity metric (``θ̂ = g``).
        roles: leaf index -> ``"weight"``/``"bias"`` of a neuron, or the identity reason's role.
        sites: ``(call path, Var) -> [(neuron index, slot)]``: where each neuron's input is
            computed; one value may feed several neurons, and slot > 0 are the extra factors
            of a scale (see :class:`~lnb_fast.neuron.Neuron`).
    """

    treedef: Any
    paths: list[str]
    shapes: list[tuple[int, ...]]
    neurons: list[Neuron]
    identity: dict[int, str]
    roles: dict[int, str]
    sites: dict[tuple, list[tuple[int, int]]]

    def leaf_neuron(self) -> dict[int, int]:
        """leaf index -> index of the neuron it belongs to (weights and biases)."""
        out = {}
        for i, n in enumerate(self.neurons):
            out[n.weight] = i
            if n.bias is not None:
                out[n.bias] = i
        return out

    @property
    def call_paths(self) -> set[tuple]:
        """Every prefix of every site's call path: the calls capture must evaluate inline."""
        return {path[:k] for path, _ in self.sites for k in range(1, len(path) + 1)}


def resolve(w: Walk, treedef) -> NeuronTable:
    """Keep the neurons whose leaves are used exactly once; everything else is identity."""
    valid = set(range(len(w.neurons)))
    for uses in w.uses.values():
        if len(uses) > 1:
            valid -= {u.nid for u in uses if u.nid is not None}
    identity: dict[int, str] = {}
    roles: dict[int, str] = {}
    for leaf in range(w.n_leaves):
        uses = w.uses.get(leaf, [])
        if not uses:
            identity[leaf], roles[leaf] = "not used by the loss", "unused"
        elif len(uses) > 1:
            kinds = ", ".join(sorted({u.role if not u.reason else u.reason for u in uses}))
            identity[leaf] = f"used {len(uses)} times ({kinds})"
            roles[leaf] = "shared"
        elif uses[0].nid is not None and uses[0].nid not in valid:
            identity[leaf] = f"{uses[0].role} of a neuron whose weight is shared"
            roles[leaf] = "unclassified"
        elif uses[0].nid is None:
            identity[leaf] = uses[0].reason
            roles[leaf] = uses[0].role
        else:
            roles[leaf] = uses[0].role
    neurons, sites, renumber = [], {}, {}
    for nid in sorted(valid):
        neuron = w.neurons[nid]
        if neuron.bias is not None and neuron.kind != "tagged":
            try:
                neuron.row_map()
            except ValueError as err:  # keep the weight, give the bias the identity metric
                identity[neuron.bias] = f"bias rows could not be paired ({err})"
                roles[neuron.bias] = "unclassified"
                neuron.bias = neuron.bias_path = neuron.bias_shape = None
                neuron.b_chain, neuron.out_chain = (), ()
                neuron.transfer = "identity"  # φ acted on the output *with* the bias
        renumber[nid] = len(neurons)
        neurons.append(neuron)
    for site, slots in w.sites.items():
        kept = [(renumber[nid], slot) for nid, slot in slots if nid in renumber]
        if kept:
            sites[site] = kept
    return NeuronTable(treedef, w.paths, w.shapes, neurons, identity, roles, sites)
