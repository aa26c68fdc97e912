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

``backward`` is the same list read bottom-up; docs/vit.md walks through both with shapes.
"""

from __future__ import annotations

from .. import ops
from ..backend import backend_of, get_backend
from ..blocks import (
    block_param_shapes,
    encoder_backward,
    encoder_forward,
    init_block_params,
    trunc_normal,
)
from .registry import register_config

__all__ = ["ViT", "load_state_dict_into"]


class ViT:
    """A ViT with a flat ``params`` dict keyed by timm's state_dict names.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
        qkv_bias: timm's meanings. ``num_classes=0`` drops the head (forward returns the pooled
            CLS features (B, D), as timm does).
        eps: layernorm epsilon (timm's ViT uses 1e-6).
        drop_rate: dropout after the position embedding, the attention projection, in the MLP and
            before the head (timm's drop_rate / proj_drop_rate / pos_drop_rate).
        drop_path_rate: stochastic depth, rising linearly from 0 to this rate over the blocks.
        global_pool: "token" (the CLS token after the final ``norm``, timm's default) or "avg"
            (the mean of the patch tokens, then ``fc_norm``; timm's names for it).
        pos_embed_init: "trunc_normal" (timm, std 0.02) or "sincos" (2D sine-cosine codes as the
            starting value; the embedding is learned either way).
        dtype: "float32" or "float64".
        backend: a name, a Backend or None ($MINIVIT_BACKEND).
        seed: seeds the initialisation (always drawn on the host, so every backend starts from
            the same weights) and the dropout generator.
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
        drop_rate=0.0,
        drop_path_rate=0.0,
        global_pool="token",
        pos_embed_init="trunc_normal",
        dtype="float32",
        backend=None,
        seed=0,
    ):
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide embed_dim {embed_dim}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if pos_embed_init not in ("trunc_normal", "sincos"):
            raise ValueError(
                f"pos_embed_init must be 'trunc_normal' or 'sincos', got {pos_embed_init!r}"
            )
        backend = get_backend(backend)
        try:  # accept "float32", numpy.float32, numpy.dtype("float32"), ...
            dtype = backend.xp.dtype(dtype).name
        except TypeError:
            pass
        if str(dtype) not in ("float32", "float64"):
            raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if not 0.0 <= drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(
                f"drop_rate and drop_path_rate must be in [0, 1), got {drop_rate}, {drop_path_rate}"
            )
        self.config = dict(
            img_size=int(img_size),
            patch_size=int(patch_size),
            in_chans=int(in_chans),
            num_classes=int(num_classes),
            embed_dim=int(embed_dim),
            depth=int(depth),
            num_heads=int(num_heads),
            mlp_ratio=float(mlp_ratio),
            qkv_bias=bool(qkv_bias),
            eps=float(eps),
            drop_rate=float(drop_rate),
            drop_path_rate=float(drop_path_rate),
            global_pool=str(global_pool),
            pos_embed_init=str(pos_embed_init),
        )
        self.__dict__.update(self.config)
        self.dtype = str(dtype)
        self.backend = backend
        self.num_patches = (self.img_size // self.patch_size) ** 2
        self.mlp_hidden = int(self.embed_dim * self.mlp_ratio)
        # Stochastic depth rises linearly over the blocks, as in timm.
        self.drop_path = [
            self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)
        ]
        self.params = self._init_params(seed)
        self.grads = {}
        self.rng = self.backend.rng(seed)  # dropout masks
        self._cache = None

    # ------------------------------------------------------------------------------------------
    # parameters

    def param_shapes(self):
        """name -> shape, in timm's state_dict order."""
        D, C, P = self.embed_dim, self.in_chans, self.patch_size
        shapes = {
            "cls_token": (1, 1, D),
            "pos_embed": (1, 1 + self.num_patches, D),
            "patch_embed.proj.weight": (D, C, P, P),
            "patch_embed.proj.bias": (D,),
        }
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

    def _init_params(self, seed):
        # timm: pos_embed trunc-normal 0.02, cls_token normal 1e-6, Linear weights trunc-normal
        # 0.02 with zero biases, LayerNorm ones/zeros; the patch conv keeps PyTorch's default
        # (kaiming-uniform a=sqrt(5), i.e. U(+-1/sqrt(fan_in)) for weight and bias).
        host = get_backend("numpy")
        rng = host.rng(seed)
        xp = host.xp
        D, C, P = self.embed_dim, self.in_chans, self.patch_size
        fan_in = C * P * P
        bound = 1.0 / fan_in**0.5
        pos = trunc_normal(rng, (1, 1 + self.num_patches, D), std=0.02)
        if self.pos_embed_init == "sincos":
            pos = sincos_2d_pos_embed(self.img_size // self.patch_size, D, xp)
        p = {
            "cls_token": rng.standard_normal((1, 1, D)) * 1e-6,
            "pos_embed": pos,
            "patch_embed.proj.weight": rng.uniform(-bound, bound, (D, C, P, P)),
            "patch_embed.proj.bias": rng.uniform(-bound, bound, (D,)),
        }
        for i in range(self.depth):
            p.update(init_block_params(f"blocks.{i}.", D, self.mlp_hidden, self.qkv_bias, rng=rng))
        norm = "norm" if self.global_pool == "token" else "fc_norm"
        p[f"{norm}.weight"] = xp.ones(D)
        p[f"{norm}.bias"] = xp.zeros(D)
        if self.num_classes > 0:
            p["head.weight"] = trunc_normal(rng, (self.num_classes, D), std=0.02)
            p["head.bias"] = xp.zeros(self.num_classes)
        return {k: self.backend.asarray(v, dtype=self.dtype) for k, v in p.items()}

    def state_dict(self):
        """name -> numpy array (a host copy), in timm's order."""
        return {k: self.backend.to_numpy(v).copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays (numpy or this backend) into ``params``, cast to the model's dtype.

        With strict=True every missing, unexpected and mis-shaped key is named in one
        ValueError. With strict=False only mis-shaped keys raise; missing keys keep their values
        and unexpected ones are ignored. Returns (missing, unexpected) like PyTorch.
        """
        return load_state_dict_into(self, state_dict, strict)

    def zero_grads(self):
        self.grads = {}

    # ------------------------------------------------------------------------------------------
    # forward and backward

    def _check_images(self, images):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", None)
        if shape is None or dtype is None:
            raise TypeError(f"images must be an array, got {type(images).__name__}")
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

    def forward_features(self, images, train=False):
        """images (B, C, S, S) -> final-norm tokens (B, T, D). Keeps the cache for backward."""
        self._check_images(images)
        p = self.params
        xp = self.backend.xp
        B = images.shape[0]
        D = self.embed_dim
        drop = self.drop_rate if train else 0.0
        c = ops.Cache(train=train)

        x, c.patch = ops.patch_embed_forward(
            images, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], self.patch_size
        )  # (B, N, D)
        cls = xp.broadcast_to(p["cls_token"], (B, 1, D))  # (B, 1, D)
        x = xp.concatenate([cls, x], axis=1)  # (B, T, D)
        x += p["pos_embed"]  # broadcast over the batch
        x, c.pos_drop = ops.dropout_forward(x, drop, rng=self.rng, train=train)
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
        self._cache = c
        return x  # (B, T, D)

    def forward(self, images, train=False):
        """images (B, C, S, S) -> logits (B, K) (pooled features (B, D) when num_classes=0)."""
        x = self.forward_features(images, train)
        c = self._cache
        drop = self.drop_rate if train else 0.0
        if self.global_pool == "token":
            pooled = x[:, 0]  # (B, D) the CLS token
        else:
            pooled = x[:, 1:].mean(axis=1)  # (B, D) mean over the patch tokens
            pooled, c.fc_norm = ops.layernorm_forward(
                pooled, self.params["fc_norm.weight"], self.params["fc_norm.bias"], self.eps
            )
        pooled, c.head_drop = ops.dropout_forward(pooled, drop, rng=self.rng, train=train)
        if self.num_classes == 0:
            c.head = None
            return pooled
        logits, c.head = ops.linear_forward(
            pooled, self.params["head.weight"], self.params["head.bias"]
        )
        return logits  # (B, K)

    def backward(self, dlogits):
        """dlogits (B, K) -> dimages (B, C, S, S). Overwrites ``grads`` with every parameter's.

        The chain rule in reverse order of forward; residuals are added inside block_backward.
        """
        c = self._cache
        if c is None:
            raise RuntimeError("backward called before forward: run forward(images) first")
        xp = self.backend.xp
        g = {}
        # head: logits = pooled W^T + b
        if c.head is not None:
            dpooled, g["head.weight"], g["head.bias"] = ops.linear_backward(dlogits, c.head)
        else:
            dpooled = dlogits
        (dpooled,) = ops.dropout_backward(dpooled, c.head_drop)  # (B, D)
        B, T, D = dpooled.shape[0], 1 + self.num_patches, self.embed_dim
        dx = xp.zeros((B, T, D), dtype=dpooled.dtype)  # (B, T, D)
        if self.global_pool == "token":
            # pooled = x[:, 0]: only the CLS row receives gradient; then the final norm
            dx[:, 0] = dpooled
            dx, g["norm.weight"], g["norm.bias"] = ops.layernorm_backward(dx, c.norm)
        else:
            # pooled = fc_norm(mean of the N patch rows): each patch row gets 1/N of it
            dpooled, g["fc_norm.weight"], g["fc_norm.bias"] = ops.layernorm_backward(
                dpooled, c.fc_norm
            )
            dx[:, 1:] = (dpooled / self.num_patches)[:, None, :]
        # encoder blocks, last to first (each adds its parameter grads into g)
        dx = encoder_backward(dx, c.encoder, g)  # (B, T, D)
        (dx,) = ops.dropout_backward(dx, c.pos_drop)
        # x = [cls; patches] + pos_embed: pos_embed is shared by the batch, cls by every image
        g["pos_embed"] = dx.sum(axis=0, keepdims=True)  # (1, T, D)
        g["cls_token"] = dx[:, :1].sum(axis=0, keepdims=True)  # (1, 1, D)
        dimages, g["patch_embed.proj.weight"], g["patch_embed.proj.bias"] = (
            ops.patch_embed_backward(dx[:, 1:], c.patch)
        )  # (B, C, S, S)
        self.grads = {k: g[k] for k in self.params}  # timm's order
        return dimages

    def __call__(self, images, train=False):
        return self.forward(images, train)

    def num_params(self):
        return sum(int(v.size) for v in self.params.values())

    def __repr__(self):
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"ViT({cfg}, dtype={self.dtype!r}, backend={self.backend.name!r})"


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


def load_state_dict_into(model, state_dict, strict=True):
    """Shared by the models: check names and shapes against model.params, then copy.

    Returns (missing, unexpected). Raises one ValueError naming every problem.
    """
    expected = {k: tuple(v.shape) for k, v in model.params.items()}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k}: expected {expected[k]}, got {given[k]}"
        for k in expected
        if k in given and given[k] != expected[k]
    ]
    problems = []
    if misshaped:
        problems.append("mis-shaped keys: " + "; ".join(misshaped))
    if strict and missing:
        problems.append("missing keys: " + ", ".join(missing))
    if strict and unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if problems:
        raise ValueError(
            f"state_dict does not match {type(model).__name__}: " + " | ".join(problems)
        )
    be = model.backend
    for k in expected:
        if k in state_dict:
            v = state_dict[k]
            if getattr(v, "dtype", None) is not None and v.dtype.kind != "f":
                raise TypeError(f"state_dict[{k!r}] must be a floating array, got {v.dtype}")
            model.params[k] = be.asarray(be.to_numpy(v), dtype=model.dtype).copy()
    return missing, unexpected


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
