"""The convolutional stem's ops: 2-D convolution, ReLU, group norm and 2x2 max-pool.

Layouts are PyTorch's: images and feature maps (B, C, H, W), conv weights (Cout, Cin, kh, kw),
so timm's hybrid checkpoints load without transposes.

- ``conv2d``: im2col through a strided view of the padded input (held channels-last inside the
  op, so the im2col copy moves contiguous runs of channels) plus one GEMM. Its backward is
  ``dw = dout^T cols`` (a GEMM) and ``dx = col2im(dout W)``: at stride 1 computed as the
  correlation of the padded ``dout`` with the flipped, in/out-swapped kernel (one more im2col
  and GEMM: a gather, no scatter); at stride > 1, where that form would multiply mostly zeros,
  as ``dcols = dout W`` folded back by one strided add per kernel offset (kh kw adds, never a
  loop over pixels).
- ``relu``: max(x, 0); the derivative at 0 is taken as 0, as PyTorch does.
- ``groupnorm``: normalise each (sample, group of channels) over the group's channels and all
  positions, then a per-channel affine. Chosen over batch norm because it is stateless (no
  running statistics, the same computation in train and eval, no batch-size dependence), which
  keeps the op a pure forward/backward pair like all the others, and it is what timm's hybrid
  backbones (ResNetV2 with GroupNorm) use.
- ``maxpool2d``: non-overlapping k x k windows (stride k), floor mode like PyTorch's default.

Derivations: docs/ops/conv2d.md, docs/ops/relu.md, docs/ops/groupnorm.md, docs/ops/maxpool2d.md.
"""

from __future__ import annotations

import math

from . import _fast
from ._common import (
    Cache,
    array_module,
    as_index,
    check_count,
    check_dout,
    check_float,
    check_same_dtype,
    check_shape,
)

