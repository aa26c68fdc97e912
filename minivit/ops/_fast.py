"""CPU fast paths for the elementwise-heavy ops (NumPy only).

Each function here computes what the generic ``xp`` code in its op computes, to rounding (that
code stays the reference, and ``tests/test_ops_fast.py`` compares the two), but:

- block by block over rows, so that a chain of ufuncs works on cache-resident temporaries
  instead of streaming whole arrays through memory once per ufunc;
- on a few threads at once (``minivit._parallel``): NumPy releases the GIL inside ufunc loops,
  so the blocks really run in parallel;
- writing into preallocated outputs with ``out=``, so no full-size temporaries are created.

They run only for NumPy arrays that are C-contiguous and large enough for threads to pay (see
:func:`use_fast`); everything else, and all of CuPy, takes the generic path. Setting the
environment variable ``MINIVIT_FAST=0`` turns them off (to time or test the reference).
"""

from __future__ import annotations

import math

from .. import _parallel, kernels_cupy
from ..backend import Switch, backend_of, contiguous_on

__all__ = ["use_fast", "enabled", "set_enabled"]

_SWITCH = Switch("MINIVIT_FAST")

# Below this many elements the generic path is as fast (no threads, few calls).
MIN_ELEMS = 1 << 14

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# erfc(z) ~ t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + p z), z >= 0:
# Hastings' rational approximation (Abramowitz & Stegun 7.1.26), absolute error < 1.5e-7, so
# Phi = (1 + erf) / 2 is off by less than 7.5e-8: about one float32 ulp of Phi near 1 (6e-8).
# Used for float32 only: float64 keeps the library erf.
_ERFC_P = 0.3275911
_ERFC_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)

_SIGN_BIT = -(2**31)  # the sign bit of a float32, as an int32 mask


def enabled() -> bool:
    """Whether the fast paths are on (``MINIVIT_FAST`` unset, or not one of ``Switch.OFF``)."""
    return _SWITCH.on


def set_enabled(flag: bool) -> bool:
    """Turn the fast paths on or off; returns the previous setting (tests and benchmarks)."""
    return _SWITCH.set(flag)


def use_fast(*arrays, min_elems: int = MIN_ELEMS) -> bool:
    """True when every array is a C-contiguous NumPy array and the first is large enough."""
    return _SWITCH.on and arrays[0].size >= min_elems and contiguous_on("numpy", *arrays)


def use_kernels(*arrays) -> bool:
    """True when the fused CuPy kernels (minivit/kernels_cupy.py) apply to these arrays."""
    return kernels_cupy.use_kernels(*arrays)


def softmax_inplace(p, scale, key_mask=None):
    """p <- softmax(scale * p) over the last axis: blocked threads on NumPy, a kernel on CuPy.

    ``key_mask`` (B, N) for scores (B, H, N, N), True = may be attended to: the masked entries
    get exactly 0, and so does every row of a sequence with no valid key (as the generic path
    and the kernel give). On NumPy the mask is added to the scores as 0 / -inf first; a fully
    masked sequence's scores are left finite there and its rows zeroed afterwards.
    """
    if use_kernels(p):
        return kernels_cupy.softmax_forward(p, scale, out=p, key_mask=key_mask)
    if key_mask is None:
        return softmax_(p, scale)
    xp = backend_of(p).xp
    valid = key_mask.any(axis=-1)  # (B,)
    bias = xp.where(key_mask | ~valid[:, None], 0, -xp.inf).astype(p.dtype)  # (B, N)
    p += bias[:, None, None, :]
    softmax_(p, scale)
    p[~valid] = 0  # sequences with nothing to attend to
    return p


def softmax_backward_inplace(dp, p, scale):
    """dp <- scale * p * (dp - sum(dp * p)) over the last axis (attention's dS)."""
    if use_kernels(dp, p):
        return kernels_cupy.softmax_backward(dp, p, scale, out=dp)
    return softmax_backward(dp, p, scale, out=dp)


