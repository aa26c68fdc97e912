"""Softmax cross-entropy, the mean over targets that are not ``ignore_index``.

Derivation: docs/ops/cross_entropy.md.
"""

from __future__ import annotations

from ._common import Cache, array_module, backend_of, check_dout, check_float, check_int

__all__ = ["cross_entropy_forward", "cross_entropy_backward", "log_softmax"]


def log_softmax(x):
    """log softmax over the last axis, max subtracted first."""
    xp = array_module(x)
    z = x - x.max(axis=-1, keepdims=True)
    z -= xp.log(xp.exp(z).sum(axis=-1, keepdims=True))
    return z


def cross_entropy_forward(logits, targets, ignore_index=-100, label_smoothing=0.0):
    """logits (..., K), targets int (...) -> scalar loss (a 0-d array of logits' dtype).

    With label smoothing s, the target distribution is (1 - s) one_hot + s / K, as in
    ``torch.nn.functional.cross_entropy``. When every target is ignored the loss is 0 (PyTorch
    gives NaN there), so a batch without masked tokens does not poison a sum of losses.
    """
    check_float("logits", logits, ndim_min=1)
    check_int("targets", targets)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(logits.shape[:-1])} (logits' shape without the "
            f"class axis), got {tuple(targets.shape)}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    be = backend_of(logits, targets)
    xp = be.xp
    K = logits.shape[-1]
    valid = targets != ignore_index  # (...)
    t = xp.where(valid, targets, 0)
    # The smallest and largest target and the count of valid ones, read on the host in one go
    # (on a GPU, each read waits for all queued work).
    lo = hi = n = 0
    if t.size:
        lo, hi, n = be.host_values(t.min(), t.max(), valid.sum())
    if t.size and (lo < 0 or hi >= K):
        raise ValueError(
            f"targets must lie in [0, {K}) or equal ignore_index={ignore_index}, "
            f"got {lo if lo < 0 else hi}"
        )
    logp = log_softmax(logits)  # (..., K)
    nll = -xp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]  # (...)
    if label_smoothing:
        nll *= 1.0 - label_smoothing
        nll -= label_smoothing * logp.mean(axis=-1)
    nll *= valid
    loss = nll.sum() / max(n, 1)
    cache = Cache(logp=logp, t=t, valid=valid, n=n, label_smoothing=label_smoothing)
    return loss.astype(logits.dtype, copy=False), cache


def cross_entropy_backward(dout, cache):
    """Returns (dlogits,): (softmax(logits) - target distribution) * valid / n * dout.

    The loss is a scalar, so ``dout`` is one: a Python float (or int), or a 0-d array of the
    loss's dtype and backend (``_common.check_dout``).
    """
    logp, t, valid = cache.logp, cache.t, cache.valid
    check_dout("cross_entropy_backward", dout, (), logp.dtype, type(logp), scalar_ok=True)
    xp = array_module(logp)
    K = logp.shape[-1]
    s = cache.label_smoothing
    dlogits = xp.exp(logp)  # softmax, (..., K)
    if s:
        dlogits -= s / K
    onehot_scale = 1.0 - s
    # subtract (1 - s) at the target class of every position
    idx = t[..., None]
    picked = xp.take_along_axis(dlogits, idx, axis=-1)
    xp.put_along_axis(dlogits, idx, picked - onehot_scale, axis=-1)
    n = max(cache.n, 1)
    if not isinstance(dout, (int, float)):  # an array (0-d): stays on the device
        dout = xp.asarray(dout, dtype=logp.dtype)
    scale = xp.multiply(valid, dout / n, dtype=logp.dtype)  # (...); ignored positions get 0
    dlogits *= scale[..., None]
    return (dlogits,)