__all__ = [
    "conv2d_forward",
    "conv2d_backward",
    "conv_output_size",
    "relu_forward",
    "relu_backward",
    "groupnorm_forward",
    "groupnorm_backward",
    "maxpool2d_forward",
    "maxpool2d_backward",
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (height, width), each >= minimum, as Python ints. NumPy integers
    count as ints (``operator.index``); bools and floats do not (``TypeError``). A sequence of
    another length than 2, or an int below ``minimum``, is a ``ValueError``."""
    what = f"{name} must be an int >= {minimum} or a pair of them, got"
    if isinstance(v, tuple | list):
        if len(v) != 2:
            raise ValueError(f"{what} {v!r}")
        pair = (as_index(v[0]), as_index(v[1]))
    else:
        pair = (as_index(v),) * 2
    if None in pair:
        raise TypeError(f"{what} {type(v).__name__} {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{what} {v!r}")
    return pair


def _check_image(name: str, x, what: str = "(B, C, H, W)"):
    check_float(name, x)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape {what}, got {tuple(x.shape)}")


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length along one axis: floor((size + 2 padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def _im2col(xpad, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int):
    """Channels-last padded input (B, Hp, Wp, C), contiguous -> cols (B*Ho*Wo, kh*kw*C).

    Row (b, oy, ox) of ``cols`` is the receptive field of output pixel (oy, ox), flattened in
    (kh, kw, C) order. The (B, Ho, Wo, kh, kw, C) strided view aliases the input (no copy); the
    final reshape makes the one copy that the GEMM needs. Channels last, because then that copy
    moves runs of C contiguous values instead of runs of kw (several times faster on the CPU).
    """
    xp = array_module(xpad)
    B, _, _, C = xpad.shape
    # byte strides (as as_strided wants them on numpy and cupy), t_* so as not to read as the
    # convolution's stride (docs/ops/conv2d.md)
    t_b, t_y, t_x, t_c = xpad.strides
    view = xp.lib.stride_tricks.as_strided(
        xpad,
        shape=(B, ho, wo, kh, kw, C),
        strides=(t_b, sh * t_y, sw * t_x, t_y, t_x, t_c),
    )  # (B, Ho, Wo, kh, kw, C), a view
    return view.reshape(B * ho * wo, kh * kw * C)  # (M, K), M = B Ho Wo, K = kh kw C


def _conv_gemm(xpad, wmat, kh, kw, sh, sw, ho, wo):
    """Convolution of a padded channels-last input with wmat (Cout, K): im2col plus one GEMM."""
    xp = array_module(xpad)
    B = xpad.shape[0]
    cols = _im2col(xpad, kh, kw, sh, sw, ho, wo)  # (M, K)
    out = _fast.matmul_nt(cols, wmat)  # cols @ wmat.T, (M, Cout); on the pool when it pays
    # (B, Ho, Wo, Cout) -> (B, Cout, Ho, Wo), made contiguous: the usual NCHW strides.
    cout = wmat.shape[0]  # (named: -1 cannot be inferred from a batch of 0)
    return xp.ascontiguousarray(out.reshape(B, ho, wo, cout).transpose(0, 3, 1, 2))


def _pad_nhwc(x, ph, pw):
    """(B, C, H, W) -> zero-padded channels-last (B, H + 2 ph, W + 2 pw, C), contiguous."""
    xp = array_module(x)
    B, C, H, W = x.shape
    out = xp.zeros((B, H + 2 * ph, W + 2 * pw, C), dtype=x.dtype)
    out[:, ph : ph + H, pw : pw + W, :] = x.transpose(0, 2, 3, 1)
    return out


# --------------------------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------------------------


def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """x (B, Cin, H, W), w (Cout, Cin, kh, kw), b (Cout,) or None -> out (B, Cout, Ho, Wo).

    A cross-correlation, as ``torch.nn.functional.conv2d``: out[b, o, oy, ox] =
    sum_{c,i,j} w[o, c, i, j] xpad[b, c, sh oy + i, sw ox + j] + b[o], with xpad the input
    zero-padded by ``padding`` on each side. ``stride`` and ``padding`` are an int or a pair
    (height, width); Ho = floor((H + 2 ph - kh) / sh) + 1, likewise Wo.
    """
    _check_image("x", x, "(B, Cin, H, W)")
    check_float("w", w)
    if w.ndim != 4:
        raise ValueError(f"w must have shape (Cout, Cin, kh, kw), got {tuple(w.shape)}")
    B, C, H, W = x.shape
    check_shape("w", w, (None, C, None, None), f"Cin={C}, the channels of x")
    cout, _, kh, kw = w.shape
    if kh < 1 or kw < 1:
        raise ValueError(f"w must have a non-empty kernel, got shape {tuple(w.shape)}")
    if b is not None:
        check_float("b", b)
        check_shape("b", b, (cout,), "one bias per output channel")
    check_same_dtype(x=x, w=w, b=b)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    if H + 2 * ph < kh or W + 2 * pw < kw:
        raise ValueError(
            f"the kernel {kh}x{kw} (w) is larger than the padded input {H + 2 * ph}x{W + 2 * pw} "
            f"(x is {H}x{W}, padding=({ph}, {pw}))"
        )
    array_module(x, w, b)  # raises TypeError on mixed backends

    ho, wo = conv_output_size(H, kh, sh, ph), conv_output_size(W, kw, sw, pw)
    xpad = _pad_nhwc(x, ph, pw)  # (B, Hp, Wp, Cin)
    wmat = w.transpose(0, 2, 3, 1).reshape(cout, -1)  # (Cout, K), K in (kh, kw, Cin) order
    out = _conv_gemm(xpad, wmat, kh, kw, sh, sw, ho, wo)  # (B, Cout, Ho, Wo)
    if b is not None:
        out += b.reshape(1, cout, 1, 1)
    # Backward rebuilds cols from xpad (a view, then one copy) rather than keeping the kh*kw
    # times larger cols matrix alive between forward and backward.
    cache = Cache(
        xpad=xpad,
        w=w,
        has_bias=b is not None,
        x_shape=tuple(x.shape),
        stride=(sh, sw),
        padding=(ph, pw),
        out_hw=(ho, wo),
    )
    return out, cache


def conv2d_backward(dout, cache, *, need_dx=True):
    """Returns (dx, dw, db); db is None when the forward had no bias, dx None without need_dx.

    Forward was out = cols W^T (+ b), cols = im2col(xpad), W = w as (Cout, kh kw Cin), so

        dW = dout_mat^T cols            (one GEMM)
        db = sum of dout over B, Ho, Wo
        dx = col2im(dout_mat W)         the adjoint of im2col (docs/ops/conv2d.md), computed
                                        stride 1: as the correlation of the padded dout with the
                                          flipped kernel (one im2col and one GEMM, no scatter);
                                        stride > 1: as dcols = dout_mat W folded back by kh kw
                                          strided adds, one per kernel offset.
    """
    xpad, w = cache.xpad, cache.w
    xp = array_module(xpad)
    B, C, H, W = cache.x_shape
    cout, _, kh, kw = w.shape
    sh, sw = cache.stride
    ho, wo = cache.out_hw
    check_dout("conv2d_backward", dout, (B, cout, ho, wo), xpad.dtype, type(xpad))

    dmat = dout.transpose(0, 2, 3, 1).reshape(-1, cout)  # (M, Cout), rows ordered (b, oy, ox)
    cols = _im2col(xpad, kh, kw, sh, sw, ho, wo)  # (M, K)
    wmat = w.transpose(0, 2, 3, 1).reshape(cout, -1)  # (Cout, K), as in the forward
    # dw and db are those of the linear layer cols -> dmat (dx is folded back below)
    _, dwmat, db = _fast.linear_grads(dmat, cols, wmat, cache.has_bias, need_dx=False)
    dw = dwmat.reshape(cout, kh, kw, C).transpose(0, 3, 1, 2)  # (Cout, Cin, kh, kw)
    dw = xp.ascontiguousarray(dw)
    # At stride s the flipped-kernel form multiplies s^2 - 1 of every s^2 rows of its dilated
    # dout by zero; the offset-by-offset fold does no wasted work (3-9x faster at stride 2 on
    # the stem's sizes), while at stride 1 the single GEMM wins (up to 2x).
    if not need_dx:
        dx = None
    elif (sh, sw) == (1, 1):
        dx = _input_grad_flipped_conv(dout, cache)
    else:
        dx = _input_grad_col2im(dmat, wmat, cache)
    return dx, dw, db


def _input_grad_flipped_conv(dout, cache):
    """dx as a stride-1 correlation of the dilated, padded dout with the flipped kernel.

    dx[y] = sum_{oy, i : sh oy + i - ph = y} dout[oy] w[i]. Put dout[oy] at row
    q + (kh-1-ph) + sh oy of a zero map Z; then dx[y] = sum_i' Z[q + y + i'] w[kh-1-i'], a
    stride-1 correlation with the flipped kernel. q = max(0, ph - (kh-1)) only makes room when
    the padding exceeds kh - 1 (then some outputs see nothing but padding); the q extra rows of
    the result on each side are cropped. Correct for any stride (the tests run it on all).
    """
    w = cache.w
    xp = array_module(w)
    B, C, H, W = cache.x_shape
    cout, _, kh, kw = w.shape
    sh, sw = cache.stride
    ph, pw = cache.padding
    ho, wo = cache.out_hw
    qh, qw = max(0, ph - (kh - 1)), max(0, pw - (kw - 1))
    zh, zw = H + kh - 1 + 2 * qh, W + kw - 1 + 2 * qw
    z = xp.zeros((B, zh, zw, cout), dtype=dout.dtype)  # (B, Zh, Zw, Cout), channels-last
    oh, ow = qh + kh - 1 - ph, qw + kw - 1 - pw
    z[:, oh : oh + sh * (ho - 1) + 1 : sh, ow : ow + sw * (wo - 1) + 1 : sw, :] = dout.transpose(
        0, 2, 3, 1
    )
    # flipped in space, Cin and Cout swapped, flattened in (kh, kw, Cout) order
    w_flip = w[:, :, ::-1, ::-1].transpose(1, 2, 3, 0).reshape(C, -1)  # (Cin, K')
    dx = _conv_gemm(z, w_flip, kh, kw, 1, 1, H + 2 * qh, W + 2 * qw)  # (B, Cin, H+2qh, W+2qw)
    if qh or qw:
        dx = xp.ascontiguousarray(dx[:, :, qh : qh + H, qw : qw + W])  # (B, Cin, H, W)
    return dx


def _input_grad_col2im(dmat, wmat, cache):
    """dx as col2im(dmat wmat), wmat (Cout, K) the forward's weight matrix: every kernel
    offset (i, j) adds its column block back into the input positions it was copied from, one
    whole-batch strided add per offset (kh kw adds, no loop over pixels). Overlapping windows
    add up, as the adjoint of a copy must. Correct for any stride (the tests run it on all)."""
    xpad, w = cache.xpad, cache.w
    xp = array_module(xpad)
    B, C, H, W = cache.x_shape
    _, _, kh, kw = w.shape
    sh, sw = cache.stride
    ph, pw = cache.padding
    ho, wo = cache.out_hw
    dcols = _fast.matmul_nt(dmat, wmat.T)  # dmat @ wmat, on the pool when it pays
    dcols = dcols.reshape(B, ho, wo, kh, kw, C)  # (B, Ho, Wo, kh, kw, Cin)
    dxpad = xp.zeros(xpad.shape, dtype=dmat.dtype)  # (B, Hp, Wp, Cin)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :] += dcols[
                :, :, :, i, j, :
            ]
    dx = dxpad[:, ph : ph + H, pw : pw + W, :].transpose(0, 3, 1, 2)  # crop the padding
    return xp.ascontiguousarray(dx)  # (B, Cin, H, W)


# --------------------------------------------------------------------------------------------
# ReLU
# --------------------------------------------------------------------------------------------


def relu_forward(x):
    """max(x, 0), elementwise; NaN stays NaN (as in PyTorch), so that a diverging input shows."""
    check_float("x", x)
    xp = array_module(x)
    # where backward blocks the gradient: x <= 0, so that a NaN entry passes it as PyTorch's
    # does; (...) bool, 1 byte per entry is all backward needs
    dead = x <= 0
    out = xp.maximum(x, xp.zeros((), dtype=x.dtype))  # (where(x > 0, x, 0) made NaN 0)
    return out, Cache(dead=dead, dtype=x.dtype)  # dead has the output's shape, not its dtype


def relu_backward(dout, cache):
    """Returns (dx,): 0 where x <= 0 (the subgradient 0 at x = 0, as PyTorch), else dout."""
    dead = cache.dead
    check_dout("relu_backward", dout, dead.shape, cache.dtype, type(dead))
    xp = array_module(dout)
    return (xp.where(dead, xp.zeros((), dtype=dout.dtype), dout),)


# --------------------------------------------------------------------------------------------
# Group norm
# --------------------------------------------------------------------------------------------


def groupnorm_forward(x, gamma, beta, num_groups, eps=1e-5):
    """x (B, C, *spatial), gamma (C,), beta (C,) -> out, the shape of x.

    The C channels are split into ``num_groups`` contiguous groups of C / G channels; each
    (sample, group) is normalised over its channels and positions, then every channel gets its
    own scale and shift. G = 1 is layer norm over (C, H, W); G = C is instance norm. The variance
    is that of the centred values (two passes), like layernorm_forward.
    """
    check_float("x", x, ndim_min=2)
    B, C = x.shape[:2]
    check_float("gamma", gamma)
    check_float("beta", beta)
    check_shape("gamma", gamma, (C,), "one scale per channel of x")
    check_shape("beta", beta, (C,), "one shift per channel of x")
    check_same_dtype(x=x, gamma=gamma, beta=beta)
    num_groups = check_count("num_groups", num_groups)  # NumPy integers accepted
    if C % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the channels C={C} of x")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    xp = array_module(x, gamma, beta)

    G = num_groups
    # (B, G, C/G * S), S = prod(spatial); the size named, as -1 is undetermined for B = 0
    xg = x.reshape(B, G, math.prod(x.shape[1:]) // G)
    mean = xg.mean(axis=-1, keepdims=True)  # (B, G, 1)
    xhat = xg - mean  # (B, G, C/G * S), centred
    var = xp.mean(xhat * xhat, axis=-1, keepdims=True)  # (B, G, 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (B, G, 1)
    xhat *= rstd
    xhat = xhat.reshape(x.shape)  # (B, C, *spatial), normalised
    bshape = (1, C) + (1,) * (x.ndim - 2)  # per-channel broadcast
    out = xhat * gamma.reshape(bshape)
    out += beta.reshape(bshape)
    return out, Cache(xhat=xhat, rstd=rstd, gamma=gamma, num_groups=G)


def groupnorm_backward(dout, cache):
    """Returns (dx, dgamma, dbeta).

    With g = dout * gamma (the gradient w.r.t. xhat), per (sample, group), means over the group's
    channels and positions:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    """
    xhat, rstd, gamma, G = cache.xhat, cache.rstd, cache.gamma, cache.num_groups
    check_dout("groupnorm_backward", dout, xhat.shape, xhat.dtype, type(xhat))
    B, C = xhat.shape[:2]
    axes = (0,) + tuple(range(2, xhat.ndim))  # every axis but the channels
    dgamma = (dout * xhat).sum(axis=axes)  # (C,)
    dbeta = dout.sum(axis=axes)  # (C,)

    g = dout * gamma.reshape((1, C) + (1,) * (xhat.ndim - 2))  # (B, C, *spatial)
    n = math.prod(xhat.shape[1:]) // G  # C/G * S, named as in the forward
    g = g.reshape(B, G, n)  # (B, G, C/G * S)
    xg = xhat.reshape(B, G, n)
    mean_g = g.mean(axis=-1, keepdims=True)  # (B, G, 1)
    mean_gx = (g * xg).mean(axis=-1, keepdims=True)  # (B, G, 1)
    g -= mean_g
    g -= xg * mean_gx
    g *= rstd
    return g.reshape(xhat.shape), dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Max-pool
# --------------------------------------------------------------------------------------------


def maxpool2d_forward(x, kernel_size=2):
    """x (B, C, H, W) -> out (B, C, H // k, W // k), the max of each non-overlapping k x k window.

    Stride k, no padding, floor mode: trailing rows and columns that do not fill a window are
    dropped (and get zero gradient), as ``torch.nn.functional.max_pool2d(x, k)``. Ties go to the
    first maximum in row-major order within the window.
    """
    _check_image("x", x)
    k = check_count("kernel_size", kernel_size)  # NumPy integers accepted
    B, C, H, W = x.shape
    if H < k or W < k:
        raise ValueError(f"x is {H}x{W}, smaller than kernel_size={k}")
    xp = array_module(x)
    ho, wo = H // k, W // k
    win = x[:, :, : ho * k, : wo * k].reshape(B, C, ho, k, wo, k)
    win = win.transpose(0, 1, 2, 4, 3, 5).reshape(B, C, ho, wo, k * k)  # (B, C, Ho, Wo, k k)
    idx = xp.argmax(win, axis=-1)  # (B, C, Ho, Wo), the first maximum
    out = xp.take_along_axis(win, idx[..., None], axis=-1)[..., 0]  # (B, C, Ho, Wo)
    return out, Cache(idx=idx, x_shape=tuple(x.shape), k=k, dtype=x.dtype)


def maxpool2d_backward(dout, cache):
    """Returns (dx,): each window's gradient goes entirely to its (first) maximum."""
    idx, k = cache.idx, cache.k
    B, C, H, W = cache.x_shape
    ho, wo = idx.shape[2:]
    check_dout("maxpool2d_backward", dout, idx.shape, cache.dtype, type(idx))
    xp = array_module(dout)
    onehot = idx[..., None] == xp.arange(k * k)  # (B, C, Ho, Wo, k k) bool
    dwin = xp.where(onehot, dout[..., None], xp.zeros((), dtype=dout.dtype))
    dwin = dwin.reshape(B, C, ho, wo, k, k).transpose(0, 1, 2, 4, 3, 5)  # (B, C, Ho, k, Wo, k)
    dwin = dwin.reshape(B, C, ho * k, wo * k)
    if ho * k == H and wo * k == W:
        return (xp.ascontiguousarray(dwin),)
    dx = xp.zeros((B, C, H, W), dtype=dout.dtype)
    dx[:, :, : ho * k, : wo * k] = dwin
    return (dx,)
