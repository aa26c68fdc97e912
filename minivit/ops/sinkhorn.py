"""Optimal transport: Sinkhorn, IPOT, the OT distance and the cosine cost.

Derivations: docs/ops/sinkhorn.md, docs/ops/ipot.md, docs/ops/ot_distance.md,
docs/ops/cosine_cost.md.

Shape legend: ``...`` any leading (batch) dims, ``n`` rows of the cost (the ``a`` side, text
tokens in ViLT), ``m`` columns (the ``b`` side, image patches), ``d`` feature size, ``T`` the
number of Sinkhorn iterations actually run.

The algorithms are stated in the log domain: the plan is ``exp(logK + f[:, None] + g[None, :])``
with ``logK = -cost / epsilon`` and the log-scalings ``f``, ``g`` updated by log-sum-exp. A zero
marginal entry gives ``log a_i = -inf``, so its row (or column) is ``exp(-inf) = 0`` exactly; the
log-sum-exp reductions never see a slice made only of ``-inf`` (the marginals are checked to keep
some mass), so no NaN can appear. That is the path CuPy takes. On NumPy, where ``exp`` is dear,
two cheaper forms compute the same iterates (see :func:`_rescales`):

- Sinkhorn keeps the kernel ``exp(logK + f + g)`` itself and rescales it as the potentials move
  (:class:`_ScaledKernel`), re-anchoring it from the potentials every ``_REANCHOR_EVERY``
  iterations;
- IPOT runs in ViLT's scaling domain (:func:`_ipot_scaling`) and falls back to the log domain
  (:func:`_ipot_log`) when its kernel under- or overflows.

Both are tested against the log-domain path and against POT (tests/test_sinkhorn.py).
"""

from __future__ import annotations

import math
import warnings

from ._common import (
    Cache,
    array_module,
    check_count,
    check_dout,
    check_float,
    check_real,
    check_same_dtype,
)

__all__ = [
    "SinkhornConvergenceWarning",
    "sinkhorn_forward",
    "sinkhorn_backward",
    "sinkhorn_implicit_backward",
    "sinkhorn_value_forward",
    "sinkhorn_value_backward",
    "ipot_forward",
    "ipot_backward",
    "ot_distance_forward",
    "ot_distance_backward",
    "cosine_cost_forward",
    "cosine_cost_backward",
]

# Marginal totals may differ by this much (relative) before we refuse them: finite differences
# perturb them by ~1e-6, which must still be accepted.
_MASS_RTOL = 1e-3


class SinkhornConvergenceWarning(RuntimeWarning):
    """The requested tolerance was not reached within ``n_iters`` iterations."""


# --------------------------------------------------------------------------------------------
# Input checks shared by Sinkhorn, IPOT and the OT distance
# --------------------------------------------------------------------------------------------


def _check_positive(name, value):
    """A positive finite number (Python or NumPy, not bool) -> a Python float. Another kind of
    value raises ``TypeError`` (:func:`check_real`), a number out of range ``ValueError``."""
    v = check_real(name, value)
    if not v > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _check_marginal(name, p, cost, axis_size, xp):
    """``p`` (..., k) must broadcast to cost's batch dims, be non-negative and keep some mass."""
    check_float(name, p, ndim_min=1)
    batch = tuple(cost.shape[:-2])
    if p.shape[-1] != axis_size:
        raise ValueError(
            f"{name} must have shape (..., {axis_size}) to match cost of shape "
            f"{tuple(cost.shape)}, got {tuple(p.shape)}"
        )
    if _broadcast_shape(tuple(p.shape[:-1]), batch) != batch:
        raise ValueError(
            f"{name} of shape {tuple(p.shape)} does not broadcast to the batch dims {batch} of "
            f"cost of shape {tuple(cost.shape)}"
        )
    if not bool(((p >= 0) & (p < xp.inf)).all()):  # False for NaN too; one host sync
        if not bool(xp.isfinite(p).all()):
            raise ValueError(f"{name} must be finite, got NaN or infinite entries")
        raise ValueError(f"{name} must be non-negative, got a minimum of {float(p.min())}")
    return p


def _prepare_marginals(cost, a, b):
    """Validate (cost, a, b); return xp and the host-free pieces the solvers need.

    Returns ``(xp, a_b, b_b, la, lb)``: the marginals broadcast to the batch (or python floats
    ``1/n``, ``1/m`` when None) and their logs (``-inf`` where the marginal is 0).
    """
    xp = array_module(cost, a, b)  # TypeError naming both backends if mixed
    check_float("cost", cost, ndim_min=2)
    check_same_dtype(cost=cost, a=a, b=b)
    n, m = cost.shape[-2], cost.shape[-1]
    if n == 0 or m == 0:
        raise ValueError(f"cost must have non-empty last two axes, got shape {tuple(cost.shape)}")
    batch = tuple(cost.shape[:-2])
    if a is not None:
        _check_marginal("a", a, cost, n, xp)
    if b is not None:
        _check_marginal("b", b, cost, m, xp)
    sa = a.sum(-1) if a is not None else xp.ones((), dtype=cost.dtype)  # (...)
    sb = b.sum(-1) if b is not None else xp.ones((), dtype=cost.dtype)  # (...)
    if bool((sa <= 0).any()):
        raise ValueError("a must have a positive total mass in every problem, got a zero total")
    if bool((sb <= 0).any()):
        raise ValueError("b must have a positive total mass in every problem, got a zero total")
    gap = xp.abs(sa - sb) / xp.maximum(sa, sb)
    if bool((gap > _MASS_RTOL).any()):
        raise ValueError(
            "a and b must have equal total mass (within 1e-3 relative); the largest relative "
            f"difference is {float(gap.max()):.3g}"
        )

    def logs(p, k):
        if p is None:
            return 1.0 / k, -math.log(k)
        p_b = xp.broadcast_to(p, batch + (k,))
        pos = p_b > 0
        lp = xp.where(pos, xp.log(xp.where(pos, p_b, 1)), -xp.inf).astype(cost.dtype)
        return p_b, lp

    a_b, la = logs(a, n)
    b_b, lb = logs(b, m)
    return xp, a_b, b_b, la, lb


