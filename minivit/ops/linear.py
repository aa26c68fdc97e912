"""Linear (fully connected) layer: ``out = x @ w.T + b``.

Derivation: docs/ops/linear.md.
"""

from __future__ import annotations

from . import _fast
from ._common import (
    Cache,
    array_module,
    check_dout,
    check_float,
    check_grad_cache,
    check_same_dtype,
    check_shape,
)
from .activations import bias_gelu_forward, gelu_forward, gelu_grad, gelu_output, takes_bias

__all__ = ["linear_forward", "linear_backward", "linear_gelu_forward", "linear_gelu_backward"]


def linear_forward(x, w, b=None):
    """x (..., Din), w (Dout, Din), b (Dout,) or None -> out (..., Dout).

    The weight layout is PyTorch's and timm's (out_features, in_features), so checkpoints load
    without transposes.
    """
    _check(x, w, b)
    d_out = w.shape[0]

    # One GEMM over all leading dims: (M, Din) @ (Din, Dout), M = prod(leading dims).
    x2 = _fast.rows(x)  # (M, Din)
    out = _fast.matmul_nt(x2, w, b)  # x2 @ w.T + b, (M, Dout); on minivit's pool when it pays
    out = out.reshape(*x.shape[:-1], d_out)  # (..., Dout)
    return out, Cache(x=x, w=w, has_bias=b is not None, out_shape=out.shape)


def linear_product(x, w, b=None):
    """x w^T without the bias -> ((M, Dout), the cache of ``linear_forward(x, w, b)``), for a
    caller that adds b itself in a pass it makes anyway (fc1's GELU, attention's head layout).
    The cache records the (..., Dout) layout of ``linear_forward``'s output, so the caller
    hands the gradient to :func:`linear_grads` (which gives db as usual) in that layout."""
    _check(x, w, b)
    cache = Cache(x=x, w=w, has_bias=b is not None, out_shape=x.shape[:-1] + w.shape[:1])
    return _fast.matmul_nt(_fast.rows(x), w), cache


def _check(x, w, b):
    """linear_forward's argument checks (shared with linear_gelu_forward)."""
    check_float("x", x, ndim_min=1)
    check_float("w", w)
    if w.ndim != 2:
        raise ValueError(f"w must have shape (Dout, Din), got {tuple(w.shape)}")
    d_out, d_in = w.shape
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x's last dimension must equal w's in_features {d_in} (w is {tuple(w.shape)}), "
            f"got x of shape {tuple(x.shape)}"
        )
    if b is not None:
        check_float("b", b)
        check_shape("b", b, (d_out,), "one bias per output feature")
    check_same_dtype(x=x, w=w, b=b)
    array_module(x, w, b)  # raises TypeError on mixed backends


def linear_backward(dout, cache, *, need_dx=True):
    """Returns (dx, dw, db); db is None when the forward had no bias.

    Forward was out = x w^T + b, so dx = dout w, dw = dout^T x (summed over all leading dims),
    db = sum of dout over all leading dims. ``need_dx=False`` skips the dx product (one of the
    backward's two GEMMs) and returns dx = None: for a first layer whose input needs no gradient.
    ``dout`` must have the output's shape, dtype and backend (``_common.check_dout``).
    """
    w = cache.w
    check_dout("linear_backward", dout, cache.out_shape, w.dtype, type(w))
    return linear_grads(dout, cache, need_dx)


def linear_grads(dout, cache, need_dx=True):
    """linear_backward past its check of ``dout``: for the ops built on it (attention, patch
    embedding, linear + GELU), which check their own ``dout`` and pass on arrays they made."""
    x, w = cache.x, cache.w
    d2 = _fast.rows(dout)  # (M, Dout)
    x2 = _fast.rows(x)  # (M, Din)
    # d2 @ w, d2^T @ x2 and the column sums of d2; on minivit's pool when it pays
    dx2, dw, db = _fast.linear_grads(d2, x2, w, cache.has_bias, need_dx)
    return (dx2.reshape(x.shape) if need_dx else None), dw, db  # (..., Din), (Dout, Din), (Dout,)


def linear_gelu_forward(x, w, b=None, approximate="none"):
    """GELU(x @ w.T + b): x (..., Din), w (Dout, Din), b (Dout,) or None -> (..., Dout).

    The first half of every transformer MLP (fc1, then its activation), as one op. It computes
    exactly :func:`linear_forward` followed by ``gelu_forward``, and its backward is theirs in
    reverse; what it adds is the place to fuse them. Where GELU's own pass over the product can
    add the bias (``activations.takes_bias``: the exact form on the CuPy kernel or NumPy's
    float32 blocks), the GEMM leaves it out and GELU adds it (``bias_gelu_forward``). Against a
    bias add followed by GELU, that saves one read and one write of the (M, Dout) activation on
    NumPy (GELU's output goes over the product), one read and one launch on CuPy.
    The cache is the two ops' caches.
    """
    if b is None or not takes_bias(w, approximate):
        h, c_fc = linear_forward(x, w, b)
        y, c_act = gelu_forward(h, approximate=approximate)
        return y, Cache(fc=c_fc, act=c_act)
    h, c_fc = linear_product(x, w, b)  # x w^T, (M, Dout), ours, the bias not yet added
    h = h.reshape(*x.shape[:-1], w.shape[0])
    y, c_act = bias_gelu_forward(h, b, approximate)  # h is overwritten
    return y, Cache(fc=c_fc, act=c_act)


def linear_gelu_backward(dout, cache, *, need_dx=True, overwrite_dout=False):
    """Returns (dx, dw, db) of GELU(x w^T + b): GELU's backward, then the linear layer's.

    ``overwrite_dout=True`` lets GELU's backward write into ``dout`` (C-contiguous), for a
    caller that has no further use for it: one (..., Dout) array fewer at that moment.
    ``dout`` must have the output's shape, dtype and backend (``_common.check_dout``).
    """
    act = cache.act
    check_grad_cache("linear_gelu_backward", act)
    ref = gelu_output(act)  # an array of the output's shape, dtype and backend
    check_dout("linear_gelu_backward", dout, ref.shape, ref.dtype, type(ref))
    dh = gelu_grad(dout, act, out=dout if overwrite_dout else None)
    return linear_grads(dh, cache.fc, need_dx=need_dx)
