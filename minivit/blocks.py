"""Composites built only from ops: the MLP, the pre-LN encoder block and the encoder.

They are shared by ViT, the Hybrid ViT and ViLT. Parameters live in one flat dict keyed by timm's
names; every function takes that dict and a name ``prefix`` (ending in a dot), so the same code
serves ``blocks.0.norm1.weight`` (ViT) and ``transformer.blocks.0.norm1.weight`` (ViLT).

Shape legend: B batch, N tokens, D width, Hd MLP hidden width (mlp_ratio * D), H heads.

API (every ``*_forward`` returns ``(out, cache)``; every ``*_backward`` returns the input
gradient and *accumulates* parameter gradients into ``grads`` under the parameters' own names:
``grads[name] = grads[name] + g`` when the name is already there, else ``grads[name] = g``)::

    mlp_forward(x, params, prefix, *, drop=0.0, rng=None, train=False, approximate="none")
        x (..., D) -> (..., D).  fc1 -> GELU -> dropout -> fc2 -> dropout, as timm's Mlp.
        Uses prefix+"fc1.weight" (Hd, D), prefix+"fc1.bias" (Hd,), prefix+"fc2.weight" (D, Hd),
        prefix+"fc2.bias" (D,).  A missing bias key means "no bias".
    mlp_backward(dout, cache, grads, *, release=False) -> dx

    block_forward(x, params, prefix, num_heads, *, key_mask=None, eps=1e-6, drop=0.0,
                  drop_path=0.0, rng=None, train=False)
        x (B, N, D) -> (B, N, D).  x = x + attn(norm1(x)); x = x + mlp(norm2(x)).
        Uses prefix + "norm1.weight/bias", "attn.qkv.weight/bias", "attn.proj.weight/bias",
        "norm2.weight/bias", "mlp.fc1.weight/bias", "mlp.fc2.weight/bias" (timm's Block).
        key_mask (B, N) bool, True = may be attended to, is passed to the attention op.
        drop: dropout after the attention projection and in the MLP (timm's proj_drop/drop).
        drop_path: stochastic depth, one keep/drop decision per sample and branch.
        rng: a generator from Backend.rng(seed); needed only when train and a rate > 0.
        cache.attn is the attention probabilities (B, H, N, N).
    block_backward(dout, cache, grads, *, release=False) -> dx
        release=True drops each part of the cache once used (encoder_backward's way).

    encoder_forward(x, params, prefix, depth, num_heads, **block_options)
        Runs block_forward for prefix+"0.", ..., prefix+f"{depth-1}." (prefix e.g. "blocks." or
        "transformer.blocks."), same options as block_forward; drop_path may also be a list
        of depth per-block rates.  cache.blocks is the list of
        block caches; cache.blocks[i].attn is block i's attention (B, H, N, N).
    encoder_backward(dout, cache, grads) -> dx
        Consumes cache.blocks (each block's cache goes once its backward has run, as torch's
        backward frees its graph); a second call asks for a new forward.

    block_param_shapes(prefix, dim, mlp_hidden, qkv_bias=True) -> dict name -> shape
    init_block_params(prefix, dim, mlp_hidden, qkv_bias=True, *, rng) -> dict name -> array
        timm init for one block (trunc-normal std 0.02 linear weights, zero biases, unit norms),
        on the host generator ``rng`` (a numpy Generator, e.g. get_backend("numpy").rng(seed));
        move the arrays to the target backend and dtype yourself.

Backward mirrors forward in reverse, with the residual gradients added where they meet:
``dx = dx_branch + dx_skip``. The chain rule, with shapes, is written out in docs/vit.md.
"""

from __future__ import annotations

from . import ops
from .backend import array_module

__all__ = [
    "mlp_forward",
    "mlp_backward",
    "block_forward",
    "block_backward",
    "encoder_forward",
    "encoder_backward",
    "block_param_shapes",
    "init_block_params",
    "trunc_normal",
    "accumulate",
    "maybe_dropout",
    "maybe_dropout_back",
]