def _broadcast_shape(s1, s2):
    """NumPy's broadcasting rule on two shapes; None when they do not broadcast."""
    out = []
    for i in range(1, max(len(s1), len(s2)) + 1):
        d1 = s1[-i] if i <= len(s1) else 1
        d2 = s2[-i] if i <= len(s2) else 1
        if d1 != d2 and 1 not in (d1, d2):
            return None
        out.append(d2 if d1 == 1 else d1)
    return tuple(reversed(out))


def _unbroadcast(g, shape, xp):
    """Sum ``g`` over the dims that broadcasting added to reach it from ``shape``."""
    if g is None or tuple(g.shape) == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _lse_(buf, axis, xp):
    """log-sum-exp of ``buf`` along ``axis`` (-1 or -2), destroying ``buf`` (it is scratch).

    Subtracting the max keeps exp in range for any epsilon; done in place to avoid temporaries.
    """
    mx = buf.max(axis=axis, keepdims=True)  # (..., 1, m) or (..., n, 1)
    buf -= mx
    xp.exp(buf, out=buf)
    s = buf.sum(axis=axis)  # (..., m) or (..., n)
    xp.log(s, out=s)
    s += mx.squeeze(axis)
    return s


# --------------------------------------------------------------------------------------------
# Sinkhorn
# --------------------------------------------------------------------------------------------

# Tests set this to False to run the max-stabilized path (the one CuPy takes) on NumPy.
_FAST_CPU_PATH = True
# How often (in iterations) the CPU path rebuilds its rescaled kernel from the potentials.
_REANCHOR_EVERY = 16


def _rescales(xp) -> bool:
    """Whether the CPU's cheaper paths run: Sinkhorn's rescaled kernel and IPOT's scaling
    domain. On NumPy (where a host check is free and exp is dear: float64 everywhere, float32
    without AVX-512), unless a test asks for the stabilized log-domain path."""
    return _FAST_CPU_PATH and xp.__name__ == "numpy"


def _exp_potentials(logK, r, c, out):
    """out <- exp(logK + r[..., :, None] + c[..., None, :]), the plan's form for any potentials."""
    xp = array_module(logK)
    xp.add(logK, r[..., :, None], out=out)
    xp.add(out, c[..., None, :], out=out)
    return xp.exp(out, out=out)


class _ScaledKernel:
    """E = exp(logK + r[..., :, None] + c[..., None, :]) for potentials r (rows) and c (columns)
    that move a little at a time, kept up to date by rescaling (docs/ops/sinkhorn.md).

    Moving r to r' multiplies E by exp(r' - r) along the rows: an exp over n entries and one
    pass over E, instead of an exp over all n x m (5-10 ns an entry in float64 where NumPy has
    no vectorised exp). A product cannot bring back an entry that underflowed to 0, so E is
    rebuilt from logK whenever r and c have risen, above their lowest values since the last
    rebuild, by more than ``revive`` in all (an entry is at most that much above its lowest
    value then, so one flushed to 0 is still far below anything that counts), and after
    ``every`` moves, since each adds a rounding. With ``rescale=False`` (CuPy, where exp costs
    no more than a multiply and the rise check would be a host sync) every move rebuilds.
    """

    def __init__(self, logK, xp, rescale=True, every=2 * _REANCHOR_EVERY):
        self.xp, self.logK, self.rescale, self.every = xp, logK, rescale, every
        self.E = xp.empty_like(logK)  # (..., n, m)
        # exp leaves the normal range below about -708 (float64) / -87 (float32) and is 0 below
        # -745 / -104; an entry that counts in a sum of marginals of about unit mass is above
        # about -40 / -20, so a smaller rise cannot revive one
        self.revive = 600.0 if logK.dtype.itemsize == 8 else 60.0
        self.r = self.c = None

    def rebuild(self, r=None, c=None):
        """E from logK and the potentials (r, c replace the current ones when given)."""
        self.r = self.r if r is None else r
        self.c = self.c if c is None else c
        _exp_potentials(self.logK, self.r, self.c, self.E)
        self.r_low, self.c_low, self.moves = self.r, self.c, 0
        self.r_rise = self.c_rise = 0.0  # how far each has risen above its low since then
        return self.E

    def move_rows(self, r):
        if not self.rescale:
            return self.rebuild(r=r)
        self.E *= self.xp.exp(r - self.r)[..., :, None]
        self.r, self.r_low = r, self.xp.minimum(self.r_low, r)
        self.r_rise = float((r - self.r_low).max())
        return self._moved()

    def move_cols(self, c):
        if not self.rescale:
            return self.rebuild(c=c)
        self.E *= self.xp.exp(c - self.c)[..., None, :]
        self.c, self.c_low = c, self.xp.minimum(self.c_low, c)
        self.c_rise = float((c - self.c_low).max())
        return self._moved()

    def _moved(self):
        self.moves += 1
        rise = self.r_rise + self.c_rise
        if self.moves >= self.every or not rise <= self.revive:  # NaN (from -inf) rebuilds too
            self.rebuild()
        return self.E


