"""Per-neuron metric strategies of :func:`lnb_fast.lnb`: how ``θ̂_i = M_i⁻¹ g_i`` is computed, and
the cost model ``strategy="auto"`` chooses with.

* ``"matrix-free"`` — Algorithm 2 as printed: PCG whose products ``M v`` are a forward of the
  neuron with parameters ``v`` and its VJP (Eq. 11). Works for every neuron.
* ``"gram"`` — form the design Gram ``C = ΦᵀΦ/n_i`` (and ``μ`` with a bias, Eq. 12) of this
  minibatch once, then run the *same* PCG (same preconditioner, warm start, iterations) with
  products ``v ↦ v C``. Same iterates as matrix-free up to rounding.
* ``"covariance"`` — §3.5's second option, FOOF-like: an EMA (rate ``b2``, bias-corrected) of the
  augmented second moment, its damped inverse refreshed every ``refresh_every`` steps, and an
  exact solve ``θ̂ = (A/c₂ + γ)⁻¹ ĝ``. A *different algorithm* (stale EMA metric, exact solve):
  opt-in only; ``"auto"`` never picks it.
* ``"prefer-covariance"`` — ``"covariance"`` on every neuron that has a design (dense and
  convolutional neurons), matrix-free on the others (scale, tagged): the fastest strategy on
  the benchmarks of ``docs/fast.md`` (Speed), and the one of the :data:`SPEED` preset.

Cost model, flops per step for a neuron with ``n = n_i`` design rows, ``d`` design columns (per
group), ``K`` output rows in all, ``G`` groups, ``D = d + bias``, ``k = cg_iterations`` (PCG makes
``k + 1`` products with a warm start: the initial residual and one per iteration)::

    matrix-free  (k + 1) · 4 n d K                      a forward (2ndK) and a VJP (2ndK)
    gram         2 n d² G + (k + 1) · 2 d² K             the Gram, then products on it
    covariance   2 n D² G / covariance_every + 7 D³ G / (3 · refresh_every) + 2 D² K

(the refresh is a Cholesky factorisation, ``D³/3``, and its solve against the identity,
``2 D³``).

``"auto"`` picks the cheaper of matrix-free and gram (gram wins when ``d`` is small next to ``n``
and ``K``, e.g. a convolution's ``d = c_in·k²`` against ``n = batch·pixels``; matrix-free wins
for few output rows, e.g. a classifier head).
"""

from __future__ import annotations

from dataclasses import dataclass

from .covariance import GramLayout, gram_layout
from .neuron import Neuron

STRATEGIES = ("auto", "matrix-free", "gram", "covariance", "prefer-covariance")

#: The speed preset: ``lnb_fast.lnb(ε, neurons=table, **lnb_fast.SPEED)``. The covariance
#: strategy wherever a neuron has a design, its EMA updated every 10 steps and its inverse
#: refreshed every 10 (refreshing every 50 made the step 2% cheaper but took a quarter epoch
#: more to each target on Fashion-MNIST: ``docs/results.md``, peers). ``neurons=`` is required,
#: as for every covariance strategy.
SPEED = {"strategy": "prefer-covariance", "covariance_every": 10, "refresh_every": 10}


@dataclass(frozen=True)
class Choice:
    """The strategy of one neuron: ``name``, its ``layout`` (None for matrix-free fallbacks),
    the estimated ``flops`` of each possible strategy, and ``reason`` (why it is what it is)."""

    name: str
    layout: GramLayout | None
    flops: dict
    reason: str


def cost(
    n: int,
    d: int,
    K: int,
    groups: int = 1,
    bias: bool = False,
    cg_iterations: int = 2,
    refresh_every: int = 10,
    covariance_every: int = 1,
) -> dict[str, float]:
    """Flops per step of each strategy (module docstring), for ``n`` design rows, ``d`` design
    columns per group, ``K`` output rows in all and ``G`` groups."""
    products = cg_iterations + 1
    D = d + int(bias)
    return {
        "matrix-free": products * 4.0 * n * d * K,
        "gram": 2.0 * n * d * d * groups + products * 2.0 * d * d * K,
        "covariance": 2.0 * n * D * D * groups / covariance_every
        + 7.0 * D**3 * groups / (3.0 * refresh_every)
        + 2.0 * D * D * K,
    }


