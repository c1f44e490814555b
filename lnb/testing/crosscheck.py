"""The fast-vs-reference cross-check harness: ``lnb_fast`` (JAX) against ``lnb_ref`` (NumPy) on
the same random problems. ``lnb check`` (:mod:`lnb.check`) runs it on fresh draws; the tests
(``tests/test_fast_crosscheck.py``, ``test_strategies.py``, ``test_locoprop_proxprop_fast.py``)
draw the problems with hypothesis (:mod:`lnb.testing.strategies`) and assert every error against
:mod:`lnb.testing.tolerances`.

Both sides run in float64 (the caller turns JAX's x64 on: ``lnb check`` for its duration, the
tests by their ``x64`` marker) and differ only in summation order (XLA against NumPy/BLAS), so
every quantity agrees to ``κ · (a few ops) · eps``. :func:`draw_problem` draws random linear
neurons — dense (with or without bias, ``x @ w`` as in Flax and ``w @ x`` under ``vmap`` as in
Equinox) and convolutions (strides, padding, dilation, groups, bias, NCHW/OIHW and NHWC/HWIO) —
with random gradients, ridges γ, warm starts and 1–4 PCG iterations, and :func:`neuron_errors`
compares

* the **metric product** ``M v = Jᵀ J v / n_i + γ v`` (Eq. 11, §3.4),
* every **CG iterate** of Algorithm 2, line 10 (preconditioned as in §3.5, warm-started),
* **θ̂**, the approximate natural gradient the solve returns,
* **z** ``= Σ θ̂·ĝ`` (line 12), relative to ``Σ |θ̂| |ĝ|`` (the size of its terms: the sum itself
  may cancel),
* the **step norm** ``θ̂ᵀ(M + γ)θ̂ = θ̂·(ĝ − r)`` from PCG's residual ``r`` (the default ``z``),

and also the moments (lines 6–7), the preconditioner and the residual norms, which the tests
assert (``lnb check``'s report leaves them out because they only feed the CG iterates, where any
error that matters shows: a preconditioner off by a constant factor is invisible to PCG, and
harmless). :func:`compare_steps` runs whole Algorithm 2 **steps** (or any reference optimizer and
its ``lnb_fast`` twin) on a small MLP and CNN of ``lnb_ref.network`` from the same initial
parameters and minibatches, and compares the parameters after every step; whole steps compound
the rounding over the steps and the network's nonlinearity, hence the looser tolerance. Problems
whose metric is singular (γ = 0 and a rank-deficient design) are not drawn: see
:meth:`Problem.well_posed`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import lnb_fast
from lnb_fast.pcg import metric_norm as fast_metric_norm
from lnb_fast.pcg import tree_vdot
from lnb_ref.lnb import OnlineLNB
from lnb_ref.metric import metric_matvec, row_metric
from lnb_ref.network import CNN, MLP, Network
from lnb_ref.neurons import Conv2d, Dense
from lnb_ref.solvers import design_moments, metric_norm, paper_preconditioner, pcg

from . import correlated_features, rel_err

#: The largest condition number of a drawn neuron's metric (:meth:`Problem.well_posed`).
MAX_CONDITION = 1e3


class CheckError(AssertionError):
    """The two sides do not even describe the same problem (neuron not found, another ``n_i``,
    another number of iterates): no relative error can be computed."""


# --- one neuron on each side ----------------------------------------------------------------------
class Case:
    """One linear neuron as ``lnb_ref`` sees it (θ of shape ``(K, D)``: weight rows with the bias
    as last column) and as a JAX model writes it (a dict ``{"w", "b"}`` in the model's layout).

    Attributes:
        ref: the :class:`lnb_ref.neurons.LinearNeuron`.
        X_ref, X_jax: its input features on each side (same values, each side's layout).
        apply: ``apply(params, X_jax)``, the JAX model's layer.
        to_ref, from_ref: convert parameters between the two layouts.
        description: what was drawn (shown by ``repr``, e.g. in a hypothesis counterexample).
    """

    def __init__(self, ref, X_ref, X_jax, apply, to_ref, from_ref, description=""):
        self.ref, self.X_ref, self.X_jax = ref, X_ref, X_jax
        self.apply, self.to_ref, self.from_ref = apply, to_ref, from_ref
        self.description = description

    def __repr__(self) -> str:
        return self.description or super().__repr__()

    def neuron(self, params) -> lnb_fast.neuron.Neuron:
        """Discover the neuron in a scalar loss ``Σ apply(params, X) ⊙ u`` built on the JAX form."""
        u = jnp.asarray(np.random.default_rng(0).normal(size=self.apply(params, self.X_jax).shape))
        table = lnb_fast.value_and_grad(lambda p, x: jnp.sum(self.apply(p, x) * u)).table(
            params, self.X_jax
        )
        if len(table.neurons) != 1 or table.identity:
            raise CheckError(
                f"{self!r}: lnb_fast found {len(table.neurons)} neurons and "
                f"{len(table.identity)} identity-metric parameters instead of one neuron"
            )
        return table.neurons[0]


def dense_case(rng, n, d_in, d_out, bias, layout) -> Case:
    """A dense neuron ``d_in → d_out`` on ``n`` correlated samples; ``layout`` ``"x@w"`` (params
    ``{"w": (d_in, d_out)}``, like Flax / plain JAX) or ``"w@x"`` (``(d_out, d_in)`` applied to
    each sample under ``vmap``, like Equinox)."""
    ref = Dense("layer", d_in, d_out, bias=bias)
    X = correlated_features(rng, n, d_in)
    if layout == "x@w":

        def apply(p, x):
            y = x @ p["w"]
            return y + p["b"] if "b" in p else y

        def from_ref(theta):
            p = {"w": jnp.asarray(theta[:, :d_in].T)}
            return {**p, "b": jnp.asarray(theta[:, d_in])} if bias else p

        def to_ref(p):
            W = np.asarray(p["w"]).T
            return np.concatenate([W, np.asarray(p["b"])[:, None]], 1) if bias else W
    elif layout == "w@x":

        def apply(p, x):
            y = jax.vmap(lambda xi: p["w"] @ xi)(x)
            return y + p["b"] if "b" in p else y

        def from_ref(theta):
            p = {"w": jnp.asarray(theta[:, :d_in])}
            return {**p, "b": jnp.asarray(theta[:, d_in])} if bias else p

        def to_ref(p):
            W = np.asarray(p["w"])
            return np.concatenate([W, np.asarray(p["b"])[:, None]], 1) if bias else W
    else:
        raise ValueError(f"layout must be 'x@w' or 'w@x', not {layout!r}")

    description = f"dense_case(n={n}, d_in={d_in}, d_out={d_out}, bias={bias}, layout={layout!r})"
    return Case(ref, X, jnp.asarray(X), apply, to_ref, from_ref, description)


def conv_case(rng, n, c_in, c_out, hw, k, stride, padding, dilation, groups, bias, layout) -> Case:
    """A ``k × k`` convolution ``c_in → c_out`` on ``n`` random ``hw × hw`` images (with a
    per-channel mean), ``lax.conv_general_dilated`` in ``layout`` ``"NCHW"`` (OIHW kernel) or
    ``"NHWC"`` (HWIO kernel)."""
    ref = Conv2d("layer", c_in, c_out, k, stride, padding, dilation, groups, bias)
    X = rng.normal(size=(n, c_in, hw, hw)) + rng.normal(size=(1, c_in, 1, 1))
    cg = c_in // groups
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', not {layout!r}")
    specs = ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC")
    X_jax = X if layout == "NCHW" else X.transpose(0, 2, 3, 1)

    def apply(p, x):
        y = lax.conv_general_dilated(
            x,
            p["w"],
            (stride, stride),
            [(padding, padding)] * 2,
            rhs_dilation=(dilation, dilation),
            feature_group_count=groups,
            dimension_numbers=specs,
        )
        if "b" not in p:
            return y
        return y + (p["b"][None, :, None, None] if layout == "NCHW" else p["b"])

    def from_ref(theta):
        W = theta[:, : cg * k * k].reshape(c_out, cg, k, k)
        W = W if layout == "NCHW" else W.transpose(2, 3, 1, 0)
        p = {"w": jnp.asarray(W)}
        return {**p, "b": jnp.asarray(theta[:, -1])} if bias else p

    def to_ref(p):
        W = np.asarray(p["w"])
        W = (W if layout == "NCHW" else W.transpose(3, 2, 0, 1)).reshape(c_out, -1)
        return np.concatenate([W, np.asarray(p["b"])[:, None]], 1) if bias else W

    description = (
        f"conv_case(n={n}, c_in={c_in}, c_out={c_out}, hw={hw}, k={k}, stride={stride}, "
        f"padding={padding}, dilation={dilation}, groups={groups}, bias={bias}, "
        f"layout={layout!r})"
    )
    return Case(ref, X, jnp.asarray(X_jax), apply, to_ref, from_ref, description)


# --- random problems ------------------------------------------------------------------------------
class Problem(NamedTuple):
    """One neuron's solve: the neuron, the seed of its gradient ĝ / direction v / warm start
    θ̂₀, the ridge γ, the number of PCG iterations and whether PCG starts from θ̂₀."""

    case: Case
    seed: int
    ridge: float
    iterations: int
    warm: bool

    def well_posed(self) -> bool:
        """Whether the metric ``M = Jᵀ J / n_i + γ I`` is well-conditioned: every ``C_g`` has a
        condition number ``κ ≤`` :data:`MAX_CONDITION`.

        Why a bound, and why this one. Two correct implementations that sum in different orders
        produce PCG iterates that differ by rounding amplified by the solve: once PCG has
        (nearly) converged within ``k`` iterations, the next ``α p`` is ``≈ M⁻¹ r`` with ``r`` at
        rounding level, i.e. a relative change of up to ``~κ·eps``. So the per-neuron errors
        are bounded by ``c·κ·eps``. Measured: ``c ≤ 21`` over 1,000 draws, the worst a 2×2
        convolution with one output pixel per image (rank-1 design), γ = 1e-3 and 4 iterations,
        κ = 6.6e3, CG iterates 3.1e-11 apart (``lnb check --problems 200 --seed 4154644712``
        with the earlier bound 1e4). With ``κ ≤ 1e3`` the bound is ≤ 4.6e-12, 20× under the
        1e-10 tolerance. Without
        the bound, ``γ = 0`` and a nearly rank-deficient design (few output pixels, or pixels
        that see only padding) reach ``κ ~ 1e7``: an unseeded ``lnb check`` then failed once in
        ~20 runs (CG iterates 3.8e-9), though nothing was wrong; a singular design (``κ = ∞``)
        makes both sides divide rounding noise by rounding noise. Such problems (24% of
        :func:`draw_problem`'s) are drawn again."""
        ref, X = self.case.ref, self.case.X_ref
        # A weight that never meets an input (a kernel tap that only ever sees padding) has a
        # zero design column: nothing to compare, and no row of the design to pair it with.
        Phi = ref.design(X)[..., : ref.row_dim - int(ref.bias)]
        if not np.all(np.any(Phi != 0, axis=1)):
            return False
        C = row_metric(ref, X, self.ridge)
        return all(np.linalg.cond(C_g) <= MAX_CONDITION for C_g in C)


def draw_problem(
    integer: Callable[[int, int], int], choice: Callable[[Sequence[Any]], Any]
) -> Problem:
    """Draw a random :class:`Problem`: half dense neurons, half convolutions, random options
    (callers keep only the :meth:`~Problem.well_posed` ones).

    The ranges live here once; the source of randomness is passed in, so the tests draw with
    hypothesis (``integer = lambda lo, hi: draw(st.integers(lo, hi))``, ``choice = lambda xs:
    draw(st.sampled_from(xs))``, which shrinks) and :func:`run_check` with ``numpy.random``.

    Args:
        integer: ``integer(lo, hi)``, an int in ``[lo, hi]`` (both included).
        choice: ``choice(options)``, one of a sequence.
    """
    if choice(["dense", "conv"]) == "dense":
        case = dense_case(
            np.random.default_rng(integer(0, 2**32 - 1)),
            n=integer(8, 40),
            d_in=integer(1, 12),
            d_out=integer(1, 6),
            bias=choice([False, True]),
            layout=choice(["x@w", "w@x"]),
        )
    else:
        groups = choice([1, 2])
        c_in = groups * integer(1, 2)
        c_out = groups * integer(1, 3)
        k = integer(1, 3)
        dilation = integer(1, 2)
        padding = integer(0, 2)
        hw = integer(dilation * (k - 1) + 1, 7)
        case = conv_case(
            np.random.default_rng(integer(0, 2**32 - 1)),
            n=integer(1, 3),
            c_in=c_in,
            c_out=c_out,
            hw=hw,
            k=k,
            stride=integer(1, 2),
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=choice([False, True]),
            layout=choice(["NCHW", "NHWC"]),
        )
    return Problem(
        case,
        seed=integer(0, 2**16),
        ridge=choice([0.0, 1e-3, 0.5]),
        iterations=integer(1, 4),
        warm=choice([False, True]),
    )


def numpy_draws(rng: np.random.Generator):
    """``(integer, choice)`` for :func:`draw_problem` from a NumPy generator."""

    def integer(lo: int, hi: int) -> int:
        return int(rng.integers(lo, hi, endpoint=True))

    def choice(options: Sequence[Any]) -> Any:
        return options[int(rng.integers(len(options)))]

    return integer, choice


# --- the errors of one neuron's solve -------------------------------------------------------------
def neuron_errors(
    case: Case, seed: int, ridge: float, iterations: int, warm: bool
) -> dict[str, float]:
    """Relative errors, fast against reference, of every quantity of one neuron's solve.

    With ĝ, v, θ̂₀ drawn from ``seed`` in θ's shape:

    * ``"metric product"``: ``M v`` (Eq. 11 with ridge γ);
    * ``"moments"``: the mean and mean square of each design column (Alg. 2, lines 6–7),
      broadcast over θ's rows (the worse of the two);
    * ``"preconditioner"``: ``P v`` for the paper's preconditioner (§3.5) built from them;
    * ``"CG iterates"``: the worst over every PCG iterate θ₁ … θ_k (line 10, from θ̂₀ if
      ``warm``, else from 0), each relative to the reference's;
    * ``"residual norms"``: ``max_k |‖r_k‖ − ‖r_k‖_ref| / ‖r₀‖_ref`` (a converged residual is
      rounding noise, so it is compared against the initial one);
    * ``"theta_hat"``: θ̂ = θ_k;
    * ``"z"``: ``|θ̂·ĝ − (θ̂·ĝ)_ref| / Σ|θ̂_ref||ĝ|`` (the sum may cancel; its terms do not);
    * ``"step norm"``: ``θ̂ᵀ(M + γ)θ̂`` from each side's PCG residual (a positive quadratic form,
      relative to the reference's).

    Raises:
        CheckError: if the two sides do not describe the same neuron (see :class:`CheckError`).
    """
    rng = np.random.default_rng(seed)
    shape = case.ref.theta_shape
    g, v, x0 = (rng.normal(size=shape) for _ in range(3))
    neuron = case.neuron(case.from_ref(g))
    if neuron.n_samples != case.ref.n_samples(case.X_ref):
        raise CheckError(
            f"{case!r}: n_i is {neuron.n_samples} in lnb_fast, "
            f"{case.ref.n_samples(case.X_ref)} in lnb_ref"
        )
    G = case.from_ref

    def to_ref(leaves, like=g):
        return case.to_ref(dict(zip(G(like), leaves, strict=True)))

    def fast(X, g, v, x0):
        """The whole fast side, compiled once (one XLA compilation instead of one per op)."""
        Mv = neuron.metric_matvec(X, v, ridge)
        mean, second = neuron.moments(X)
        P = neuron.preconditioner(mean, second, ridge)
        result = lnb_fast.pcg(
            lambda u: neuron.metric_matvec(X, u, ridge),
            g,
            iterations,
            precondition=P,
            x0=x0 if warm else None,
        )
        norm = fast_metric_norm(result, g)
        return Mv, mean, second, P(v), result, tree_vdot(result.x, g), norm

    leaves = (tuple(G(a).values()) for a in (g, v, x0))
    Mv, mean, second, Pv, result, z, norm = jax.jit(fast)(case.X_jax, *leaves)

    errors = {}
    # Eq. 11: the metric product.
    errors["metric product"] = rel_err(to_ref(Mv), metric_matvec(case.ref, case.X_ref, v, ridge))

    # Alg. 2 lines 6-7: the design-column moments, broadcast over each row of θ.
    mu_ref, chi_ref = design_moments(case.ref, case.X_ref)
    rows = np.arange(shape[0]) // case.ref.rows_per_group
    zeros = {k: jnp.zeros_like(a) for k, a in G(v).items()}
    width = mu_ref.shape[1]
    errors["moments"] = max(
        rel_err(case.to_ref({**zeros, "w": ours})[:, :width], ref[rows])
        for ours, ref in ((mean, mu_ref), (second, chi_ref))
    )

    # Lines 8-10: preconditioner, every PCG iterate and residual, θ̂; then z = θ̂·g.
    P_ref = paper_preconditioner(case.ref, mu_ref, chi_ref, ridge)
    errors["preconditioner"] = rel_err(to_ref(Pv), P_ref(v))
    ref = pcg(
        lambda u: metric_matvec(case.ref, case.X_ref, u, ridge),
        g,
        iterations,
        precondition=P_ref,
        x0=x0 if warm else None,
    )
    if not len(result.iterates) == len(ref.iterates) == iterations:
        raise CheckError(
            f"{case!r}: {len(result.iterates)} iterates in lnb_fast, {len(ref.iterates)} in "
            f"lnb_ref, {iterations} asked for"
        )
    errors["CG iterates"] = max(
        rel_err(to_ref(ours), theirs)
        for ours, theirs in zip(result.iterates, ref.iterates, strict=True)
    )
    norms, norms_ref = np.asarray(result.residual_norms, float), np.asarray(ref.residual_norms)
    errors["residual norms"] = float(
        np.max(np.abs(norms - norms_ref)) / max(float(norms_ref[0]), 1e-300)
    )
    errors["theta_hat"] = rel_err(to_ref(result.x), ref.x)
    scale = float(np.vdot(np.abs(ref.x), np.abs(g)))
    errors["z"] = abs(float(z) - float(np.vdot(ref.x, g))) / max(scale, 1e-300)
    norm_ref = metric_norm(ref, g)
    errors["step norm"] = abs(float(norm) - norm_ref) / max(abs(norm_ref), 1e-300)
    return errors


# --- whole steps on the reference's networks ------------------------------------------------------
def mlp_loss(sizes: Sequence[int]):
    """The JAX loss of :class:`lnb_ref.network.MLP` with ``tanh`` hidden layers: params a list of
    ``{"w": (d_in, d_out), "b": (d_out,)}``, softmax cross-entropy on integer labels."""

    def loss(p, batch):
        x, y = batch
        h = x
        for i in range(len(sizes) - 1):
            h = h @ p[i]["w"] + p[i]["b"]
            if i < len(sizes) - 2:
                h = jnp.tanh(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    return loss


def cnn_loss(net: CNN):
    """The JAX loss of a :class:`lnb_ref.network.CNN` (ReLU convolutions in NCHW/OIHW, then a
    dense head), softmax cross-entropy on integer labels."""
    convs = net.neurons[:-1]

    def loss(p, batch):
        x, y = batch
        h = x
        for i, conv in enumerate(convs):
            h = lax.conv_general_dilated(
                h,
                p[i]["w"],
                (conv.stride,) * 2,
                [(conv.padding, conv.padding)] * 2,
                dimension_numbers=("NCHW", "OIHW", "NCHW"),
            )
            h = jax.nn.relu(h + p[i]["b"][None, :, None, None])
        h = h.reshape(h.shape[0], -1) @ p[-1]["w"] + p[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    return loss


def ref_to_jax(net: Network, thetas: Sequence[np.ndarray]) -> list[dict[str, jax.Array]]:
    """The reference's θ (one ``(K, D)`` array per neuron, bias last) as the params of
    :func:`mlp_loss` / :func:`cnn_loss`."""
    out = []
    for neuron, theta in zip(net.neurons, thetas, strict=True):
        if isinstance(neuron, Conv2d):
            out.append({"w": jnp.asarray(neuron.filters(theta)), "b": jnp.asarray(theta[:, -1])})
        else:
            out.append({"w": jnp.asarray(theta[:, :-1].T), "b": jnp.asarray(theta[:, -1])})
    return out


class StepErrors(NamedTuple):
    """Worst relative errors over whole Algorithm 2 steps: ``params`` of the parameters after
    each step (Frobenius, per array), ``loss`` of the minibatch loss before each step; and
    ``decrease``, the change of the reference run's loss on all the data (< 0: it trains)."""

    params: float
    loss: float
    decrease: float = 0.0


def compare_steps(
    net: Network,
    loss: Callable,
    X: np.ndarray,
    Y: np.ndarray,
    ref_opt,
    make_fast: Callable,
    steps: int,
    batch: int,
    rng: np.random.Generator | None = None,
) -> StepErrors:
    """``steps`` steps of a reference optimizer (``ref_opt``, :mod:`lnb_ref`'s ``init``/``step``
    interface) and of its ``lnb_fast`` twin (``make_fast(table)``, an optax transformation given
    the network's :class:`lnb_fast.NeuronTable`, jitted) from the same initial parameters and
    the same minibatches, all drawn from ``rng`` (default: seed 0)."""
    rng = np.random.default_rng(0) if rng is None else rng
    thetas = net.init(rng)
    params = ref_to_jax(net, thetas)
    vgf = lnb_fast.value_and_grad(loss)
    opt = make_fast(vgf.table(params, (jnp.asarray(X[:batch]), jnp.asarray(Y[:batch]))))
    state, ref_state = opt.init(params), ref_opt.init(thetas)
    start = net.loss(thetas, X, Y)

    @jax.jit
    def step(params, state, x, y):
        value, grads, feats = vgf(params, (x, y))
        updates, state = opt.update(grads, state, params, features=feats)
        return optax.apply_updates(params, updates), state, value

    worst_params = worst_loss = 0.0
    for _ in range(steps):
        idx = rng.choice(len(X), size=batch, replace=False)
        loss_ref, grads, feats = net.loss_grads_features(thetas, X[idx], Y[idx])
        thetas, ref_state, _ = ref_opt.step(thetas, grads, feats, ref_state)
        params, state, value = step(params, state, jnp.asarray(X[idx]), jnp.asarray(Y[idx]))
        worst_loss = max(worst_loss, abs(float(value) - loss_ref) / max(abs(loss_ref), 1e-300))
        for a, b in zip(ref_to_jax(net, thetas), params, strict=True):
            for key in ("w", "b"):
                worst_params = max(worst_params, rel_err(b[key], a[key]))
    return StepErrors(worst_params, worst_loss, net.loss(thetas, X, Y) - start)


def step_errors(
    net: Network,
    loss: Callable,
    X: np.ndarray,
    Y: np.ndarray,
    steps: int,
    batch: int,
    rng: np.random.Generator | None = None,
    **kw,
) -> StepErrors:
    """Algorithm 2 on both sides (``lnb_ref.OnlineLNB`` and a jitted ``lnb_fast.lnb`` step),
    :func:`compare_steps`. ``kw`` are :class:`~lnb_ref.lnb.OnlineLNB`'s options (``epsilon``
    is passed to :func:`lnb_fast.lnb` as ``learning_rate``)."""
    # Every option explicit on both sides: lnb_fast's defaults for γ and b1 differ from the
    # reference's (docs/fast.md), so the reference's defaults are passed to both.
    kw = {"ridge": 0.0, "z0": 0.0, "b1": 0.9, "b2": 0.99, "weight_decay": 0.0, **kw}
    fast_kw = {"learning_rate" if k == "epsilon" else k: v for k, v in kw.items()}
    return compare_steps(
        net,
        loss,
        X,
        Y,
        OnlineLNB(net.neurons, **kw),
        lambda table: lnb_fast.lnb(**fast_kw),
        steps,
        batch,
        rng,
    )


def mlp_step_errors(
    data_rng: np.random.Generator, rng: np.random.Generator | None = None, **options
) -> StepErrors:
    """12 steps on a 12-16-10-4 ``tanh`` MLP with weight decay ρ = 0.1, ridge γ = 1e-3 and
    z₀ = 1e-4 (ε = 0.05, batches of 64 out of 300 correlated samples from ``data_rng``)."""
    X = correlated_features(data_rng, 300, 12)
    Y = data_rng.integers(0, 4, size=300)
    net = MLP([12, 16, 10, 4], activation="tanh")
    return step_errors(
        net,
        mlp_loss(net.sizes),
        X,
        Y,
        steps=12,
        batch=64,
        rng=rng,
        epsilon=0.05,
        weight_decay=0.1,
        ridge=1e-3,
        z0=1e-4,
        **options,
    )


def cnn_step_errors(
    data_rng: np.random.Generator, rng: np.random.Generator | None = None, **options
) -> StepErrors:
    """10 steps on a CNN (2×8×8 inputs, 3 and 4 channels of 3×3 kernels with strides 1 and 2
    and padding 1, dense head to 3 classes), ε = 0.02, ridge γ = 1e-4, batches of 32 out of
    120 random images from ``data_rng``."""
    X = data_rng.normal(size=(120, 2, 8, 8)) + 0.5
    Y = data_rng.integers(0, 3, size=120)
    net = CNN((2, 8, 8), channels=(3, 4), kernel_size=3, strides=(1, 2), padding=1, n_classes=3)
    return step_errors(
        net, cnn_loss(net), X, Y, steps=10, batch=32, rng=rng, epsilon=0.02, ridge=1e-4, **options
    )