class _FastState:
    """The CPU update: read each half-step's log-sum-exp off the rescaled plan kernel
    E = exp(logK + f~ + g~) (a :class:`_ScaledKernel`).

    sum_i E_ij over real rows = exp(g~_j) exp(LSE_i(logK_ij + f_i)), so the new potential is
    g~ - log(sum), and the update moves E's columns to it: a masked sum (a matrix-vector
    product) and a rescaling, two passes over (n, m) per half-iteration instead of five (add,
    max, subtract, exp, sum). f~ and g~ are the potentials with the -inf of padding replaced by
    the finite part (beta, alpha), so E stays finite; the masks keep padding out of the sums.
    E's entries are plan values, at most ~1, so they cannot overflow in a sane state, and a sum
    that under- or overflows (tiny epsilon, first iterations) is detected and that half-step is
    redone with the stabilized log-sum-exp (``None`` is returned), after which E is rebuilt.
    """

    def __init__(self, logK, a_b, b_b, la, lb, xp):
        self.xp = xp
        n, m = logK.shape[-2], logK.shape[-1]
        dtype = logK.dtype
        self.kernel = _ScaledKernel(logK, xp)
        # masks as vectors for the matrix-vector sums (1 on real rows/columns, 0 on padding)
        self.ra = xp.ones(n, dtype) if isinstance(a_b, float) else (a_b > 0).astype(dtype)
        self.cb = xp.ones(m, dtype) if isinstance(b_b, float) else (b_b > 0).astype(dtype)
        self.la_f = la if isinstance(la, float) else xp.where(a_b > 0, la, 0).astype(dtype)
        self.lb_f = lb if isinstance(lb, float) else xp.where(b_b > 0, lb, 0).astype(dtype)
        self.tiny, self.huge = (1e-250, 1e250) if dtype.itemsize == 8 else (1e-20, 1e20)
        self.f_t = xp.zeros(n, dtype)  # (..., n) f~, the finite row potential inside E
        self.g_t = None  # (..., m) g~; E is valid once both are set

    def _ok(self, s):
        # also False for NaN (inf * 0 from an overflowed padding entry)
        return bool(self.tiny < s.min()) and bool(s.max() < self.huge)

    def column_step(self):
        """alpha = -LSE_i(logK + f) read off E, or None if out of range."""
        if self.g_t is None:
            return None
        s = (self.ra[..., None, :] @ self.kernel.E)[..., 0, :]  # (..., m) column sums
        if not self._ok(s):
            return None
        alpha = self.g_t - self.xp.log(s)  # (..., m)
        self.g_t = alpha + self.lb_f
        self.kernel.move_cols(self.g_t)
        return alpha

    def row_step(self):
        """beta = -LSE_j(logK + g) read off E (which holds the new g), or None."""
        r = (self.kernel.E @ self.cb[..., :, None])[..., 0]  # (..., n) row sums of the plan
        if not self._ok(r):
            return None
        beta = self.f_t - self.xp.log(r)  # (..., n)
        self.f_t = beta + self.la_f
        self.kernel.move_rows(self.f_t)
        return beta

    def reset(self, alpha=None, beta=None):
        """Take the potentials of a stabilized half-step and rebuild E from them."""
        if alpha is not None:
            self.g_t = alpha + self.lb_f  # (..., m)
        if beta is not None:
            self.f_t = beta + self.la_f  # (..., n)
        self.kernel.rebuild(self.f_t, self.g_t)


