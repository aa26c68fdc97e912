"""The Vision Transformer, computed exactly as timm's ``VisionTransformer`` (class token pooling).

Shape legend: B batch, C channels, S image side, P patch side, N = (S/P)^2 patches, T = 1 + N
tokens (CLS first), D width, K classes.

    images (B, C, S, S)
      -> patch_embed (a PxP stride-P conv as one GEMM)         (B, N, D)
      -> [cls_token; patches] + pos_embed, dropout              (B, T, D)
      -> depth x pre-LN block (blocks.py)                       (B, T, D)
      -> norm (layernorm)                                       (B, T, D)
      -> take the CLS token, dropout                            (B, D)
      -> head (linear)                                          (B, K)

``backward`` is the same list read bottom-up; docs/vit.md walks through both with shapes. The
patch embedding is the one stage a subclass replaces (``_embed_param_shapes``,
``_init_embed_params``, ``_embed_forward``, ``_embed_backward``): HybridViT puts a CNN there.
"""

from __future__ import annotations

from .. import ops
from ..backend import backend_of, get_backend, require_array
from ..blocks import (
    block_param_shapes,
    encoder_backward,
    encoder_forward,
    init_block_params,
    maybe_dropout,
    maybe_dropout_back,
    trunc_normal,
)
from .base import Model, float_arg, int_arg
from .registry import register_config
from .sharding import (
    ShardedRun,
    begin_consuming,
    join,
    on_each_shard,
    shard_query,
    sharded_backward,
    sharded_forward,
)

# The forward's batch shards (models/sharding.py): the images carry the batch, checked whole.
_images_shard = sharded_forward(
    batched=("images",), check=lambda m, a: m._check_images(a["images"])
)

__all__ = ["ViT"]


