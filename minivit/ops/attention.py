"""Multi-head self-attention with an optional key-padding mask, as timm's ``Attention``.

    qkv = x W_qkv^T + b_qkv               rows of W_qkv are [q; k; v], each head-major
    S   = (q / sqrt(hd)) k^T              per head
    P   = softmax(S) over the valid keys  a fully masked row gives P = 0 (not NaN)
    ctx = P v, heads concatenated
    out = ctx W_proj^T + b_proj

All heads run in one batched matmul; there is no loop over heads or tokens.
Derivation: docs/ops/attention.md.
"""

from __future__ import annotations

from . import _fast
from ._common import (
    Cache,
    array_module,
    check_bool,
    check_count,
    check_dout,
    check_float,
    check_same_dtype,
    check_shape,
)
from .linear import linear_forward, linear_grads, linear_product

__all__ = ["attention_forward", "attention_backward"]


def _check(x, w_qkv, b_qkv, w_proj, b_proj, num_heads, key_mask):
    """attention_forward's argument checks; returns num_heads as a Python int."""
    check_float("x", x)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, N, D), got {tuple(x.shape)}")
    B, N, D = x.shape
    num_heads = check_count("num_heads", num_heads)  # NumPy integers accepted
    if D % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the width D={D} of x")
    for name, a, shape in (
        ("w_qkv", w_qkv, (3 * D, D)),
        ("b_qkv", b_qkv, (3 * D,)),
        ("w_proj", w_proj, (D, D)),
        ("b_proj", b_proj, (D,)),
    ):
        if a is not None:
            check_float(name, a)
            check_shape(name, a, shape, f"D={D}")
    check_same_dtype(x=x, w_qkv=w_qkv, b_qkv=b_qkv, w_proj=w_proj, b_proj=b_proj)
    if key_mask is not None:
        check_bool("key_mask", key_mask)
        check_shape("key_mask", key_mask, (B, N), "one flag per key, True = may be attended to")
    array_module(x, w_qkv, b_qkv, w_proj, b_proj, key_mask)
    return num_heads


def attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, num_heads, key_mask=None):
    """x (B, N, D) -> out (B, N, D). ``cache.attn`` holds the probabilities (B, H, N, N).

    No tokens (N = 0) give an empty output (B, 0, D), and zero gradients for the weights."""
    H = _check(x, w_qkv, b_qkv, w_proj, b_proj, num_heads, key_mask)
    xp = array_module(x)
    B, N, D = x.shape
    hd = D // H
    scale = hd**-0.5

    if N and _fast.use_kernels(w_qkv, b_qkv, key_mask):  # (x: any layout)
        return _kernel_forward(x, w_qkv, b_qkv, w_proj, b_proj, key_mask, B, N, H, hd, scale)
    qkv, qkv_cache = linear_forward(x, w_qkv, b_qkv)  # (B, N, 3D)
    if _fast.use_fast(qkv):
        return _fast_forward(qkv, qkv_cache, w_proj, b_proj, B, N, H, hd, scale, key_mask)
    qkv = qkv.reshape(B, N, 3, H, hd).transpose(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
    q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, H, N, hd)

    s = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, H, N, N)
    if not N:
        p = s  # (B, H, 0, 0): no row to normalize (and max over no keys would raise)
    elif key_mask is None:
        p = s
        p -= s.max(axis=-1, keepdims=True)
        xp.exp(p, out=p)
        p /= p.sum(axis=-1, keepdims=True)
    else:
        valid = key_mask[:, None, None, :]  # (B, 1, 1, N)
        s = xp.where(valid, s, -xp.inf)  # masked keys score -inf
        m = s.max(axis=-1, keepdims=True)  # (B, H, N, 1); -inf on fully masked rows
        m = xp.where(xp.isfinite(m), m, 0)  # keep exp(-inf - 0) = 0 there instead of NaN
        p = s
        p -= m
        xp.exp(p, out=p)  # masked entries are exactly 0
        denom = p.sum(axis=-1, keepdims=True)  # (B, H, N, 1)
        denom[denom == 0] = 1  # a fully masked row stays all zeros
        p /= denom
    ctx = p @ v  # (B, H, N, hd)
    ctx = ctx.transpose(0, 2, 1, 3).reshape(B, N, D)  # heads concatenated, (B, N, D)
    out, proj_cache = linear_forward(ctx, w_proj, b_proj)  # (B, N, D)
    cache = Cache(
        attn=p, q=q, k=k, v=v, scale=scale, num_heads=H, qkv_cache=qkv_cache, proj_cache=proj_cache
    )
    return out, cache