def sinkhorn_forward(cost, a=None, b=None, *, epsilon=0.05, n_iters=100, tol=None, check_every=10):
    """Entropic optimal transport by log-domain Sinkhorn iterations (docs/ops/sinkhorn.md).

    Args:
        cost: (..., n, m) float32/float64.
        a: (..., n) non-negative row marginals (or None: uniform 1/n); leading dims broadcast.
        b: (..., m) non-negative column marginals (or None: uniform 1/m). Totals of a and b must
            agree within 1e-3 relative. Zero entries mark padding: exactly zero rows/columns.
        epsilon: entropic regularization (> 0), in the units of the cost.
        n_iters: maximum number of iterations; one iteration updates g (columns) then f (rows),
            the order of POT's ``sinkhorn_log``, so rows match ``a`` exactly after each one.
        tol: if given, stop once the L1 violation of the column marginals, the largest over the
            batch, drops below ``tol``. Measured every ``check_every`` iterations only (one host
            sync each time), and a :class:`SinkhornConvergenceWarning` is raised if never met.

    Returns ``plan (..., n, m), cache``. The cache keeps ``logK = -cost/epsilon`` and the
    per-iteration log-scalings minus the log marginals (``alphas`` (T, ..., m), ``betas``
    (T, ..., n), always finite), never per-iteration plans.
    """
    xp, a_b, b_b, la, lb = _prepare_marginals(cost, a, b)
    epsilon = _check_positive("epsilon", epsilon)
    n_iters = check_count("n_iters", n_iters)  # Python ints (NumPy integers accepted)
    check_every = check_count("check_every", check_every)
    if tol is not None:
        tol = _check_positive("tol", tol)
    n, m = cost.shape[-2], cost.shape[-1]
    batch = tuple(cost.shape[:-2])
    dtype = cost.dtype

    logK = cost * (-1.0 / epsilon)  # (..., n, m); python float keeps the dtype
    if not isinstance(a_b, float) and not isinstance(b_b, float):
        # The CPU path's kernel and the backward's matrices carry finite potentials on padding.
        # Where a padded row meets a padded column nothing bounds logK + beta + alpha (it
        # overflowed in float32: NaN gradients), and those entries only ever meet a zero
        # marginal or a zero adjoint, so they are -inf here: exp gives 0, as it should.
        pad = (a_b == 0)[..., :, None] & (b_b == 0)[..., None, :]
        xp.copyto(logK, -xp.inf, where=pad)  # in place: logK is this function's own array
    buf = xp.empty_like(logK)  # (..., n, m) scratch for every log-sum-exp
    # f starts at 0 on real rows and -inf on padding rows, so a padded problem follows exactly
    # the iterates of the trimmed one (POT starts at 0 everywhere; same thing without padding).
    if a is None:
        f = xp.zeros(batch + (n,), dtype=dtype)  # (..., n)
    else:
        f = xp.where(a_b > 0, 0, -xp.inf).astype(dtype)  # (..., n)
    f0 = f
    alphas = xp.empty((n_iters,) + batch + (m,), dtype=dtype)  # alpha_t = g_t - log b
    betas = xp.empty((n_iters,) + batch + (n,), dtype=dtype)  # beta_t = f_t - log a

    # On the CPU, a cheaper update that needs a host check per half-iteration (free there);
    # on a GPU that check would be a sync per iteration, so CuPy always takes the max-stabilized
    # log-sum-exp (docs/ops/sinkhorn.md, "Fewer passes on the CPU").
    fast = _rescales(xp)
    if fast:
        state = _FastState(logK, a_b, b_b, la, lb, xp)
    n_run = n_iters
    converged = False
    for t in range(n_iters):
        alpha = state.column_step() if fast else None
        if alpha is None:
            xp.add(logK, f[..., :, None], out=buf)
            alpha = _lse_(buf, -2, xp)  # (..., m)
            xp.negative(alpha, out=alpha)
            if fast:
                state.reset(alpha=alpha)
        if tol is not None and t > 0 and t % check_every == 0:
            # Column sums of the plan after iteration t, for free: b * exp(alpha_old - alpha).
            col = xp.exp(alphas[t - 1] - alpha)  # (..., m)
            col -= 1
            col *= b_b
            err = float(xp.abs(col).sum(-1).max())
            if err < tol:
                n_run, converged = t, True
                break
        alphas[t] = alpha
        g = alpha + lb  # (..., m)
        beta = state.row_step() if fast else None
        if beta is None:
            xp.add(logK, g[..., None, :], out=buf)
            beta = _lse_(buf, -1, xp)  # (..., n)
            xp.negative(beta, out=beta)
            if fast:
                state.reset(beta=beta)
        betas[t] = beta
        f = beta + la  # (..., n)

    alphas, betas = alphas[:n_run], betas[:n_run]
    g = alphas[-1] + lb
    f = betas[-1] + la
    plan = _exp_potentials(logK, f, g, buf)  # (..., n, m)
    if tol is not None and not converged:
        err = float(xp.abs(plan.sum(-2) - b_b).sum(-1).max())
        if not err < tol:
            warnings.warn(
                f"Sinkhorn did not reach tol={tol:g} in {n_iters} iterations (column marginal "
                f"L1 error {err:.3g}); increase n_iters or epsilon",
                SinkhornConvergenceWarning,
                stacklevel=2,
            )
    cache = Cache(
        logK=logK,
        plan=plan,
        alphas=alphas,
        betas=betas,
        f0=f0,
        a=a_b,
        b=b_b,
        la=la,
        lb=lb,
        a_shape=None if a is None else tuple(a.shape),
        b_shape=None if b is None else tuple(b.shape),
        epsilon=epsilon,
        n_run=n_run,
    )
    return plan, cache


