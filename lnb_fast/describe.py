"""``describe``: the table of what :func:`lnb_fast.value_and_grad` found in a loss function."""

from __future__ import annotations

from collections.abc import Callable

from .capture import value_and_grad
from .discovery import NeuronTable
from .strategy import Choice, plan

COLUMNS = ("parameter", "neuron", "shape", "n_i", "metric", "strategy")


def _flops(x: float) -> str:
    return f"{x / 1e9:.3g} GFLOP" if x >= 1e9 else f"{x / 1e6:.3g} MFLOP"


def strategy_text(choice: Choice) -> str:
    """``gram (2.1 GFLOP; matrix-free 7.5 GFLOP)``, or why a neuron is matrix-free only."""
    if not choice.flops:
        return f"matrix-free ({choice.reason})"
    others = "; ".join(
        f"{k} {_flops(v)}"
        for k, v in choice.flops.items()
        if k != choice.name and k != "covariance"
    )
    tail = f"; {others}" if others and choice.name != "covariance" else ""
    forced = ", forced" if choice.reason == "forced" else ""
    return f"{choice.name} ({_flops(choice.flops[choice.name])}{tail}{forced})"


def rows(table: NeuronTable, strategy="auto", **options) -> list[dict[str, str]]:
    """One row per parameter leaf: path, neuron kind (and role), shape, ``n_i``, metric and the
    strategy :func:`lnb_fast.lnb` would use with ``strategy=`` (with the cost model's flops per
    step, :mod:`lnb_fast.strategy`)."""
    owner = table.leaf_neuron()
    choices = plan(table, strategy, **options)
    out = []
    for leaf, path in enumerate(table.paths):
        shape = "×".join(str(s) for s in table.shapes[leaf]) or "scalar"
        if leaf in owner:
            neuron = table.neurons[owner[leaf]]
            role = "weight" if leaf == neuron.weight else "bias"
            out.append(
                {
                    "parameter": path,
                    "neuron": f"{neuron.kind} {role}",
                    "shape": shape,
                    "n_i": str(neuron.n_samples),
                    "metric": "M_i (Eq. 10)",
                    "strategy": strategy_text(choices[owner[leaf]]),
                }
            )
        else:
            role = table.roles.get(leaf, "unclassified")
            out.append(
                {
                    "parameter": path,
                    "neuron": role,
                    "shape": shape,
                    "n_i": "-",
                    "metric": f"identity ({table.identity[leaf]})",
                    "strategy": "-",
                }
            )
    return out


def step_cost(table: NeuronTable, strategy="auto", **options) -> dict[str, float]:
    """The cost model's estimate of one step (:mod:`lnb_fast.strategy`), in flops:
    ``solver`` (every neuron's θ̂ by the strategy it gets, a matrix-free-only neuron counted as
    ``(k + 1)·4·n_i·P``), ``gradient`` (``6·n_i·P`` per neuron: its forward and the two products
    of its backward; what the model does besides its neurons, such as attention, is not
    counted, so this is a lower bound) and ``ratio = (gradient + solver) / gradient``, the
    step's estimated cost over a gradient step (an Adam step costs about one gradient)."""
    k = options.get("cg_iterations", 2)
    solver = gradient = 0.0
    for neuron, choice in zip(table.neurons, plan(table, strategy, **options), strict=True):
        gradient += 6.0 * neuron.n_samples * neuron.n_params
        if choice.flops:
            solver += choice.flops[choice.name]
        else:
            solver += (k + 1) * 4.0 * neuron.n_samples * neuron.n_params
    ratio = (gradient + solver) / gradient if gradient else 1.0
    return {"solver": solver, "gradient": gradient, "ratio": ratio}


def cost_text(table: NeuronTable, strategy="auto", **options) -> str:
    """One line: :func:`step_cost` in words."""
    c = step_cost(table, strategy, **options)
    return (
        f"estimated per step: solver {_flops(c['solver'])} on a gradient of at least "
        f"{_flops(c['gradient'])}: about {c['ratio']:.2f}x an Adam step by flops "
        "(docs/fast.md, Speed, has measured ratios)"
    )


def format_table(table: NeuronTable, strategy="auto", **options) -> str:
    """The rows of :func:`rows` as a Markdown table, and :func:`cost_text` under it."""
    body = rows(table, strategy, **options)
    widths = {c: max(len(c), *(len(r[c]) for r in body)) if body else len(c) for c in COLUMNS}
    line = lambda r: "| " + " | ".join(r[c].ljust(widths[c]) for c in COLUMNS) + " |"  # noqa: E731
    head = line({c: c for c in COLUMNS})
    rule = "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"
    return "\n".join(
        [head, rule, *(line(r) for r in body), "", cost_text(table, strategy, **options)]
    )


def describe(
    loss_fn: Callable,
    params,
    *args,
    has_aux: bool = False,
    print_table: bool = True,
    strategy="auto",
    cg_iterations: int = 2,
    refresh_every: int = 10,
    covariance_every: int = 1,
) -> list[dict[str, str]]:
    """Print (and return) how LNB treats every parameter of ``loss_fn(params, *args)``.

    Columns: parameter path, neuron kind and role (``dense weight``, ``conv bias``, ``scale
    weight``, ``additive``, ``class token``, ``unclassified``...), shape, ``n_i`` (footnote 3),
    the metric: ``M_i (Eq. 10)`` (the neuron's own) or ``identity (why)`` (``θ̂ = g``), and the
    strategy :func:`lnb_fast.lnb` picks for it with the same ``strategy``, ``cg_iterations``,
    ``refresh_every`` and ``covariance_every`` (``"auto"``: the cheaper of matrix-free and gram
    by the cost model; a forced strategy the neuron cannot use raises, naming the parameter),
    with the estimated flops per step; under the table, the whole step's estimated cost
    (:func:`step_cost`).
    ``lnb_fast.describe(loss_fn, params, batch, **lnb_fast.SPEED)`` shows the speed preset's.
    """
    table = value_and_grad(loss_fn, has_aux=has_aux).table(params, *args)
    options = {
        "cg_iterations": cg_iterations,
        "refresh_every": refresh_every,
        "covariance_every": covariance_every,
    }
    if print_table:
        print(format_table(table, strategy, **options))
    return rows(table, strategy, **options)