def _fast_forward(qkv, qkv_cache, w_proj, b_proj, B, N, H, hd, scale, key_mask=None):
    """The forward on NumPy without copies: the same steps as attention_forward.

    The scale is folded into the softmax (softmax(scale * q k^T)), the softmax runs blocked on
    threads (ops/_fast.py), and P v is written straight into the heads-concatenated layout.
    NumPy's matmul reads the strided q, k, v views through BLAS as they are. The softmax
    applies the key mask itself (masked keys and fully masked rows get exactly 0).
    """
    xp = array_module(qkv)
    D = H * hd
    qkv5 = qkv.reshape(B, N, 3, H, hd)
    q, k, v = (qkv5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, H, N, hd) views
    p = _fast.batched_matmul(q, k.transpose(0, 1, 3, 2))  # (B, H, N, N), unscaled scores
    _fast.softmax_inplace(p, scale, key_mask)  # P = softmax(scale * S), in place
    ctx = xp.empty((B, N, D), dtype=qkv.dtype)  # heads concatenated
    _fast.batched_matmul(p, v, ctx.reshape(B, N, H, hd).transpose(0, 2, 1, 3))
    out, proj_cache = linear_forward(ctx, w_proj, b_proj)  # (B, N, D)
    cache = Cache(
        attn=p, q=q, k=k, v=v, scale=scale, num_heads=H, qkv_cache=qkv_cache, proj_cache=proj_cache
    )
    return out, cache


def _kernel_forward(x, w_qkv, b_qkv, w_proj, b_proj, key_mask, B, N, H, hd, scale):
    """The forward on CuPy, with the softmax kernel: the same steps, laid out for it. The
    kernel reads the key mask itself (masked entries of P are 0, as on the generic path).

    CuPy's batched matmul copies each operand that is not C-contiguous before its GEMM, a
    transposed view included (``cupy/_core/_routines_linalg.pyx``), so q, k and v are laid out
    head-major once; the qkv bias is added by that same copy. Then only k^T is copied again,
    and the backward reads q, k and v in place or transposes only the small (N, hd) operands,
    never P or dS (N x N).
    """
    xp = array_module(x)
    qkv, qkv_cache = linear_product(x, w_qkv, b_qkv)  # x W_qkv^T, (B N, 3D), no bias yet
    qkvh = xp.empty((3, B, H, N, hd), dtype=x.dtype)  # q, k, v head-major
    heads = qkv.reshape(B, N, 3, H, hd).transpose(2, 0, 3, 1, 4)  # a view, (3, B, H, N, hd)
    if b_qkv is None:
        qkvh[...] = heads
    else:
        xp.add(heads, b_qkv.reshape(3, 1, H, 1, hd), out=qkvh)  # bias and layout, one pass
    q, k, v = qkvh[0], qkvh[1], qkvh[2]  # each (B, H, N, hd), C-contiguous
    p = xp.matmul(q, k.transpose(0, 1, 3, 2))  # (B, H, N, N), unscaled scores
    _fast.softmax_inplace(p, scale, key_mask)  # P = softmax(scale * S), in place, one kernel
    ctx = xp.matmul(p, v).transpose(0, 2, 1, 3).reshape(B, N, H * hd)  # heads concatenated
    out, proj_cache = linear_forward(ctx, w_proj, b_proj)  # (B, N, D)
    cache = Cache(attn=p, q=q, k=k, v=v, scale=scale, num_heads=H, qkv_cache=qkv_cache)
    cache.proj_cache, cache.kernel_layout = proj_cache, True
    return out, cache