def sinkhorn_backward(dplan, cache):
    """Reverse mode through the unrolled iterations: returns (dcost, da, db).

    The exact derivative of the computation that ``sinkhorn_forward`` ran (``cache.n_run``
    iterations). Each step's softmax weights are recomputed from ``logK`` and the stored
    potentials (docs/ops/sinkhorn.md, "The unrolled backward"). Gradients with respect to the
    marginals are computed divided by the marginal already, so zero entries give finite values
    instead of 0/0: at a zero ``b_j``, the one-sided derivative; at a zero ``a_i``, the
    derivative with the start ``f_0,i = -inf`` held fixed, which a forward difference matches
    only near convergence (the start jumps to 0 as ``a_i`` leaves 0; the docs' "Dividing by the
    marginals without dividing"). ``dplan`` must have the plan's shape, dtype and backend
    (``_common.check_dout``).
    """
    plan = cache.plan
    check_dout("sinkhorn_backward", dplan, plan.shape, plan.dtype, type(plan), "dplan")
    xp = array_module(dplan)
    logK, alphas, betas = cache.logK, cache.alphas, cache.betas
    A, B = cache.a, cache.b  # (..., n) / (..., m) arrays, or python floats 1/n, 1/m
    T = cache.n_run
    col_b = B[..., None, :] if not isinstance(B, float) else B  # (..., 1, m)
    row_a = A[..., :, None] if not isinstance(A, float) else A  # (..., n, 1)
    # Padding (zero marginal entries): there exp(logK + potentials) has no upper bound and can
    # overflow for a small epsilon, and inf times the zero marginal is NaN. Each product that
    # the marginal zeroes is set to exactly 0 on the padded rows or columns instead.
    pad_cols = _zeros_of(col_b, xp)  # (..., 1, m) bool, or None without padding
    pad_rows = _zeros_of(row_a, xp)  # (..., n, 1)

    buf = xp.empty_like(logK)  # (..., n, m)
    # Every matrix below is exp(logK + row potential + column potential) for stored potentials
    # one step apart, so one kernel is walked back: by rescaling on NumPy (as in the forward),
    # rebuilt at every step on CuPy.
    kernel = _ScaledKernel(logK, xp, rescale=_rescales(xp))
    # Plan: P = a_i b_j Q_ij with Q = exp(logK + beta_T + alpha_T), which is also S_T / b.
    Q = kernel.rebuild(betas[T - 1], alphas[T - 1])
    xp.multiply(Q, dplan, out=buf)  # dP * Q
    dPQ_b = _zero_where(buf * col_b, pad_cols)  # dP * Q b
    f_hat = dPQ_b.sum(-1)  # (..., n)  dL/df_T divided by a
    g_hat = _zero_where(buf * row_a, pad_rows).sum(-2)  # (..., m)  dL/dg_T divided by b
    # dL/dlogK through the plan's own exponent: dP * P with P = a b Q, the Q just used, not the
    # forward's plan, the same matrix rounded another way (exp(logK + f + g)). The gradient is
    # a small difference of such terms, where mixing two roundings of P showed (float32 at a
    # small epsilon; _weight_sums says how).
    dlogK = _zero_where(xp.multiply(dPQ_b, row_a, out=dPQ_b), pad_rows)  # (..., n, m)
    da = f_hat.copy()  # accumulates dL/d(log a) / a
    db = xp.zeros_like(g_hat)  # accumulates dL/d(log b) / b

    for t in range(T - 1, -1, -1):
        # f_t = log a + beta_t,  beta_t = -LSE_j(logK + g_t):  d beta_i / d g_j = -S_ij,
        # S = b_j exp(logK + alpha_t + beta_t) (rows of S sum to 1).
        S_b = kernel.E if t == T - 1 else kernel.move_cols(alphas[t])  # S / b
        beta_bar = f_hat * A  # (..., n)
        beta_bar /= _weight_sums(S_b, B, -1, pad_cols, buf)  # S's rows: see _weight_sums
        _zero_where(xp.multiply(S_b, beta_bar[..., :, None], out=buf), pad_rows)
        g_hat = g_hat - buf.sum(-2)  # (..., m)
        buf *= col_b
        dlogK -= _zero_where(buf, pad_cols)
        db += g_hat
        # g_t = log b + alpha_t,  alpha_t = -LSE_i(logK + f_{t-1}):  d alpha_j / d f_i = -R_ij,
        # R = a_i exp(logK + beta_{t-1} + alpha_t) (columns of R sum to 1).
        alpha_bar = g_hat * B  # (..., m)
        if t > 0:
            R_a = kernel.move_rows(betas[t - 1])  # R / a
            alpha_bar /= _weight_sums(R_a, A, -2, pad_rows, buf)  # R's columns, as S's rows
        else:  # f_0: 0, or -inf on padding (no a in it): rebuilt, not rescaled
            R_a = kernel.rebuild(r=cache.f0)  # R
            alpha_bar /= _weight_sums(R_a, 1.0, -2, None, buf)
        _zero_where(xp.multiply(R_a, alpha_bar[..., None, :], out=buf), pad_cols)
        if t > 0:
            f_hat = -buf.sum(-1)  # (..., n)
            da += f_hat
            _zero_where(xp.multiply(buf, row_a, out=buf), pad_rows)
        dlogK -= buf
        g_hat = xp.zeros_like(g_hat)

    dcost = dlogK
    dcost *= -1.0 / cache.epsilon
    da_out = None if cache.a_shape is None else _unbroadcast(da, cache.a_shape, xp)
    db_out = None if cache.b_shape is None else _unbroadcast(db, cache.b_shape, xp)
    return dcost, da_out, db_out


def _weight_sums(E, w, axis, pad, buf):
    """The sums along ``axis`` of a step's softmax weights w * E (S = b E along rows, R = a E
    along columns; ``w`` the marginal, a python float when uniform), by which the unrolled
    backward divides its adjoints. In exact arithmetic they are 1. As computed they miss 1 by
    the rounding of the exponent logK + alpha + beta, whose terms are about 1/epsilon in size
    (an ulp of 1000 is 6e-5 in float32), where the forward's own log-sum-exp added two. The
    gradient is a small difference of such weighted sums (a cost shifted along a row or a
    column leaves the plan as it was), so that rounding came out magnified
    (docs/ops/sinkhorn.md, "float32 at a small epsilon"). Dividing makes each step's weights
    sum to 1 again. ``pad`` (the zero entries of ``w``, or None): there E may have overflowed,
    so the products are made in ``buf`` and zeroed first; a slice of no weight at all is
    divided by 1."""
    xp = array_module(E)
    if pad is not None:
        w_b = w[..., None, :] if axis == -1 else w[..., :, None]
        total = _zero_where(xp.multiply(E, w_b, out=buf), pad).sum(axis)
    elif isinstance(w, float):
        total = E.sum(axis) * w
    elif axis == -1:  # one matrix-vector product per problem: no product matrix written
        total = xp.matmul(E, w[..., :, None])[..., 0]
    else:
        total = xp.matmul(w[..., None, :], E)[..., 0, :]
    return xp.where(total > 0, total, 1)


def _zero_where(x, mask):
    """x with its entries under ``mask`` set to 0 (in place); x itself when mask is None."""
    if mask is not None:
        array_module(x).copyto(x, 0, where=mask)
    return x


def _zeros_of(marginal, xp):
    """Where a broadcast marginal (``(..., 1, m)`` or ``(..., n, 1)``) is 0, or None when it
    has no zero entry (or is a python float: uniform)."""
    if isinstance(marginal, float):
        return None
    mask = marginal == 0
    return mask if bool(mask.any()) else None