def accumulate(grads: dict, name: str, g) -> None:
    """grads[name] += g (or = g when absent); a None g (no bias) is skipped."""
    if g is None:
        return
    prev = grads.get(name)
    grads[name] = g if prev is None else prev + g


def maybe_dropout(x, p, rng, train):
    """Dropout inside a model: -> (out, cache). Inactive (eval, or p = 0) it returns x itself
    and a None cache, and :func:`maybe_dropout_back` then passes the gradient on without the
    copy that ``ops.dropout_backward`` makes (an op never returns its input)."""
    if not train or p == 0.0:
        return x, None
    return ops.dropout_forward(x, p, rng=rng, train=True)


def maybe_dropout_back(dout, cache):
    """The gradient through :func:`maybe_dropout`: dout itself when it was inactive."""
    return dout if cache is None else ops.dropout_backward(dout, cache)[0]


def _drop_path_mask(x, p, rng, train):
    # Stochastic depth: one Bernoulli(1 - p) per sample, scaled by 1 / (1 - p). (B, 1, 1) or None.
    if not train or p == 0.0:
        return None
    if rng is None:
        raise ValueError("drop_path > 0 in train mode needs rng=Backend.rng(seed)")
    keep = rng.random((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype) >= p
    mask = keep.astype(x.dtype)
    mask *= 1.0 / (1.0 - p)
    return mask


# ----------------------------------------------------------------------------------------------
# MLP: fc1 -> GELU -> dropout -> fc2 -> dropout


def mlp_forward(x, params, prefix, *, drop=0.0, rng=None, train=False, approximate="none"):
    """x (..., D) -> (..., D). See the module docstring."""
    w1, b1 = params[prefix + "fc1.weight"], params.get(prefix + "fc1.bias")
    w2, b2 = params[prefix + "fc2.weight"], params.get(prefix + "fc2.bias")
    # GELU(x w1^T + b1), (..., Hd): fc1 and its activation, one op so that the bias add and
    # GELU can share a pass on the GPU (ops/linear.py)
    h, c_fc1 = ops.linear_gelu_forward(x, w1, b1, approximate=approximate)
    h, c_d1 = maybe_dropout(h, drop, rng, train)
    out, c_fc2 = ops.linear_forward(h, w2, b2)
    out, c_d2 = maybe_dropout(out, drop, rng, train)  # (..., D)
    return out, ops.Cache(prefix=prefix, fc1=c_fc1, drop1=c_d1, fc2=c_fc2, drop2=c_d2)


def mlp_backward(dout, cache, grads, *, release=False):
    """Returns dx (..., D); adds fc1/fc2 gradients into grads.

    ``release=True`` (a block's backward inside encoder_backward) drops fc2's cache, the GELU
    output, once fc2's backward has run, and lets GELU's backward overwrite dh, fc2's input
    gradient: two (..., Hd) arrays fewer at the step's peak (both are dead by then).
    """
    prefix = cache.prefix
    dout = maybe_dropout_back(dout, cache.drop2)
    dh, dw2, db2 = ops.linear_backward(dout, cache.fc2)  # (..., Hd)
    if release:
        cache.fc2 = None
    accumulate(grads, prefix + "fc2.weight", dw2)
    accumulate(grads, prefix + "fc2.bias", db2)
    dh = maybe_dropout_back(dh, cache.drop1)
    # through GELU, then fc1: (..., D)
    dx, dw1, db1 = ops.linear_gelu_backward(dh, cache.fc1, overwrite_dout=release)
    accumulate(grads, prefix + "fc1.weight", dw1)
    accumulate(grads, prefix + "fc1.bias", db1)
    return dx


# ----------------------------------------------------------------------------------------------
# Pre-LN encoder block (timm's Block): x + attn(norm1(x)), then x + mlp(norm2(x))


def block_forward(
    x,
    params,
    prefix,
    num_heads,
    *,
    key_mask=None,
    eps=1e-6,
    drop=0.0,
    drop_path=0.0,
    rng=None,
    train=False,
):
    """x (B, N, D) -> (B, N, D). See the module docstring."""
    p = params
    # attention branch
    h, c_ln1 = ops.layernorm_forward(x, p[prefix + "norm1.weight"], p[prefix + "norm1.bias"], eps)
    a, c_attn = ops.attention_forward(
        h,
        p[prefix + "attn.qkv.weight"],
        p.get(prefix + "attn.qkv.bias"),
        p[prefix + "attn.proj.weight"],
        p.get(prefix + "attn.proj.bias"),
        num_heads,
        key_mask=key_mask,
    )  # (B, N, D)
    a, c_da = maybe_dropout(a, drop, rng, train)
    m_attn = _drop_path_mask(x, drop_path, rng, train)  # (B, 1, 1) or None
    if m_attn is not None:
        a = a * m_attn
    x1 = x + a  # (B, N, D) first residual
    # MLP branch
    h2, c_ln2 = ops.layernorm_forward(x1, p[prefix + "norm2.weight"], p[prefix + "norm2.bias"], eps)
    m, c_mlp = mlp_forward(h2, p, prefix + "mlp.", drop=drop, rng=rng, train=train)
    m_mlp = _drop_path_mask(x, drop_path, rng, train)
    if m_mlp is not None:
        m = m * m_mlp
    out = x1 + m  # (B, N, D) second residual
    cache = ops.Cache(
        prefix=prefix,
        ln1=c_ln1,
        attn_cache=c_attn,
        drop_attn=c_da,
        path_attn=m_attn,
        ln2=c_ln2,
        mlp=c_mlp,
        path_mlp=m_mlp,
        attn=c_attn.attn,  # (B, H, N, N), for attention maps
    )
    return out, cache


def block_backward(dout, cache, grads, *, release=False):
    """Returns dx (B, N, D); adds every block parameter's gradient into grads.

    ``release=True`` (encoder_backward) drops each part of ``cache`` once it has been used, so
    that the activations of the MLP are gone while the attention's backward runs.
    """
    prefix = cache.prefix
    # out = x1 + mlp(norm2(x1)): the skip passes dout straight to x1, the branch goes through mlp.
    dm = dout if cache.path_mlp is None else dout * cache.path_mlp
    dh2 = mlp_backward(dm, cache.mlp, grads, release=release)  # (B, N, D)
    if release:
        cache.mlp = None
    # dx1 = dx_skip + dx_branch: the norm's backward adds the skip's dout in the same pass
    dx1, dg2, db2 = ops.layernorm_backward(dh2, cache.ln2, skip=dout)  # (B, N, D)
    if release:
        cache.ln2 = None
    accumulate(grads, prefix + "norm2.weight", dg2)
    accumulate(grads, prefix + "norm2.bias", db2)
    # x1 = x + attn(norm1(x)): the same pattern once more.
    da = dx1 if cache.path_attn is None else dx1 * cache.path_attn
    da = maybe_dropout_back(da, cache.drop_attn)
    dh, dw_qkv, db_qkv, dw_proj, db_proj = ops.attention_backward(da, cache.attn_cache)
    if release:
        cache.attn_cache = cache.attn = None
    accumulate(grads, prefix + "attn.qkv.weight", dw_qkv)
    accumulate(grads, prefix + "attn.qkv.bias", db_qkv)
    accumulate(grads, prefix + "attn.proj.weight", dw_proj)
    accumulate(grads, prefix + "attn.proj.bias", db_proj)
    dx, dg1, db1 = ops.layernorm_backward(dh, cache.ln1, skip=dx1)  # dx_skip + dx_branch
    accumulate(grads, prefix + "norm1.weight", dg1)
    accumulate(grads, prefix + "norm1.bias", db1)
    return dx


# ----------------------------------------------------------------------------------------------
# Encoder: a stack of blocks


def encoder_forward(x, params, prefix, depth, num_heads, *, drop_path=0.0, **block_options):
    """x (B, N, D) -> (B, N, D) through blocks prefix+"0." ... prefix+f"{depth-1}.".

    drop_path is one rate for every block or a sequence of ``depth`` rates (timm's linear rule).
    Under ``ops.no_grad()`` no block's cache is kept (``cache.blocks`` is None): each block's
    activations are freed once the next block has its input.
    """
    rates = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
    if len(rates) != depth:
        raise ValueError(f"drop_path must be a float or {depth} rates, got {len(rates)} rates")
    keep = ops.grad_enabled()
    caches = []
    for i in range(depth):
        x, c = block_forward(
            x, params, f"{prefix}{i}.", num_heads, drop_path=rates[i], **block_options
        )
        if keep:
            caches.append(c)
        del c  # under no_grad() block i's activations go before block i+1 runs
    return x, ops.Cache(blocks=caches if keep else None)


def encoder_backward(dout, cache, grads):
    """Returns dx (B, N, D); the blocks in reverse order.

    Consumes ``cache.blocks``: each block's cache is dropped as soon as its backward has run, so
    the memory held falls as the backward proceeds (torch's backward frees its graph the same
    way). The peak of a train step is then the forward's activations, not those plus every
    parameter gradient; a second backward needs a new forward.
    """
    if cache.blocks is None:
        raise RuntimeError(
            "encoder_backward: the forward ran under no_grad() and kept no block caches"
        )
    if any(c is None for c in cache.blocks):
        raise RuntimeError(
            "encoder_backward: these block caches were consumed by an earlier backward; run the "
            "forward again"
        )
    dx = dout
    for i in reversed(range(len(cache.blocks))):
        block, cache.blocks[i] = cache.blocks[i], None  # consumed: only this call holds it now
        dx = block_backward(dx, block, grads, release=True)
    return dx


# ----------------------------------------------------------------------------------------------
# Parameter shapes and timm's initialisation


def block_param_shapes(prefix, dim, mlp_hidden, qkv_bias=True):
    """name -> shape for one block, in timm's state_dict order."""
    shapes = {
        prefix + "norm1.weight": (dim,),
        prefix + "norm1.bias": (dim,),
        prefix + "attn.qkv.weight": (3 * dim, dim),
        prefix + "attn.qkv.bias": (3 * dim,),
        prefix + "attn.proj.weight": (dim, dim),
        prefix + "attn.proj.bias": (dim,),
        prefix + "norm2.weight": (dim,),
        prefix + "norm2.bias": (dim,),
        prefix + "mlp.fc1.weight": (mlp_hidden, dim),
        prefix + "mlp.fc1.bias": (mlp_hidden,),
        prefix + "mlp.fc2.weight": (dim, mlp_hidden),
        prefix + "mlp.fc2.bias": (dim,),
    }
    if not qkv_bias:
        del shapes[prefix + "attn.qkv.bias"]
    return shapes


def trunc_normal(rng, shape, std=0.02, a=-2.0, b=2.0):
    """Normal(0, std) truncated to [a, b] (absolute bounds, as timm's trunc_normal_), float64.

    Out-of-range draws are redrawn until none is left.
    """
    out = rng.standard_normal(shape) * std
    xp = array_module(out)
    bad = (out < a) | (out > b)
    while bool(bad.any()):
        out = xp.where(bad, rng.standard_normal(shape) * std, out)
        bad = (out < a) | (out > b)
    return out


def init_block_params(prefix, dim, mlp_hidden, qkv_bias=True, *, rng):
    """timm's init for one block: float64 arrays on rng's backend (see the module docstring).

    Linear weights are drawn in state_dict order, so a seed gives the same block on any machine.
    """
    shapes = block_param_shapes(prefix, dim, mlp_hidden, qkv_bias)
    weights = {
        name: trunc_normal(rng, shape, std=0.02)
        for name, shape in shapes.items()
        if name.endswith(".weight") and ".norm" not in "." + name[len(prefix) :]
    }
    xp = array_module(next(iter(weights.values())))
    out = {}
    for name, shape in shapes.items():
        if name in weights:
            out[name] = weights[name]
        elif name.endswith(".weight"):  # layernorm scale
            out[name] = xp.ones(shape)
        else:  # biases and layernorm shifts
            out[name] = xp.zeros(shape)
    return out