def attention_backward(dout, cache):
    """Returns (dx, dw_qkv, db_qkv, dw_proj, db_proj), following the forward in reverse.

    ``dout`` must have the output's shape, dtype and backend (``_common.check_dout``)."""
    p, q, k, v, scale = cache.attn, cache.q, cache.k, cache.v, cache.scale
    check_dout("attention_backward", dout, cache.proj_cache.out_shape, p.dtype, type(p))
    xp = array_module(p)
    B, H, N, hd = q.shape
    D = H * hd
    if getattr(cache, "kernel_layout", False) and _fast.use_kernels(p):
        return _kernel_backward(dout, cache, xp, B, H, N, hd)
    if _fast.use_fast(p, dout):
        return _fast_backward(dout, cache, xp, B, H, N, hd)

    # out = ctx W_proj^T + b_proj
    dctx, dw_proj, db_proj = linear_grads(dout, cache.proj_cache)  # (B, N, D)
    dctx = dctx.reshape(B, N, H, hd).transpose(0, 2, 1, 3)  # (B, H, N, hd)

    # ctx = P v
    dp = dctx @ v.transpose(0, 1, 3, 2)  # (B, H, N, N)
    dv = p.transpose(0, 1, 3, 2) @ dctx  # (B, H, N, hd)

    # P = softmax(S): dS = P * (dP - sum_j dP P). Masked keys have P = 0, so they get dS = 0.
    ds = dp
    ds *= p
    ds -= p * ds.sum(axis=-1, keepdims=True)

    # S = scale * q k^T
    ds *= scale
    dq = ds @ k  # (B, H, N, hd)
    dk = ds.transpose(0, 1, 3, 2) @ q  # (B, H, N, hd)

    dqkv = xp.stack((dq, dk, dv))  # (3, B, H, N, hd)
    del ds, dp, dq, dk, dv, dctx  # spent: not held through the last GEMMs
    dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * D)  # (B, N, 3D), rows [q; k; v]
    dx, dw_qkv, db_qkv = linear_grads(dqkv, cache.qkv_cache)
    return dx, dw_qkv, db_qkv, dw_proj, db_proj


def _kernel_backward(dout, cache, xp, B, H, N, hd):
    """attention_backward after :func:`_kernel_forward`: the same steps, each product arranged
    so that CuPy copies only (N, hd)-sized operands (module docstring of the forward), the
    softmax backward one kernel. dK and dV come out transposed, (hd, N) per head; one kernel
    puts dQ, dK^T and dV^T back in the layout of the qkv rows."""
    p, q, k, v, scale = cache.attn, cache.q, cache.k, cache.v, cache.scale
    dctx, dw_proj, db_proj = linear_grads(dout, cache.proj_cache)  # (B, N, D)
    dctx = dctx.reshape(B, N, H, hd).transpose(0, 2, 1, 3)  # (B, H, N, hd) view
    ds = xp.matmul(dctx, v.transpose(0, 1, 3, 2))  # dP = dctx v^T, (B, H, N, N)
    dvt = xp.matmul(dctx.transpose(0, 1, 3, 2), p)  # dV^T = dctx^T P, (B, H, hd, N)
    _fast.softmax_backward_inplace(ds, p, scale)  # dS = scale * P * (dP - sum(dP P))
    dq = xp.matmul(ds, k)  # dQ = dS k, (B, H, N, hd)
    dkt = xp.matmul(q.transpose(0, 1, 3, 2), ds)  # dK^T = q^T dS, (B, H, hd, N)
    dqkv = _fast.kernels_cupy.qkv_grad(dq, dkt, dvt)  # (B, N, 3D), rows [q; k; v], one kernel
    del ds, dq, dkt, dvt, dctx  # spent: not held through the last GEMMs (a step's peak)
    dx, dw_qkv, db_qkv = linear_grads(dqkv, cache.qkv_cache)
    return dx, dw_qkv, db_qkv, dw_proj, db_proj


def _fast_backward(dout, cache, xp, B, H, N, hd):
    """attention_backward after :func:`_fast_forward` (NumPy): the same steps, the softmax
    backward blocked on threads, and dq, dk, dv written straight into the (B, N, 3D) gradient of
    qkv (no stack, no transpose)."""
    p, q, k, v, scale = cache.attn, cache.q, cache.k, cache.v, cache.scale
    D = H * hd
    dctx, dw_proj, db_proj = linear_grads(dout, cache.proj_cache)  # (B, N, D)
    dctx = dctx.reshape(B, N, H, hd).transpose(0, 2, 1, 3)  # (B, H, N, hd) view
    dqkv = xp.empty((B, N, 3, H, hd), dtype=p.dtype)  # rows [q; k; v], head-major
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, H, N, hd) views
    ds = _fast.batched_matmul(dctx, v.transpose(0, 1, 3, 2))  # dP, (B, H, N, N)
    _fast.batched_matmul(p.transpose(0, 1, 3, 2), dctx, dv)  # dV = P^T dctx
    _fast.softmax_backward_inplace(ds, p, scale)  # dS = scale * P * (dP - sum(dP P))
    _fast.batched_matmul(ds, k, dq)
    _fast.batched_matmul(ds.transpose(0, 1, 3, 2), q, dk)
    del ds, dctx  # spent: not held through the last GEMMs (a step's peak)
    dx, dw_qkv, db_qkv = linear_grads(dqkv.reshape(B, N, 3 * D), cache.qkv_cache)
    return dx, dw_qkv, db_qkv, dw_proj, db_proj