def sinkhorn_implicit_backward(dplan, cache):
    """Implicit differentiation at the fixed point: returns (dcost, da, db).

    Differentiates the converged plan through the marginal constraints (implicit function
    theorem) instead of through the iterations: one symmetric (n + m) linear solve per problem,
    memory independent of the number of iterations. Right only when the forward converged
    (docs/ops/sinkhorn.md, "Three gradients"). da and db are defined up to (da + c, db - c);
    this returns the pair with equal sums. Padding entries get 0.
    """
    P = cache.plan  # (..., n, m)
    check_dout("sinkhorn_implicit_backward", dplan, P.shape, P.dtype, type(P), "dplan")
    xp = array_module(dplan)
    n, m = P.shape[-2], P.shape[-1]
    batch = tuple(P.shape[:-2])
    A = xp.broadcast_to(xp.asarray(cache.a, dtype=P.dtype), batch + (n,))  # (..., n)
    B = xp.broadcast_to(xp.asarray(cache.b, dtype=P.dtype), batch + (m,))  # (..., m)
    W = dplan * P  # (..., n, m)
    rhs = xp.concatenate([W.sum(-1), W.sum(-2)], axis=-1)  # (..., n + m)
    # H = [[diag(a), P], [P^T, diag(b)]] is singular along v = (1, -1) (F + c, G - c leave the
    # plan unchanged); rhs is orthogonal to v, so adding s v v^T picks the solution with v.z = 0.
    # Padding rows/columns (zero marginal, zero plan row) get an identity row instead.
    ra, cb = A > 0, B > 0
    diag = xp.concatenate([xp.where(ra, A, 1), xp.where(cb, B, 1)], axis=-1)  # (..., n + m)
    v = xp.concatenate([ra.astype(P.dtype), -cb.astype(P.dtype)], axis=-1)  # (..., n + m)
    s = 1.0 / max(n, m)
    H = s * v[..., :, None] * v[..., None, :]  # (..., n + m, n + m)
    H[..., :n, n:] += P
    H[..., n:, :n] += xp.swapaxes(P, -1, -2)
    idx = xp.arange(n + m)
    H[..., idx, idx] += diag
    z = xp.linalg.solve(H, rhs[..., None])[..., 0]  # (..., n + m)
    x, y = z[..., :n], z[..., n:]
    dcost = P * (x[..., :, None] + y[..., None, :])
    dcost -= W
    dcost *= 1.0 / cache.epsilon
    da = None if cache.a_shape is None else _unbroadcast(x, cache.a_shape, xp)
    db = None if cache.b_shape is None else _unbroadcast(y, cache.b_shape, xp)
    return dcost, da, db


def sinkhorn_value_forward(
    cost, a=None, b=None, *, epsilon=0.05, n_iters=100, tol=None, check_every=10
):
    """The entropic OT value <P, C> + epsilon * sum P (log P - 1) at the Sinkhorn plan, (...).

    Its backward is the envelope (Danskin) gradient, right at convergence only: see
    :func:`sinkhorn_value_backward` and docs/ops/sinkhorn.md.
    """
    plan, sc = sinkhorn_forward(
        cost, a, b, epsilon=epsilon, n_iters=n_iters, tol=tol, check_every=check_every
    )
    xp = array_module(plan)
    # With log P = -C/eps + f + g, the value is eps * sum P (f_i + g_j - 1). beta and alpha are
    # f - log a and g - log b; the dual potentials in cost units are F = eps f, G = eps g.
    F = sc.betas[-1] + sc.la  # (..., n)
    G = sc.alphas[-1] + sc.lb  # (..., m)
    if sc.a_shape is not None:
        F = xp.where(sc.a > 0, F, 0)  # padding rows carry no mass: drop their -inf
    if sc.b_shape is not None:
        G = xp.where(sc.b > 0, G, 0)
    rows = plan.sum(-1)  # (..., n)
    cols = plan.sum(-2)  # (..., m)
    value = (rows * F).sum(-1) + (cols * G).sum(-1) - rows.sum(-1)  # (...)
    value *= epsilon
    F *= epsilon
    G *= epsilon
    cache = Cache(plan=plan, F=F, G=G, a_shape=sc.a_shape, b_shape=sc.b_shape)
    return value, cache


def sinkhorn_value_backward(dvalue, cache):
    """Envelope gradient of the regularized OT value: (dcost, da, db).

    dcost = dvalue * P, da = dvalue * F, db = dvalue * G with F, G the dual potentials (cost
    units). Exact only at convergence; F and G are defined up to F + c, G - c, so da and db are
    meaningful along perturbations that keep sum(a) = sum(b). Padding entries get 0.
    ``dvalue`` must have the value's shape (...), dtype and backend (``_common.check_dout``).
    """
    plan = cache.plan
    xp = array_module(plan)
    dv = _per_problem_grad("sinkhorn_value_backward", "dvalue", dvalue, plan)
    dcost = dv[..., None, None] * plan
    da = None
    db = None
    if cache.a_shape is not None:
        da = _unbroadcast(dv[..., None] * cache.F, cache.a_shape, xp)
    if cache.b_shape is not None:
        db = _unbroadcast(dv[..., None] * cache.G, cache.b_shape, xp)
    return dcost, da, db


# --------------------------------------------------------------------------------------------
# IPOT
# --------------------------------------------------------------------------------------------