class ViT(Model):
    """A ViT with a flat ``params`` dict keyed by timm's state_dict names.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
        qkv_bias: timm's meanings. ``num_classes=0`` drops the head (forward returns the pooled
            CLS features (B, D), as timm does).
        eps: layernorm epsilon (timm's ViT uses 1e-6).
        dtype: "float32" or "float64".
        backend: a name, a Backend or None ($MINIVIT_BACKEND).
        seed: seeds the initialisation (always drawn on the host, so every backend starts from
            the same weights) and the dropout generator.

    Keyword only (the positional order above is the public API's, shared/API.md):
        drop_rate: dropout after the position embedding, the attention projection, in the MLP and
            before the head (timm's drop_rate / proj_drop_rate / pos_drop_rate).
        drop_path_rate: stochastic depth, rising linearly from 0 to this rate over the blocks.
        global_pool: "token" (the CLS token after the final ``norm``, timm's default) or "avg"
            (the mean of the patch tokens, then ``fc_norm``; timm's names for it).
        pos_embed_init: "trunc_normal" (timm, std 0.02) or "sincos" (2D sine-cosine codes as the
            starting value; the embedding is learned either way).
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        eps=1e-6,
        dtype="float32",
        backend=None,
        seed=0,
        *,
        drop_rate=0.0,
        drop_path_rate=0.0,
        global_pool="token",
        pos_embed_init="trunc_normal",
    ):
        img_size = int_arg("img_size", img_size)
        patch_size = int_arg("patch_size", patch_size)
        in_chans = int_arg("in_chans", in_chans)
        num_classes = int_arg("num_classes", num_classes, 0)  # 0: no head
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        transformer = transformer_config(
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias, eps, drop_rate, drop_path_rate
        )
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if pos_embed_init not in ("trunc_normal", "sincos"):
            raise ValueError(
                f"pos_embed_init must be 'trunc_normal' or 'sincos', got {pos_embed_init!r}"
            )
        config = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            **transformer,
            global_pool=str(global_pool),
            pos_embed_init=str(pos_embed_init),
        )
        self._setup(config, dtype, backend)
        self.num_patches = (self.img_size // self.patch_size) ** 2
        self._build(seed)

    def _build(self, seed):
        """The parts that follow from the config once ``num_patches`` is known: the MLP width,
        the stochastic-depth rates, the parameters and the dropout generator."""
        self.mlp_hidden = int(self.embed_dim * self.mlp_ratio)
        # Stochastic depth rises linearly over the blocks, as in timm.
        self.drop_path = [
            self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)
        ]
        self.params = self._init_params(seed)
        self.rng = self.backend.rng(seed)  # dropout masks

    # ------------------------------------------------------------------------------------------
    # parameters

    def param_shapes(self):
        """name -> shape, in timm's state_dict order."""
        D = self.embed_dim
        shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + self.num_patches, D)}
        shapes.update(self._embed_param_shapes())
        for i in range(self.depth):
            shapes.update(block_param_shapes(f"blocks.{i}.", D, self.mlp_hidden, self.qkv_bias))
        # timm: "token" pooling normalises every token (norm); "avg" pooling normalises the
        # pooled vector instead (fc_norm) and has no final norm.
        norm = "norm" if self.global_pool == "token" else "fc_norm"
        shapes[f"{norm}.weight"] = (D,)
        shapes[f"{norm}.bias"] = (D,)
        if self.num_classes > 0:
            shapes["head.weight"] = (self.num_classes, D)
            shapes["head.bias"] = (self.num_classes,)
        return shapes

    def _embed_param_shapes(self):
        """The patch embedding's parameters: one PxP conv."""
        D, C, P = self.embed_dim, self.in_chans, self.patch_size
        return {"patch_embed.proj.weight": (D, C, P, P), "patch_embed.proj.bias": (D,)}

    def _init_params(self, seed):
        # timm: cls_token normal 1e-6, Linear weights trunc-normal 0.02 with zero biases,
        # LayerNorm ones/zeros. The embedding's parameters (and pos_embed) come first, from
        # _init_embed_params, then the encoder and head from the same host generator.
        host = get_backend("numpy")
        rng = host.rng(seed)
        xp = host.xp
        D = self.embed_dim
        p = self._init_embed_params(rng, xp)
        for i in range(self.depth):
            p.update(init_block_params(f"blocks.{i}.", D, self.mlp_hidden, self.qkv_bias, rng=rng))
        norm = "norm" if self.global_pool == "token" else "fc_norm"
        p[f"{norm}.weight"] = xp.ones(D)
        p[f"{norm}.bias"] = xp.zeros(D)
        if self.num_classes > 0:
            p["head.weight"] = trunc_normal(rng, (self.num_classes, D), std=0.02)
            p["head.bias"] = xp.zeros(self.num_classes)
        return {k: self.backend.asarray(p[k], dtype=self.dtype) for k in self.param_shapes()}

    def _init_embed_params(self, rng, xp):
        """cls_token, pos_embed and the patch conv, drawn from the host generator ``rng``."""
        # timm: pos_embed trunc-normal 0.02; the patch conv keeps PyTorch's default
        # (kaiming-uniform a=sqrt(5), i.e. U(+-1/sqrt(fan_in)) for weight and bias).
        D, C, P = self.embed_dim, self.in_chans, self.patch_size
        bound = 1.0 / (C * P * P) ** 0.5
        pos = trunc_normal(rng, (1, 1 + self.num_patches, D), std=0.02)
        if self.pos_embed_init == "sincos":
            pos = sincos_2d_pos_embed(self.img_size // self.patch_size, D, xp)
        return {
            "cls_token": rng.standard_normal((1, 1, D)) * 1e-6,
            "pos_embed": pos,
            "patch_embed.proj.weight": rng.uniform(-bound, bound, (D, C, P, P)),
            "patch_embed.proj.bias": rng.uniform(-bound, bound, (D,)),
        }

    # ------------------------------------------------------------------------------------------
    # forward and backward

    def _check_images(self, images):
        shape, dtype = require_array("images", images).shape, images.dtype
        expected = (self.in_chans, self.img_size, self.img_size)
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (B, {self.in_chans}, {self.img_size}, {self.img_size}) "
                f"(in_chans={self.in_chans}, img_size={self.img_size}), got {tuple(shape)}"
            )
        if str(dtype) != self.dtype:
            raise TypeError(
                f"images must have the model's dtype {self.dtype}, got {dtype}; "
                f"convert them first (e.g. images.astype('{self.dtype}'))"
            )
        if backend_of(images).name != self.backend.name:
            raise TypeError(
                f"images live on backend {backend_of(images).name!r} but the model lives on "
                f"{self.backend.name!r}; move them with Backend.asarray"
            )

    def _embed_forward(self, images, c):
        """images (B, C, S, S) -> patch tokens (B, N, D); what backward needs goes into ``c``."""
        x, c.patch = ops.patch_embed_forward(
            images,
            self.params["patch_embed.proj.weight"],
            self.params["patch_embed.proj.bias"],
            self.patch_size,
        )  # (B, N, D)
        return x

    def _embed_backward(self, dx, c, g, input_grad=True):
        """dtokens (B, N, D) -> dimages (B, C, S, S) (None without input_grad); the
        embedding's grads go into ``g``."""
        dimages, g["patch_embed.proj.weight"], g["patch_embed.proj.bias"] = (
            ops.patch_embed_backward(dx, c.patch, need_dx=input_grad)
        )
        return dimages  # (B, C, S, S)

    @_images_shard
    def forward_features(self, images, train=False):
        """images (B, C, S, S) -> final-norm tokens (B, T, D). Keeps the cache for backward
        (none under ``minivit.no_grad()``)."""
        x, self._cache = self._features(images, train)  # dropped under no_grad() (sharding.py)
        return x  # (B, T, D)

    def _features(self, images, train):
        """forward_features' work: (tokens (B, T, D), cache)."""
        self._check_images(images)
        self._drop_cache()  # the last forward's, now that the inputs are accepted (sharding.py)
        p = self.params
        xp = self.backend.xp
        B = images.shape[0]
        D = self.embed_dim
        drop = self.drop_rate if train else 0.0
        c = ops.Cache(train=train)

        x = self._embed_forward(images, c)  # (B, N, D)
        if not ops.grad_enabled():
            c = ops.Cache(train=train)  # inference: the embedding's caches go now
        cls = xp.broadcast_to(p["cls_token"], (B, 1, D))  # (B, 1, D)
        x = xp.concatenate([cls, x], axis=1)  # (B, T, D)
        x += p["pos_embed"]  # broadcast over the batch
        x, c.pos_drop = maybe_dropout(x, drop, self.rng, train)
        x, c.encoder = encoder_forward(
            x,
            p,
            "blocks.",
            self.depth,
            self.num_heads,
            eps=self.eps,
            drop=drop,
            drop_path=self.drop_path,
            rng=self.rng,
            train=train,
        )  # (B, T, D)
        if self.global_pool == "token":
            x, c.norm = ops.layernorm_forward(x, p["norm.weight"], p["norm.bias"], self.eps)
        return x, c

    @_images_shard
    def forward(self, images, train=False):
        """images (B, C, S, S) -> logits (B, K) (pooled features (B, D) when num_classes=0).

        Keeps the cache for backward. Under ``minivit.no_grad()`` (inference) it keeps none:
        each block's activations are freed as the next block runs, and backward refuses.
        """
        x, c = self._features(images, train)
        self._cache = c  # dropped under no_grad() by the decorator (models/sharding.py)
        drop = self.drop_rate if train else 0.0
        if self.global_pool == "token":
            pooled = x[:, 0]  # (B, D) the CLS token
        else:
            pooled = x[:, 1:].mean(axis=1)  # (B, D) mean over the patch tokens
            pooled, c.fc_norm = ops.layernorm_forward(
                pooled, self.params["fc_norm.weight"], self.params["fc_norm.bias"], self.eps
            )
        pooled, c.head_drop = maybe_dropout(pooled, drop, self.rng, train)
        if self.num_classes == 0:
            c.head = None
            return pooled
        logits, c.head = ops.linear_forward(
            pooled, self.params["head.weight"], self.params["head.bias"]
        )
        return logits  # (B, K)

    def cached_attention(self):
        """Each block's attention probabilities from the last forward, first block first: a
        list of ``depth`` arrays (B, H, T, T), T = 1 + number of patches."""
        c = self._cache
        if c is None:
            raise self._no_cache_error("cached_attention")
        if not isinstance(c, ShardedRun):
            return _block_attention(self)
        parts = on_each_shard(c, _block_attention)  # per shard, each block's maps
        return [join(self.backend.xp, [p[i] for p in parts]) for i in range(self.depth)]

    @sharded_backward
    def backward(self, dlogits, *, input_grad=True):
        """dlogits (B, K) -> dimages (B, C, S, S). Overwrites ``grads`` with every parameter's.

        The chain rule in reverse order of forward; residuals are added inside block_backward.
        ``input_grad=False`` skips the image gradient (returns None), as training does.
        ``dlogits`` must have the shape of the forward's output (checked before anything runs,
        whatever the thread count: models/sharding.check_output_grad).
        """
        # there is one, made by forward() (not forward_features()): the decorator has checked
        c = self._cache
        xp = self.backend.xp
        g = {}
        # head: logits = pooled W^T + b
        if c.head is not None:
            dpooled, g["head.weight"], g["head.bias"] = ops.linear_backward(dlogits, c.head)
        else:
            dpooled = dlogits
        dpooled = maybe_dropout_back(dpooled, c.head_drop)  # (B, D)
        B, T, D = dpooled.shape[0], 1 + self.num_patches, self.embed_dim
        dx = xp.zeros((B, T, D), dtype=dpooled.dtype)  # (B, T, D)
        if self.global_pool == "token":
            # pooled = x[:, 0]: only the CLS row receives gradient; then the final norm
            dx[:, 0] = dpooled
            dx, g["norm.weight"], g["norm.bias"] = ops.layernorm_backward(dx, c.norm)
            begin_consuming(c)  # an error from here on leaves the cache incomplete
            c.norm = None  # consumed, as the blocks' caches will be (blocks.encoder_backward)
        else:
            # pooled = fc_norm(mean of the N patch rows): each patch row gets 1/N of it
            dpooled, g["fc_norm.weight"], g["fc_norm.bias"] = ops.layernorm_backward(
                dpooled, c.fc_norm
            )
            begin_consuming(c)
            c.fc_norm = None
            dx[:, 1:] = (dpooled / self.num_patches)[:, None, :]
        # encoder blocks, last to first (each adds its parameter grads into g)
        dx = encoder_backward(dx, c.encoder, g)  # (B, T, D)
        dx = maybe_dropout_back(dx, c.pos_drop)
        # x = [cls; patches] + pos_embed: pos_embed is shared by the batch, cls by every image
        g["pos_embed"] = dx.sum(axis=0, keepdims=True)  # (1, T, D)
        g["cls_token"] = dx[:, :1].sum(axis=0, keepdims=True)  # (1, 1, D)
        dimages = self._embed_backward(dx[:, 1:], c, g, input_grad)  # (B, C, S, S)
        self.grads = {k: g[k] for k in self.params}  # timm's order
        return dimages