def check_strategy(strategy) -> None:
    """A clear ``ValueError`` for anything but a strategy name or a dict of them."""
    values = strategy.values() if isinstance(strategy, dict) else [strategy]
    for value in values:
        if value not in STRATEGIES:
            raise ValueError(
                f"strategy must be one of {STRATEGIES} (or a dict path -> one of them); "
                f"got {value!r}"
            )
    if isinstance(strategy, dict):
        for key in strategy:
            if not isinstance(key, str):
                raise ValueError(f"strategy dict keys must be parameter paths (str); got {key!r}")


def choose(
    neuron: Neuron,
    strategy="auto",
    *,
    cg_iterations: int = 2,
    refresh_every: int = 10,
    covariance_every: int = 1,
    replicas: int = 1,
) -> Choice:
    """The strategy of ``neuron``: ``strategy`` (a name, or a dict ``weight path -> name``; paths
    not in the dict get ``"auto"``), with ``"auto"`` resolved by :func:`cost`.

    ``replicas``: under data parallelism (``axis_name``), the number of devices the batch is
    split over; ``"auto"`` then chooses for the *global* batch (``n_i · replicas`` rows), as one
    device would, which also keeps the all-reduced bytes low: a Gram's triangle
    (``D(D + 1)/2``, once) instead of ``cg_iterations + 1`` parameter-sized products
    (docs/scaling.md).

    Raises:
        ValueError: a strategy forced on a neuron that cannot use it (naming the parameter).
    """
    wanted = strategy.get(neuron.weight_path, "auto") if isinstance(strategy, dict) else strategy
    layout = gram_layout(neuron)
    if isinstance(layout, str):
        if wanted == "prefer-covariance":
            return Choice("matrix-free", None, {}, layout)
        if wanted in ("gram", "covariance"):
            raise ValueError(
                f"strategy {wanted!r} for parameter {neuron.weight_path}: {layout}; use "
                "'matrix-free' or 'auto' for it"
            )
        return Choice("matrix-free", None, {}, layout)
    flops = cost(
        neuron.n_samples * replicas,
        layout.cols,
        layout.groups * layout.rows,
        layout.groups,
        layout.bias_index is not None,
        cg_iterations,
        refresh_every,
        covariance_every,
    )
    if wanted == "auto":
        name = "gram" if flops["gram"] < flops["matrix-free"] else "matrix-free"
        return Choice(name, layout if name == "gram" else None, flops, "cheapest (auto)")
    if wanted == "prefer-covariance":
        return Choice("covariance", layout, flops, "has a design (prefer-covariance)")
    return Choice(wanted, layout if wanted != "matrix-free" else None, flops, "forced")


def plan(table, strategy="auto", **kw) -> list[Choice]:
    """:func:`choose` for every neuron of a :class:`~lnb_fast.discovery.NeuronTable`; a dict
    naming a path that is no neuron's weight raises (a typo would otherwise go unnoticed)."""
    return plan_active(table, table.neurons, strategy, **kw)


def plan_active(table, active, strategy="auto", **kw) -> list[Choice | None]:
    """:func:`plan` for the neurons a (masked) step updates: ``active`` has one entry per neuron
    of ``table``, None for a neuron that is not updated (its choice is None); the dict's paths
    are checked against the whole table."""
    check_strategy(strategy)
    if isinstance(strategy, dict):
        known = {n.weight_path for n in table.neurons}
        unknown = sorted(set(strategy) - known)
        if unknown:
            raise ValueError(
                f"strategy names {unknown}, which are not neuron weights; the neurons' weights "
                f"are {sorted(known)} (as lnb_fast.describe prints them)"
            )
    return [None if n is None else choose(n, strategy, **kw) for n in active]