def ipot_forward(cost, a=None, b=None, *, beta=0.5, n_iters=50, inner_iters=1):
    """Inexact proximal point OT (Xie et al. 2018) as ViLT's word-patch alignment runs it.

    Each outer iteration replaces the kernel by ``Q = exp(-cost/beta) * T`` (a KL proximal step
    around the current plan ``T``) and runs ``inner_iters`` Sinkhorn steps on it, warm-started
    from the previous row scaling. On NumPy with the scalings themselves, as ViLT does, unless
    they under- or overflow; otherwise (and on CuPy) in the log domain. Zero marginals give
    exactly zero rows and columns (docs/ops/ipot.md). Returns ``plan (..., n, m), cache``.
    """
    xp, a_b, b_b, la, lb = _prepare_marginals(cost, a, b)
    beta = _check_positive("beta", beta)
    n_iters = check_count("n_iters", n_iters)  # Python ints (NumPy integers accepted)
    inner_iters = check_count("inner_iters", inner_iters)
    cache = Cache(
        shape=tuple(cost.shape),
        dtype=cost.dtype,
        xp=xp,
        a_shape=None if a is None else tuple(a.shape),
        b_shape=None if b is None else tuple(b.shape),
    )
    if _rescales(xp):
        plan = _ipot_scaling(cost, a_b, b_b, beta, n_iters, inner_iters)
        if plan is not None:
            return plan, cache
    return _ipot_log(cost, la, lb, beta, n_iters, inner_iters), cache


def _ipot_scaling(cost, a_b, b_b, beta, n_iters, inner_iters):
    """IPOT with the scalings themselves, as ViLT computes it (NumPy): no exp in the loop, two
    small batched matrix-vector products per Sinkhorn step. Returns None when a scaling under-
    or overflowed (a sharp kernel, exp(-C / beta) far below 1e-38 in float32): the plan is then
    not finite, or a row lost the mass the last update gave it, and the log domain runs
    instead. Zero marginals stay exact zeros (their scalings are never written)."""
    xp = array_module(cost)
    batch, (n, m) = tuple(cost.shape[:-2]), cost.shape[-2:]
    dtype = cost.dtype
    a_full = xp.broadcast_to(xp.asarray(a_b, dtype=dtype), batch + (n,))
    b_full = xp.broadcast_to(xp.asarray(b_b, dtype=dtype), batch + (m,))
    a_pos, b_pos = a_full > 0, b_full > 0
    A = xp.exp(cost * (-1.0 / beta))  # (..., n, m)
    T = xp.ones_like(A)
    Q = xp.empty_like(A)
    sigma = xp.array(a_full)  # ViLT's start (0 on padding, and 0 there for good)
    delta = xp.zeros(batch + (m,), dtype=dtype)
    col = xp.empty(batch + (1, m), dtype=dtype)  # Q^T sigma, as a row
    row = xp.empty(batch + (n, 1), dtype=dtype)  # Q delta, as a column
    with xp.errstate(all="ignore"):  # an under/overflow is caught by the check below
        for _ in range(n_iters):
            xp.multiply(A, T, out=Q)
            for _ in range(inner_iters):
                xp.matmul(sigma[..., None, :], Q, out=col)
                xp.divide(b_full, col[..., 0, :], out=delta, where=b_pos)  # b / (Q^T sigma)
                xp.matmul(Q, delta[..., :, None], out=row)
                xp.divide(a_full, row[..., 0], out=sigma, where=a_pos)  # a / (Q delta)
            xp.multiply(Q, sigma[..., :, None], out=T)
            T *= delta[..., None, :]  # T = diag(sigma) Q diag(delta)
        rows_ok = xp.abs(T.sum(-1) - a_full) <= 1e-3 * a_full  # sigma made them exactly a
    if not (bool(xp.isfinite(T).all()) and bool(rows_ok.all())):
        return None
    return T


def _ipot_log(cost, la, lb, beta, n_iters, inner_iters):
    """IPOT in the log domain (docs/ops/ipot.md): the path for any kernel, and CuPy's."""
    xp = array_module(cost)
    batch = tuple(cost.shape[:-2])
    n = cost.shape[-2]
    logA = cost * (-1.0 / beta)  # (..., n, m)
    logQ = xp.zeros_like(logA)  # (..., n, m) log T, then log Q = log T + log A in place
    buf = xp.empty_like(logA)
    # ViLT starts the row scaling at sigma = a (0 on padding): in logs, log a.
    lsig = xp.broadcast_to(xp.asarray(la, dtype=cost.dtype), batch + (n,))  # (..., n)
    for _ in range(n_iters):
        logQ += logA
        for _ in range(inner_iters):
            xp.add(logQ, lsig[..., :, None], out=buf)
            ldel = _lse_(buf, -2, xp)  # (..., m)
            ldel = lb - ldel  # delta = b / (Q^T sigma)
            xp.add(logQ, ldel[..., None, :], out=buf)
            lsig = _lse_(buf, -1, xp)  # (..., n)
            lsig = la - lsig  # sigma = a / (Q delta)
        # T = diag(sigma) Q diag(delta). Padding rows/columns (-inf) are left out of log T so
        # that it stays finite; they are never read because sigma/delta are -inf there.
        logQ += xp.where(xp.isfinite(lsig), lsig, 0)[..., :, None]
        logQ += xp.where(xp.isfinite(ldel), ldel, 0)[..., None, :]
    row_off = xp.where(xp.isfinite(lsig), 0, -xp.inf)  # (..., n): -inf on padding
    col_off = xp.where(xp.isfinite(ldel), 0, -xp.inf)  # (..., m)
    return _exp_potentials(logQ, row_off, col_off, buf)  # (..., n, m)


