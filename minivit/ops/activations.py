"""Pointwise activations: GELU (exact erf form and tanh approximation) and tanh.

Derivations: docs/ops/gelu.md and docs/ops/tanh.md.
"""

from __future__ import annotations

import math

from . import _fast
from ._common import (
    Cache,
    array_module,
    backend_of,
    check_dout,
    check_float,
    check_grad_cache,
    check_same_dtype,
    check_shape,
    grad_enabled,
)

__all__ = [
    "gelu_forward",
    "bias_gelu_forward",
    "gelu_backward",
    "tanh_forward",
    "tanh_backward",
]

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


def gelu_forward(x, approximate="none"):
    """GELU(x) = x * Phi(x).

    ``approximate="none"``: Phi(x) = (1 + erf(x / sqrt 2)) / 2, as timm, BERT and ViLT use.
    ``approximate="tanh"``: Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2.

    Under ``no_grad()`` the fast path skips the derivative, and the cache is not valid for
    backward.
    """
    check_float("x", x)
    return _gelu_op(x, approximate, bias=None)


def bias_gelu_forward(h, b, approximate="none"):
    """GELU(h + b) -> (out, cache), for a GEMM output ``h`` (..., D) that the caller hands over
    with its bias ``b`` (D,) not yet added (``linear_gelu_forward``'s fc1). ``h`` is overwritten:
    the bias is added in the same pass over h as the activation (a CuPy kernel, or NumPy's
    blocks while each is in cache), instead of in a pass of its own. The same values as
    ``gelu_forward(h + b)``, and the same backward."""
    check_float("h", h, ndim_min=1)
    check_shape("b", b, (h.shape[-1],), "one bias per entry of h's last axis")
    check_same_dtype(h=h, b=b)
    array_module(h, b)  # one backend
    return _gelu_op(h, approximate, bias=b)


def takes_bias(x, approximate) -> bool:
    """Whether GELU's own pass over ``x`` (a GEMM product, or an array like it) adds a bias for
    free: the exact form on the CuPy kernel path or NumPy's float32 blocks. Elsewhere a bias
    costs a pass of its own, better made inside a GEMM's row blocks (``linear_forward``). (For
    NumPy float32 arrays too small for the blocks, or with ``MINIVIT_FAST=0``, it answers yes
    although ``_gelu`` then adds the bias in one plain pass: the same pass ``linear_forward``
    would make there.)"""
    if approximate != "none":
        return False
    if _fast.use_kernels(x):
        return True
    return backend_of(x).name == "numpy" and x.dtype == backend_of(x).xp.float32


def _gelu_op(x, approximate, bias):
    """gelu_forward and bias_gelu_forward past their checks."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if grad_enabled():
        return _gelu(x, approximate, derivative=True, bias=bias)
    out, _ = _gelu(x, approximate, derivative=False, bias=bias)
    return out, Cache(no_grad=True, approximate=approximate)


def _gelu(x, approximate, derivative, bias=None):
    """gelu_forward's paths; ``derivative=False`` lets the fast path skip dydx (inference). With
    a ``bias``, x is the caller's to overwrite (``bias_gelu_forward``)."""
    be = backend_of(x)
    xp = be.xp
    if approximate == "none":
        if _fast.use_kernels(x, bias):
            # One fused CuPy kernel; the backward recomputes Phi and phi from x (kernels_cupy).
            if bias is None:
                return _fast.kernels_cupy.gelu_forward(x), fused_gelu_cache(x)
            return _fast.kernels_cupy.bias_gelu_forward(x, bias), fused_gelu_cache(x)  # x += b
        if x.dtype == xp.float32 and _fast.use_fast(x):
            # Blocked, threaded NumPy path (same result to float32 rounding), see ops/_fast.py.
            # The cache keeps the derivative instead of Phi (the backward is one product) and
            # not x, which the backward then never reads: the input can be freed (in a ViT,
            # the MLP's widest activation), or overwritten with the output when it is ours.
            out, dydx = _fast.gelu_forward_f32(x, derivative, bias=bias)
            return out, Cache(x=None, cdf=None, dydx=dydx, approximate="none")
    if bias is not None:
        _fast.add_bias(x, bias)
    if approximate == "none":
        cdf = be.erf(x * _SQRT_HALF)  # (...), erf(x / sqrt 2)
        cdf += 1.0
        cdf *= 0.5  # Phi(x)
        return x * cdf, Cache(x=x, cdf=cdf, approximate="none")
    inner = x * x
    inner *= _GELU_TANH_C
    inner += 1.0
    inner *= x
    inner *= _SQRT_2_OVER_PI  # sqrt(2/pi) (x + c x^3)
    t = xp.tanh(inner)
    half = t + 1.0
    half *= 0.5
    return x * half, Cache(x=x, t=t, approximate="tanh")


