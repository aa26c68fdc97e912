"""Inverted dropout: zero each entry with probability p, scale the rest by 1 / (1 - p).

Derivation: docs/ops/dropout.md.
"""

from __future__ import annotations

from ._common import Cache, backend_of, check_dout, check_float

__all__ = ["dropout_forward", "dropout_backward"]


def dropout_forward(x, p=0.0, *, rng=None, train=True):
    """x (...) -> out (...).

    ``rng`` is a generator from ``Backend.rng(seed)`` (on the same backend as x); it is needed
    only when dropout is active (train and p > 0). In eval mode, or with p = 0, the op is the
    identity and keeps no mask.
    """
    check_float("x", x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if not train or p == 0.0:  # the output's shape, dtype and array type, for backward's check
        return x, Cache(mask=None, shape=x.shape, dtype=x.dtype, kind=type(x))
    if rng is None:
        raise ValueError("dropout with p > 0 in train mode needs rng=Backend.rng(seed)")
    backend_of(x)
    keep = rng.random(x.shape, dtype=x.dtype) >= p  # (...) bool, True = kept
    scale = 1.0 / (1.0 - p)
    mask = keep.astype(x.dtype)
    mask *= scale  # kept entries carry the 1/(1-p) scale, so backward is one multiply
    return x * mask, Cache(mask=mask)


def dropout_backward(dout, cache):
    """Returns (dx,): the same mask and scale as the forward."""
    mask = cache.mask
    if mask is None:
        check_dout("dropout_backward", dout, cache.shape, cache.dtype, cache.kind)
        return (dout.copy(),)
    check_dout("dropout_backward", dout, mask.shape, mask.dtype, type(mask))
    return (dout * mask,)
