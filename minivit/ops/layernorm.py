"""Layer normalization over the last axis.

    xhat = (x - mean) / sqrt(var + eps),   out = gamma * xhat + beta

Derivation: docs/ops/layernorm.md.
"""

from __future__ import annotations

from . import _fast
from ._common import Cache, array_module, check_dout, check_float, check_same_dtype, check_shape

__all__ = ["layernorm_forward", "layernorm_backward"]


def layernorm_forward(x, gamma, beta, eps=1e-6):
    """x (..., D), gamma (D,), beta (D,) -> out (..., D).

    The variance is computed from the centred values (two passes), not as E[x^2] - E[x]^2,
    so rows whose entries are nearly equal keep their precision.
    """
    check_float("x", x, ndim_min=1)
    d = x.shape[-1]
    check_float("gamma", gamma)
    check_float("beta", beta)
    check_shape("gamma", gamma, (d,), "the size of x's last axis")
    check_shape("beta", beta, (d,), "the size of x's last axis")
    check_same_dtype(x=x, gamma=gamma, beta=beta)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    xp = array_module(x, gamma, beta)
    if _fast.use_kernels(x, gamma, beta):
        # One CuPy kernel (kernels_cupy.py); the cache keeps x, mean and rstd, not xhat.
        out, mean, rstd = _fast.kernels_cupy.layernorm_forward(x, gamma, beta, eps)
        return out, Cache(xhat=None, x=x, mean=mean, rstd=rstd, gamma=gamma, fused=True)
    if _fast.use_fast(x, gamma, beta):
        # Blocked over rows on threads (ops/_fast.py); the same formulas as below.
        out, xhat, rstd = _fast.layernorm_forward(x, gamma, beta, eps)
        return out, Cache(xhat=xhat, rstd=rstd, gamma=gamma)

    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xhat = x - mean  # (..., D), centred
    var = xp.mean(xhat * xhat, axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat *= rstd  # (..., D), normalized
    out = xhat * gamma
    out += beta
    # backward needs xhat and rstd only (gamma for dxhat).
    return out, Cache(xhat=xhat, rstd=rstd, gamma=gamma)


def layernorm_backward(dout, cache, *, skip=None):
    """Returns (dx, dgamma, dbeta).

    With g = dout * gamma (the gradient w.r.t. xhat):
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))

    ``skip`` (x's shape), when given, is added to dx: the gradient that reaches x by another
    path, as the skip of a pre-LN block's residual connection does (x feeds both the norm and
    the sum). dx + skip then comes out of the same pass (one launch fewer on the GPU).
    ``dout`` must have the output's shape, dtype and backend (``_common.check_dout``).
    """
    fused = getattr(cache, "fused", False)
    ref = cache.x if fused else cache.xhat  # the output's shape, dtype and backend
    check_dout("layernorm_backward", dout, ref.shape, ref.dtype, type(ref))
    if skip is not None:  # the same rule as dout's
        check_dout("layernorm_backward", skip, ref.shape, ref.dtype, type(ref), name="skip")
    if fused:
        x, mean, rstd = cache.x, cache.mean, cache.rstd
        if _fast.use_kernels(dout, skip):
            return _fast.kernels_cupy.layernorm_backward(
                dout, x, mean, cache.rstd, cache.gamma, skip
            )
        # a non-contiguous dout: rebuild the generic cache and fall through
        cache = Cache(
            xhat=(x - mean[..., None]) * rstd[..., None], rstd=rstd[..., None], gamma=cache.gamma
        )
    xhat, rstd, gamma = cache.xhat, cache.rstd, cache.gamma
    if _fast.use_fast(dout, xhat, rstd, gamma, skip):
        return _fast.layernorm_backward(dout, xhat, rstd, gamma, skip)
    d = xhat.shape[-1]
    d2 = dout.reshape(-1, d)  # (M, D)
    dgamma = (d2 * xhat.reshape(-1, d)).sum(axis=0)  # (D,)
    dbeta = d2.sum(axis=0)  # (D,)

    g = dout * gamma  # (..., D)
    mean_g = g.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_gx = (g * xhat).mean(axis=-1, keepdims=True)  # (..., 1)
    g -= mean_g
    g -= xhat * mean_gx
    g *= rstd
    if skip is not None:
        g += skip
    return g, dgamma, dbeta