def fused_gelu_cache(x):
    """The cache of an exact GELU computed by a CuPy kernel from ``x``: x alone, as the
    backward kernel recomputes Phi(x) and phi(x)."""
    return Cache(x=x, cdf=None, fused=True, approximate="none")


def gelu_backward(dout, cache, *, out=None):
    """Returns (dx,).

    exact: d/dx [x Phi(x)] = Phi(x) + x phi(x), phi the standard normal density.
    tanh:  0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 c x^2), t the forward's tanh.

    ``out`` (dout's shape and dtype), when given, receives dx; it may be ``dout`` itself (a
    caller that has no further use for dout saves an array: ``linear_gelu_backward``).
    ``dout`` must have the output's shape, dtype and backend (``_common.check_dout``).
    """
    check_grad_cache("gelu_backward", cache)
    ref = gelu_output(cache)
    check_dout("gelu_backward", dout, ref.shape, ref.dtype, type(ref))
    if out is not None and out is not dout:
        check_dout("gelu_backward", out, ref.shape, ref.dtype, type(ref), name="out")
    return (gelu_grad(dout, cache, out=out),)


def gelu_output(cache):
    """An array of the shape, dtype and backend of the output of the GELU that made ``cache``
    (a cache made with gradients on): its input, or the derivative the fast path kept."""
    x = cache.x
    return x if x is not None else cache.dydx


def gelu_grad(dout, cache, out=None):
    """gelu_backward past its checks -> dx (not a tuple), for linear_gelu_backward too."""
    x = cache.x
    dydx = getattr(cache, "dydx", None)
    xp = backend_of(x if x is not None else dydx).xp
    if cache.approximate == "none":
        if getattr(cache, "fused", False) and _fast.use_kernels(dout, out):
            return _fast.kernels_cupy.gelu_backward(dout, x, out=out)
        if getattr(cache, "fused", False):  # a non-contiguous dout: the generic formula
            cdf = backend_of(x).erf(x * _SQRT_HALF)
            cdf += 1.0
            cdf *= 0.5
            return _into(out, dout * (cdf + x * xp.exp(-0.5 * x * x) * _INV_SQRT_2PI))
        if dydx is not None:  # made by the fast forward
            if _fast.use_fast(dout, dydx, out):
                return _fast.multiply(dout, dydx, out=out)
            return xp.multiply(dout, dydx, out=out)
        pdf = xp.multiply(x, x, out=xp.empty_like(x))  # an array even for 0-d x, for out= below
        pdf *= -0.5
        xp.exp(pdf, out=pdf)
        pdf *= _INV_SQRT_2PI  # phi(x)
        pdf *= x
        pdf += cache.cdf  # Phi(x) + x phi(x)
        pdf *= dout
        return _into(out, pdf)
    t = cache.t
    dinner = x * x
    dinner *= 3.0 * _GELU_TANH_C
    dinner += 1.0
    dinner *= _SQRT_2_OVER_PI  # d inner / dx
    sech2 = t * t
    sech2 -= 1.0
    sech2 *= -0.5  # (1 - t^2) / 2
    sech2 *= x
    sech2 *= dinner
    sech2 += 0.5 * (t + 1.0)
    sech2 *= dout
    return _into(out, sech2)


def _into(out, dx):
    """dx, copied into ``out`` when one is given (the paths that make dx in a new array)."""
    if out is None:
        return dx
    out[...] = dx
    return out


def tanh_forward(x):
    """tanh(x), elementwise (the ViLT and BERT pooler's activation)."""
    check_float("x", x)
    y = backend_of(x).xp.tanh(x)
    return y, Cache(y=y)


def tanh_backward(dout, cache):
    """Returns (dx,): dx = dout * (1 - y^2), y = tanh(x) from the forward."""
    y = cache.y
    check_dout("tanh_backward", dout, y.shape, y.dtype, type(y))
    dx = y * y
    dx -= 1.0
    dx *= -1.0
    dx *= dout
    return (dx,)