def transformer_config(
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias, eps, drop_rate, drop_path_rate
):
    """The transformer's arguments of a ViT-like model, checked, typed, in ``config`` order.

    Each bad value raises a ValueError (TypeError for a non-number) naming the argument."""
    embed_dim = int_arg("embed_dim", embed_dim)
    depth = int_arg("depth", depth, 0)  # 0: no blocks (the embeddings, norm and head alone)
    num_heads = int_arg("num_heads", num_heads)
    if embed_dim % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide embed_dim {embed_dim}")
    mlp_ratio = float_arg("mlp_ratio", mlp_ratio, 0.0, above=True)
    if int(embed_dim * mlp_ratio) < 1:
        raise ValueError(
            f"mlp_ratio {mlp_ratio} leaves the MLP no hidden unit at embed_dim {embed_dim} "
            f"(its width is int(embed_dim * mlp_ratio) = 0)"
        )
    return dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=bool(qkv_bias),
        eps=float_arg("eps", eps),
        drop_rate=float_arg("drop_rate", drop_rate, 0.0, 1.0, below=True),
        drop_path_rate=float_arg("drop_path_rate", drop_path_rate, 0.0, 1.0, below=True),
    )


def sincos_2d_pos_embed(grid, dim, xp):
    """(1, 1 + grid^2, dim) fixed 2D sine-cosine position codes (MAE, "Better plain ViT
    baselines"), a zero row for the CLS token: used here only as an *initial* value of the
    learned pos_embed. A quarter of the channels each hold sin(y w), cos(y w), sin(x w),
    cos(x w) for frequencies w = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1."""
    if dim % 4:
        raise ValueError(f"sincos position embedding needs embed_dim divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000.0 ** (xp.arange(q) / q)  # (q,)
    ys, xs = xp.meshgrid(xp.arange(grid), xp.arange(grid), indexing="ij")  # (g, g) each
    ty = ys.reshape(-1, 1) * omega  # (g*g, q)
    tx = xs.reshape(-1, 1) * omega
    codes = xp.concatenate([xp.sin(ty), xp.cos(ty), xp.sin(tx), xp.cos(tx)], axis=1)
    return xp.concatenate([xp.zeros((1, dim)), codes], axis=0)[None]  # (1, 1 + g*g, dim)


# ----------------------------------------------------------------------------------------------
# named configs (timm's, plus a small one for the 8x8 digits)

register_config(
    "vit_tiny_patch16_224", ViT, img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3
)
register_config(
    "vit_small_patch16_224", ViT, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6
)
register_config(
    "vit_base_patch16_224", ViT, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12
)
register_config(
    "vit_base_patch32_384", ViT, img_size=384, patch_size=32, embed_dim=768, depth=12, num_heads=12
)
# 8x8 digits (sklearn load_digits): 2x2 patches give 16 tokens + CLS.
register_config(
    "vit_digits",
    ViT,
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=2.0,
    pos_embed_init="sincos",  # 16 tokens of 4 pixels: position must count from the first step
)


@shard_query
def _block_attention(model):
    """Each block's attention probabilities held by one model's (or shard's) forward cache."""
    return [b.attn for b in model._cache.encoder.blocks]
