"""``describe``: the table of what :func:`lnb_fast.value_and_grad` found in a loss function."""

from __future__ import annotations

from collections.abc import Callable

from .capture import value_and_grad
from .discovery import NeuronTable

COLUMNS = ("parameter", "neuron", "shape", "n_i", "metric")


def rows(table: NeuronTable) -> list[dict[str, str]]:
    """One row per parameter leaf: path, neuron kind (and role), shape, ``n_i``, metric."""
    owner = table.leaf_neuron()
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
                    "metric": "matrix-free",
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
                }
            )
    return out


def format_table(table: NeuronTable) -> str:
    """The rows of :func:`rows` as a Markdown table."""
    body = rows(table)
    widths = {c: max(len(c), *(len(r[c]) for r in body)) if body else len(c) for c in COLUMNS}
    line = lambda r: "| " + " | ".join(r[c].ljust(widths[c]) for c in COLUMNS) + " |"  # noqa: E731
    head = line({c: c for c in COLUMNS})
    rule = "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"
    return "\n".join([head, rule, *(line(r) for r in body)])


def describe(
    loss_fn: Callable, params, *args, has_aux: bool = False, print_table: bool = True
) -> list[dict[str, str]]:
    """Print (and return) how LNB treats every parameter of ``loss_fn(params, *args)``.

    Columns: parameter path, neuron kind and role (``dense weight``, ``conv bias``, ``scale
    weight``, ``additive``, ``class token``, ``unclassified``...), shape, ``n_i`` (footnote 3),
    and the metric: ``matrix-free`` (PCG on ``M_i``) or ``identity (why)`` (``θ̂ = g``).
    """
    table = value_and_grad(loss_fn, has_aux=has_aux).table(params, *args)
    if print_table:
        print(format_table(table))
    return rows(table)