def batched_matmul(a, b, out=None):
    """out[...] = a @ b for stacks with the same leading axes; ``out`` may be a strided view.

    NumPy only (CuPy's attention has its own layout, ops/attention.py). With several pool
    threads, the stack is split over its leading axis: each pool thread runs its share of the
    small GEMMs with one BLAS thread (see ``_parallel.blas_single_threaded``).
    """
    xp = backend_of(a).xp
    if out is None:
        out = xp.empty(a.shape[:-1] + (b.shape[-1],), dtype=a.dtype)  # same leading axes
    threads = _parallel.available_threads()
    # One share of the leading axis (the batch) per thread; a batch smaller than the thread
    # count (one image at inference) is split along the second axis (the heads) instead.
    axis = 0 if out.shape[0] >= threads or out.ndim < 4 else 1
    n = out.shape[axis]
    if not _SWITCH.on or threads <= 1 or n < 2:
        xp.matmul(a, b, out=out)  # BLAS writes straight into the view (rows are contiguous)
        return out
    lead = (slice(None),) * axis

    def block(s, e):
        part = lead + (slice(s, e),)
        xp.matmul(a[part], b[part], out=out[part])  # NumPy loops over the sub-stack itself

    with _parallel.blas_single_threaded():
        # One contiguous share of the stack per thread (one NumPy call each): one stack item
        # per block paid a Python call and a GIL handoff per small GEMM, for no gain.
        _parallel.for_each_block(block, n, 1, block_elems=-(-n // threads), min_elems=0)
    return out


# ----------------------------------------------------------------------------------------------
# linear: GEMMs split into row blocks on the pool, one BLAS thread each

# Blocks per GEMM: one per pool thread. More, smaller blocks (8 were tried, to let the shared
# counter even out a thread that a busy machine runs late) made the ViT-Ti step 5-8% slower on
# an idle machine: every block repacks the weight and runs a smaller, less efficient GEMM. A
# late worker still costs nothing: the calling thread then takes the other block as well.


def _gemm_rows(n):
    # rows per block (one block per pool thread), a multiple of 16 (whole BLAS micro-tiles),
    # at least 64
    r = -(-n // _parallel.get_num_threads())
    return max(-(-r // 16) * 16, 64)


def use_pooled_gemm(a2) -> bool:
    """Whether a linear layer's GEMMs on ``a2`` (M, K) run in row blocks on the pool."""
    return _parallel.available_threads() > 1 and use_fast(a2) and a2.shape[0] >= 128


def matmul_nt(a2, w, b=None):
    """a2 (M, K) @ w.T (+ b) -> (M, N), any backend: on NumPy in row blocks on the pool when
    that pays (:func:`use_pooled_gemm`), else one GEMM with the bias added after it."""
    if use_pooled_gemm(a2):
        return linear_forward_pooled(a2, w, b)
    out = a2 @ w.T
    if b is not None:
        add_bias(out, b)
    return out


def linear_grads(d2, x2, w, has_bias, need_dx=True):
    """-> (dx2, dw, db) of out = x2 w^T + b, any backend: dx2 = d2 w (None without need_dx),
    dw = d2^T x2, db = the column sums of d2 (None without a bias). On NumPy the products run
    on the pool when that pays (:func:`linear_backward_pooled`), else as plain GEMMs; the
    backward twin of :func:`matmul_nt`, used by linear layers and conv2d's weight gradient."""
    if use_pooled_gemm(d2) and use_fast(x2, w):
        return linear_backward_pooled(d2, x2, w, has_bias, need_dx)
    dx2 = d2 @ w if need_dx else None  # (M, Din)
    dw = d2.T @ x2  # (Dout, Din)
    db = None
    if has_bias:
        db = column_sum(d2) if use_fast(d2) else d2.sum(axis=0)  # (Dout,)
    return dx2, dw, db


def linear_forward_pooled(x2, w, b):
    """x2 (M, Din) @ w.T + b -> (M, Dout), row blocks on the pool with the bias added per block
    while the block is in cache."""
    xp = backend_of(x2).xp
    M, d_out = x2.shape[0], w.shape[0]
    out = xp.empty((M, d_out), dtype=x2.dtype)
    wt = w.T

    def block(s, e):
        o = out[s:e]
        xp.matmul(x2[s:e], wt, out=o)
        if b is not None:
            o += b

    block_rows = _gemm_rows(M)
    with _parallel.blas_single_threaded():
        _parallel.for_each_block(block, M, 1, block_elems=block_rows, min_elems=0)
    return out


def linear_backward_pooled(d2, x2, w, has_bias, need_dx=True):
    """-> (dx2, dw, db) for out = x2 w^T + b: dx2 in row blocks of d2, dw and db in blocks of
    output features (each db block summed beside its dw block). dx2 is None without need_dx."""
    xp = backend_of(d2).xp
    M, d_out = d2.shape
    d_in = w.shape[1]
    dx2 = xp.empty((M, d_in), dtype=d2.dtype) if need_dx else None
    dw = xp.empty((d_out, d_in), dtype=d2.dtype)
    db = xp.empty((d_out,), dtype=d2.dtype) if has_bias else None
    d2t = d2.T  # (Dout, M) view
    rows_x, rows_w = _gemm_rows(M), _gemm_rows(d_out)
    n_x = -(-M // rows_x) if need_dx else 0
    n_w = -(-d_out // rows_w)

    def block(i, _):
        if i < n_x:
            s = i * rows_x
            xp.matmul(d2[s : s + rows_x], w, out=dx2[s : s + rows_x])
        else:
            s = (i - n_x) * rows_w
            e = min(s + rows_w, d_out)
            xp.matmul(d2t[s:e], x2, out=dw[s:e])
            if db is not None:
                d2[:, s:e].sum(axis=0, out=db[s:e])

    with _parallel.blas_single_threaded():
        # one task per block of either product, all from one counter
        _parallel.for_each_block(block, n_x + n_w, 1, block_elems=1, min_elems=0)
    return dx2, dw, db


def rows(a):
    """a (..., D) as (M, D), M = prod(leading dims): a view when a is C-contiguous (as the fast
    paths check), a copy otherwise. M is named, not left to reshape's -1, which D = 0 leaves
    undetermined (a linear layer of no input features)."""
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1]) if a.ndim else a.reshape(1, 1)


# ----------------------------------------------------------------------------------------------
# GELU, exact (erf) form


def gelu_forward_f32(x, derivative=True, bias=None):
    """x float32 -> (out, dydx): out = x Phi(x) and its derivative Phi(x) + x phi(x).

    The derivative is made here, where exp(-x^2 / 2) is already at hand, so the backward is one
    multiplication (the generic path keeps Phi and recomputes phi in the backward). With
    ``derivative=False`` (inference) it is skipped and dydx is None.

    ``bias`` (x's last axis), when given, is added to x first, block by block while the block is
    in cache: GELU(x + b) for fc1, whose GEMM then leaves the bias out (``linear_gelu_forward``).
    Then x is the caller's to overwrite, and out is written over it (fc1's product is not kept:
    the backward reads only dydx).
    """
    xp = backend_of(x).xp
    if x.dtype != xp.float32:  # the sign is copied through an int32 view of the bits
        raise TypeError(f"gelu_forward_f32 takes float32 only, got {x.dtype}")
    out = x if bias is not None else xp.empty_like(x)
    dydx = xp.empty_like(x) if derivative else None
    x2, o2 = rows(x), rows(out)
    d2 = rows(dydx) if derivative else None

    def block(s, e):
        xs, o = x2[s:e], o2[s:e]
        if bias is not None:
            xs += bias
        t = xp.abs(xs)
        ex = t * -0.5
        ex *= t
        xp.exp(ex, out=ex)  # exp(-x^2 / 2)
        t += _GELU_INV_P
        xp.divide(_GELU_K_INV_P, t, out=t)  # tau = k / (1 + p |x| / sqrt 2), in two passes
        q = t + _GELU_C[3]  # Horner on the monic polynomial: tau^5 + c4 tau^4 + ... + c1 tau
        for c in _GELU_C[2::-1]:
            q *= t
            q += c
        q *= t
        q *= ex  # erfc(|x| / sqrt 2) / 2 = Phi(-|x|), at most 1/2
        # Phi(x) = 1/2 + sign(x) (1/2 - Phi(-|x|)). The sign is copied bitwise: OR the sign bit
        # of x into the non-negative 1/2 - Phi(-|x|) (np.copysign is not vectorised, ~8x slower).
        xp.subtract(0.5, q, out=q)
        sign = xp.bitwise_and(xs.view(xp.int32), _SIGN_BIT, out=t.view(xp.int32))
        xp.bitwise_or(q.view(xp.int32), sign, out=q.view(xp.int32))
        q += 0.5  # Phi(x)
        if derivative:
            g = d2[s:e]
            xp.multiply(xs, ex, out=g)
            g *= _INV_SQRT_2PI  # x phi(x)
            g += q  # Phi(x) + x phi(x)
        xp.multiply(xs, q, out=o)  # x Phi(x); the last read of xs, which o may be

    _parallel.for_each_block(block, x2.shape[0], x2.shape[1])
    return out, dydx


def _monic_erfc_coefficients():
    """(1 / p', k / p', (c1, c2, c3, c4)) for Phi(-|x|) = (tau^5 + c4 tau^4 + ... + c1 tau)
    exp(-x^2 / 2), tau = k / (1 + p' |x|), p' = p / sqrt 2: Hastings' erfc (above) halved, so that
    it gives erfc / 2 = Phi(-|x|) directly, with t = tau / k and k = (a5 / 2)^(1/5) chosen to make
    the leading coefficient 1. Then Horner needs no first multiplication, and k costs nothing: it
    rides in the division that makes tau. Same polynomial, one pass fewer per block."""
    halves = [0.5 * a for a in _ERFC_A]  # a1 .. a5
    k = halves[4] ** 0.2
    c = tuple(a / k ** (i + 1) for i, a in enumerate(halves[:4]))  # a_i t^i = (a_i / k^i) tau^i
    inv_p = 1.0 / (_ERFC_P * _SQRT_HALF)
    return inv_p, k * inv_p, c


_GELU_INV_P, _GELU_K_INV_P, _GELU_C = _monic_erfc_coefficients()


def multiply(a, b, out=None):
    """a * b (same shape, C-contiguous), blocked over threads; ``out`` may be ``a``."""
    xp = backend_of(a).xp
    if out is None:
        out = xp.empty_like(a)
    a2, b2, o2 = rows(a), rows(b), rows(out)

    def block(s, e):
        xp.multiply(a2[s:e], b2[s:e], out=o2[s:e])

    _parallel.for_each_block(block, a2.shape[0], a2.shape[1])
    return out


# ----------------------------------------------------------------------------------------------
# bias: add to a GEMM output, and its gradient (a column sum)


def add_bias(out, b):
    """out (..., N) += b (N,), in place: in row blocks over threads when the fast paths take
    ``out`` (NumPy, large, C-contiguous), else as one add. Returns out."""
    if not use_fast(out):
        out += b
        return out
    out2 = rows(out)

    def block(s, e):
        out2[s:e] += b

    _parallel.for_each_block(block, out2.shape[0], out2.shape[1])
    return out


def column_sum(a2):
    """a2 (M, N) -> (N,), the sum over rows, with per-block partial sums on threads."""
    xp = backend_of(a2).xp
    parts = []

    def block(s, e):
        parts.append((s, a2[s:e].sum(axis=0)))

    _parallel.for_each_block(block, a2.shape[0], a2.shape[1])
    return _sum_parts(xp, parts, a2.shape[1], a2.dtype)


def _sum_parts(xp, parts, n, dtype):
    """The sum of per-block partial sums [(block start, (n,) array), ...], added in block order:
    the threads finish their blocks in any order, and float addition is not associative, so
    adding them as they came made float32 results differ from run to run by a few ulp."""
    total = xp.zeros(n, dtype=dtype)
    for _, p in sorted(parts, key=lambda sp: sp[0]):
        total += p
    return total


# ----------------------------------------------------------------------------------------------
# layernorm over the last axis


# Row sums and column sums are matrix-vector products here (x @ w, ones @ x): BLAS does them in
# one pass, while NumPy's reduction along a short last axis (D = 192) pays a loop per row and
# its broadcasts of a (rows, 1) column pay the same; both were most of layernorm's time.


def layernorm_forward(x, gamma, beta, eps):
    """-> (out, xhat, rstd) as the generic path computes them: two-pass variance, rstd (..., 1)."""
    xp = backend_of(x).xp
    D = x.shape[-1]
    out = xp.empty_like(x)
    xhat = xp.empty_like(x)
    rstd = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    x2, o2, h2, r2 = rows(x), rows(out), rows(xhat), rstd.reshape(-1)
    ones = xp.ones(D, dtype=x.dtype)

    def block(s, e):
        xs, h, r = x2[s:e], h2[s:e], r2[s:e]
        # the row sum, then divided by D as the generic path's mean is: multiplying by a
        # rounded 1 / D made a constant row's mean miss its value by an ulp, which rstd
        # (1 / sqrt(eps) there) blew up to an output off by 0.6 for rows of 1000 (float32)
        m = xs @ ones
        m /= D  # mean, (rows,)
        xp.subtract(xs, m[:, None], out=h)  # centred
        v = xp.einsum("ij,ij->i", h, h)  # sum of squares per row, without a squared copy
        v /= D
        v += eps
        xp.sqrt(v, out=v)
        xp.divide(1.0, v, out=r)  # rstd
        h *= r[:, None]  # xhat
        o = o2[s:e]
        xp.multiply(h, gamma, out=o)
        o += beta

    _parallel.for_each_block(block, x2.shape[0], D)
    return out, xhat, rstd


def layernorm_backward(dout, xhat, rstd, gamma, skip=None):
    """-> (dx, dgamma, dbeta), the generic path's formulas, blocked over rows; ``skip`` (xhat's
    shape), when given, is added to dx block by block."""
    xp = backend_of(xhat).xp
    D = xhat.shape[-1]
    dx = xp.empty_like(xhat)
    d2, h2, r2, g2 = rows(dout), rows(xhat), rstd.reshape(-1, 1), rows(dx)
    s2 = None if skip is None else skip.reshape(-1, D)
    ones_d = xp.ones(D, dtype=xhat.dtype)
    parts_g, parts_b = [], []

    def block(s, e):
        d, h, g = d2[s:e], h2[s:e], g2[s:e]
        ones = xp.ones(e - s, dtype=d.dtype)
        t = d * h  # (rows, D)
        parts_g.append((s, ones @ t))  # column sums
        parts_b.append((s, ones @ d))
        xp.multiply(d, gamma, out=g)  # gradient w.r.t. xhat
        mg = g @ ones_d
        mg /= D  # mean(g), (rows,), as the forward's mean
        mgx = xp.einsum("ij,ij->i", g, h)
        mgx /= D  # mean(g xhat)
        xp.multiply(h, mgx[:, None], out=t)
        g -= t
        g -= mg[:, None]
        g *= r2[s:e]
        if s2 is not None:
            g += s2[s:e]

    _parallel.for_each_block(block, h2.shape[0], D)
    dgamma = _sum_parts(xp, parts_g, D, xhat.dtype)
    dbeta = _sum_parts(xp, parts_b, D, xhat.dtype)
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------------------------
# softmax over the last axis (also attention's)


def softmax_(y, scale=None):
    """In place: y <- softmax(scale * y) over the last axis (y C-contiguous, rows x N; scale > 0).

    Any shift c_i of row i leaves softmax unchanged; the generic path uses the row maximum.
    Here each block of rows is shifted by the block's maximum M instead (one fast full
    reduction and a scalar subtraction, instead of a per-row reduction and a per-row
    broadcast). exp(scale (y - M)) <= 1 cannot overflow; a row whose maximum lies far below M
    could underflow, so every row whose sum comes out below sqrt(tiny) is redone from its
    scores with its own maximum, as is a whole block whose M is not finite (a NaN or inf score:
    then the rows come out as the generic path's do).
    """
    from .softmax import softmax  # the generic path (softmax.py imports this module)

    xp = backend_of(y).xp
    y2 = rows(y)
    n = y2.shape[1]
    ones = xp.ones(n, dtype=y.dtype)
    tiny = float(xp.finfo(y.dtype).tiny) ** 0.5

    def by_row(ys):  # the generic path's shift, for the rows the block shift cannot serve
        return softmax(ys * scale if scale is not None else ys)

    def block(s, e):
        ys = y2[s:e]
        top = ys.max()
        if not xp.isfinite(top):
            ys[...] = by_row(ys)
            return
        z = xp.subtract(ys, top)  # y - M <= 0; ys keeps the scores until the end
        if scale is not None:
            z *= scale
        xp.exp(z, out=z)
        total = z @ ones  # row sums, (rows,)
        low = xp.nonzero(total < tiny)[0]
        if low.size:  # rows far below the block maximum: their own shift, from their scores
            z[low] = by_row(ys[low])
            total[low] = 1.0
        xp.divide(1.0, total, out=total)
        xp.multiply(z, total[:, None], out=ys)

    _parallel.for_each_block(block, y2.shape[0], n)
    return y


def softmax_backward(dout, y, scale=None, out=None):
    """dx = y * (dout - sum(dout * y)) over the last axis (times ``scale`` when given).

    ``out`` may be ``dout`` itself (attention's backward overwrites its own temporary).
    """
    xp = backend_of(y).xp
    dx = xp.empty_like(y) if out is None else out
    d2, y2, g2 = rows(dout), rows(y), rows(dx)

    def block(s, e):
        ys, g = y2[s:e], g2[s:e]
        r = xp.einsum("ij,ij->i", d2[s:e], ys)  # sum(dout * y) per row
        xp.subtract(d2[s:e], r[:, None], out=g)
        g *= ys
        if scale is not None:
            g *= scale

    _parallel.for_each_block(block, y2.shape[0], y2.shape[1])
    return dx
