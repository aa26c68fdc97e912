"""Patch embedding: a P x P convolution with stride P, written as reshape + one GEMM.

The weight has the layout of timm's ``patch_embed.proj`` (D, C, P, P), so it loads directly.
Derivation: docs/ops/patch_embed.md.
"""

from __future__ import annotations

from ._common import (
    Cache,
    array_module,
    check_count,
    check_dout,
    check_float,
    check_same_dtype,
    check_shape,
)
from .linear import linear_forward, linear_grads

__all__ = ["patch_embed_forward", "patch_embed_backward", "patchify", "unpatchify"]


def patchify(images, patch_size):
    """(B, C, H, W) -> (B, N, C*P*P), patches in row-major order, each flattened as (C, P, P)."""
    B, C, H, W = images.shape
    P = patch_size
    gh, gw = H // P, W // P
    x = images.reshape(B, C, gh, P, gw, P).transpose(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, P, P)
    return x.reshape(B, gh * gw, C * P * P)


def unpatchify(patches, shape, patch_size):
    """The inverse of :func:`patchify`: (B, N, C*P*P) -> (B, C, H, W)."""
    B, C, H, W = shape
    P = patch_size
    gh, gw = H // P, W // P
    x = patches.reshape(B, gh, gw, C, P, P).transpose(0, 3, 1, 4, 2, 5)  # (B, C, gh, P, gw, P)
    return x.reshape(B, C, H, W)


def patch_embed_forward(images, w, b, patch_size):
    """images (B, C, H, W), w (D, C, P, P), b (D,) or None -> (B, N, D), N = (H/P)(W/P).

    The cache refers to ``images`` (no copy): change them in place before the backward and dW
    follows the new values (torch's version counter would refuse; arrays here have none)."""
    check_float("images", images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    B, C, H, W = images.shape
    P = check_count("patch_size", patch_size)  # a Python int (NumPy integers accepted)
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} must be divisible by patch_size {P}")
    check_float("w", w)
    if w.ndim != 4:
        raise ValueError(f"w must have shape (D, C, P, P), got {tuple(w.shape)}")
    check_shape("w", w, (None, C, P, P), f"C={C} channels, patch_size={P}")
    D = w.shape[0]
    if b is not None:
        check_float("b", b)
        check_shape("b", b, (D,))
    check_same_dtype(images=images, w=w, b=b)
    array_module(images, w, b)

    patches = patchify(images, P)  # (B, N, C*P*P), a copy (the reshape follows a transpose)
    out, lin_cache = linear_forward(patches, w.reshape(D, C * P * P), b)  # (B, N, D)
    # The cache keeps the images, which the caller holds anyway, instead of this copy of them:
    # the backward makes the patches again for the one product that reads them (torch's
    # convolution keeps its input the same way).
    lin_cache.x = None
    cache = Cache(lin_cache=lin_cache, images=images, w_shape=w.shape, P=P)
    return out, cache


def patch_embed_backward(dout, cache, *, need_dx=True):
    """Returns (dimages, dw, db): the linear backward, then patches folded back into images.

    ``need_dx=False`` returns dimages = None and skips its product (images need no gradient
    in training). ``dout`` must have the output's shape, dtype and backend
    (``_common.check_dout``)."""
    images = cache.images
    out_shape = cache.lin_cache.out_shape  # the linear's output is the op's
    check_dout("patch_embed_backward", dout, out_shape, images.dtype, type(images))
    lin_cache = Cache(**vars(cache.lin_cache))  # a new record: the cache is never written
    lin_cache.x = patchify(images, cache.P)  # (B, N, C*P*P), the forward's patches again
    dpatches, dw, db = linear_grads(dout, lin_cache, need_dx=need_dx)  # (B, N, C*P*P)
    dimages = unpatchify(dpatches, images.shape, cache.P) if need_dx else None
    return dimages, dw.reshape(cache.w_shape), db
