"""Softmax along one axis.

Derivation: docs/ops/softmax.md.
"""

from __future__ import annotations

from . import _fast
from ._common import Cache, array_module, as_index, check_dout, check_float

__all__ = ["softmax_forward", "softmax_backward", "softmax"]


def softmax(x, axis=-1):
    """The stable softmax itself, shared with attention: subtract the max before exp."""
    xp = array_module(x)
    if x.shape[axis] == 0:  # no entries to normalize (and no max to take): an empty result
        return x.copy()
    y = x - x.max(axis=axis, keepdims=True)
    xp.exp(y, out=y)
    y /= y.sum(axis=axis, keepdims=True)
    return y


def softmax_forward(x, axis=-1):
    """x (...) -> y (...), with y summing to 1 along ``axis``."""
    check_float("x", x, ndim_min=1)
    index = as_index(axis)  # a NumPy integer too; not a bool or a float
    if index is None:
        raise TypeError(f"axis must be an int, got {type(axis).__name__} {axis!r}")
    if not -x.ndim <= index < x.ndim:
        raise ValueError(
            f"axis must be in [-{x.ndim}, {x.ndim}) for x of shape {tuple(x.shape)}, got {axis!r}"
        )
    axis = index
    if axis in (-1, x.ndim - 1) and _fast.use_kernels(x):
        y = _fast.kernels_cupy.softmax_forward(x)  # one CuPy kernel
    elif axis in (-1, x.ndim - 1) and _fast.use_fast(x):
        y = _fast.softmax_(x.copy())  # blocked over rows on threads (ops/_fast.py)
    else:
        y = softmax(x, axis)
    return y, Cache(y=y, axis=axis)


def softmax_backward(dout, cache):
    """Returns (dx,): dx = y * (dout - sum(dout * y, axis)), the Jacobian-vector product."""
    y, axis = cache.y, cache.axis
    check_dout("softmax_backward", dout, y.shape, y.dtype, type(y))
    if axis in (-1, y.ndim - 1) and _fast.use_kernels(dout, y):
        return (_fast.kernels_cupy.softmax_backward(dout, y),)
    if axis in (-1, y.ndim - 1) and _fast.use_fast(dout, y):
        return (_fast.softmax_backward(dout, y),)
    dx = dout * y
    dx -= y * dx.sum(axis=axis, keepdims=True)
    return (dx,)