def ipot_backward(dplan, cache):
    """IPOT is used as a stop-gradient solver (ViLT wraps it in ``torch.no_grad``).

    Returns zeros: ``(dcost, da, db)`` with the plan treated as a constant of its inputs. This is
    NOT the derivative of the iterations; differentiate through Sinkhorn when you need one
    (docs/ops/ipot.md). ``dplan`` must have the plan's shape, dtype and backend.
    """
    xp = cache.xp
    check_dout("ipot_backward", dplan, cache.shape, cache.dtype, xp.ndarray, "dplan")
    dcost = xp.zeros(cache.shape, dtype=cache.dtype)
    da = None if cache.a_shape is None else xp.zeros(cache.a_shape, dtype=cache.dtype)
    db = None if cache.b_shape is None else xp.zeros(cache.b_shape, dtype=cache.dtype)
    return dcost, da, db


# --------------------------------------------------------------------------------------------
# OT distance
# --------------------------------------------------------------------------------------------


def ot_distance_forward(cost, a=None, b=None, *, method="ipot", **solver_options):
    """<plan, cost> over the last two axes, (...), with the plan held constant (ViLT's WPA).

    ``method`` "ipot" (options beta=0.5, n_iters=50, inner_iters=1) or "sinkhorn" (epsilon,
    n_iters, tol, check_every). The cache keeps only the plan (docs/ops/ot_distance.md).
    """
    if method == "ipot":
        plan, _ = ipot_forward(cost, a, b, **solver_options)
    elif method == "sinkhorn":
        plan, _ = sinkhorn_forward(cost, a, b, **solver_options)
    else:
        raise ValueError(f"method must be 'ipot' or 'sinkhorn', got {method!r}")
    distance = (plan * cost).sum(axis=(-2, -1))  # (...)
    return distance, Cache(plan=plan)


def ot_distance_backward(ddistance, cache):
    """Returns (dcost,) = ddistance[..., None, None] * plan: the plan is a constant here.

    ``ddistance`` must have the distance's shape (...), dtype and backend; a Python float where
    the distance is 0-d (``_common.check_dout``)."""
    plan = cache.plan
    dd = _per_problem_grad("ot_distance_backward", "ddistance", ddistance, plan)
    return (dd[..., None, None] * plan,)


def _per_problem_grad(op, name, d, plan):
    """The gradient of a value with one number per problem (the plan's (...) dims), checked
    (``check_dout``; a plain number where there is one problem) and as an array of the plan's
    dtype and backend."""
    check_dout(op, d, plan.shape[:-2], plan.dtype, type(plan), name, scalar_ok=True)
    return array_module(plan).asarray(d, dtype=plan.dtype)


# --------------------------------------------------------------------------------------------
# Cosine cost
# --------------------------------------------------------------------------------------------


def cosine_cost_forward(x, y, eps=1e-5):
    """1 - cosine similarity: x (..., n, d), y (..., m, d) -> (..., n, m).

    Each row is normalized as ``x / max(|x|, eps)`` (torch's ``F.normalize``, as in ViLT).
    Leading dims broadcast. The cache keeps the normalized rows and the clamped norms
    (docs/ops/cosine_cost.md).
    """
    xp = array_module(x, y)
    check_float("x", x, ndim_min=2)
    check_float("y", y, ndim_min=2)
    check_same_dtype(x=x, y=y)
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"x (..., n, d) and y (..., m, d) must share d, got x {tuple(x.shape)} and "
            f"y {tuple(y.shape)}"
        )
    if _broadcast_shape(tuple(x.shape[:-2]), tuple(y.shape[:-2])) is None:
        raise ValueError(
            f"the leading dims of x {tuple(x.shape)} and y {tuple(y.shape)} do not broadcast"
        )
    eps = _check_positive("eps", eps)
    nx = xp.sqrt((x * x).sum(-1, keepdims=True))  # (..., n, 1)
    ny = xp.sqrt((y * y).sum(-1, keepdims=True))  # (..., m, 1)
    rx = xp.maximum(nx, eps)  # (..., n, 1)
    ry = xp.maximum(ny, eps)
    xn = x / rx  # (..., n, d)
    yn = y / ry  # (..., m, d)
    out = xn @ xp.swapaxes(yn, -1, -2)  # (..., n, m) cosine similarity
    xp.subtract(1, out, out=out)
    cache = Cache(
        xn=xn, yn=yn, rx=rx, ry=ry, x_free=nx >= eps, y_free=ny >= eps, out_shape=out.shape
    )
    return out, cache


def cosine_cost_backward(dout, cache):
    """Returns (dx, dy). d(1 - xn.yn) = -(dxn.yn + xn.dyn); through x / max(|x|, eps):
    dx = (dxn - xn (xn . dxn)) / |x| where |x| >= eps, dxn / eps where the norm was clamped.
    ``dout`` must have the output's shape, dtype and backend (``_common.check_dout``)."""
    xn, yn = cache.xn, cache.yn
    check_dout("cosine_cost_backward", dout, cache.out_shape, xn.dtype, type(xn))
    xp = array_module(dout)
    dxn = -(dout @ yn)  # (..., n, d)
    dyn = -(xp.swapaxes(dout, -1, -2) @ xn)  # (..., m, d)

    def through_norm(dn, un, r, free):
        proj = (un * dn).sum(-1, keepdims=True)  # (..., k, 1)
        proj *= free  # the clamped norm is a constant: no projection there
        return (dn - un * proj) / r

    dx = through_norm(dxn, xn, cache.rx, cache.x_free)
    dy = through_norm(dyn, yn, cache.ry, cache.y_free)
    return _unbroadcast(dx, xn.shape, xp), _unbroadcast(dy, yn.shape, xp)
