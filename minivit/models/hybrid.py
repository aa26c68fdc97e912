"""The Hybrid ViT: a small ResNet-style CNN makes the feature map whose positions become tokens.

Shape legend: B batch, C image channels, S image side, F feature channels, h x w feature grid,
N = h w tokens, T = 1 + N (CLS first), D width, K classes.

    images (B, C, S, S)
      -> backbone.stem: conv kxk (no bias) -> group norm -> ReLU [-> 2x2 max-pool]
      -> backbone.stages: residual basic blocks                  (B, F, h, w)
           out = ReLU(norm2(conv2(ReLU(norm1(conv1(x))))) + shortcut(x)),
           shortcut = downsample.norm(downsample.conv(x)) (1x1, stride) when the shape changes
      -> patch_embed.proj: a 1x1 conv, i.e. one linear map per position  (B, N, D)
      -> [cls_token; tokens] + pos_embed, dropout                (B, T, D)
      -> depth x pre-LN block (blocks.py, shared with ViT)       (B, T, D)
      -> norm, CLS token, dropout, head                          (B, K)

The transformer half is exactly ViT's (same ops, same names); only the patch embedding differs:
the "patches" are the feature map's positions, as in timm's ``HybridEmbed`` (a backbone followed
by a 1x1 ``proj`` conv). Parameter names follow timm's hybrid models where they apply:
``patch_embed.backbone.stem.conv.weight``, ``patch_embed.backbone.stages.0.blocks.0.conv1.weight``,
``patch_embed.proj.weight`` (D, F, 1, 1), ``blocks.N...``, ``norm``, ``head``, ``cls_token``,
``pos_embed``. (timm's ResNetV2 blocks are pre-activation bottlenecks; ours are post-activation
basic blocks, so only the names, not the weights, carry over.) The norm is group norm, as in
timm's ResNetV2 backbones: stateless, so train and eval compute the same function.

``backward`` is the forward read bottom-up, each residual gradient added where the paths meet.
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
from .vit import load_state_dict_into

__all__ = ["HybridViT"]

BACKBONE = "patch_embed.backbone."


def _gn_groups(channels: int, max_groups: int) -> int:
    """The largest group count <= max_groups that divides ``channels``."""
    g = max(1, min(max_groups, channels))
    while channels % g:
        g -= 1
    return g


class HybridViT:
    """ViT on the feature map of a hand-written CNN stem, with a flat timm-named ``params`` dict.

    Args:
        img_size, in_chans, num_classes: the input images and classes (``num_classes=0``: no
            head, forward returns the pooled CLS features (B, D)).
        stem_chs: channels of the stem conv; stem_kernel: its (odd) kernel side, "same" padding.
        stem_pool: a 2x2 max-pool after the stem (halves the grid).
        stages: a list of ``[channels, num_blocks, stride]``, one entry per stage of residual
            basic blocks; the first block of a stage applies the stride (a 3x3 conv and a 1x1
            shortcut conv with that stride). ``[]``: the stem alone.
        gn_groups: at most this many groups in every group norm (fewer where they must divide
            the channels); gn_eps: its epsilon (PyTorch's 1e-5).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, eps, drop_rate, drop_path_rate: the
            transformer, with ViT's meanings.
        dtype, backend, seed: as ViT (the initialisation is drawn on the host from ``seed``).

    Attributes ``grid`` (h, w) and ``patch_size`` (the backbone's total stride, so that
    ``img_size // patch_size`` is the token grid side, as for ViT) describe the tokens.
    """

    def __init__(
        self,
        img_size=8,
        in_chans=1,
        num_classes=10,
        stem_chs=32,
        stem_kernel=3,
        stem_pool=False,
        stages=((64, 1, 2),),
        gn_groups=8,
        gn_eps=1e-5,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        qkv_bias=True,
        eps=1e-6,
        drop_rate=0.0,
        drop_path_rate=0.0,
        dtype="float32",
        backend=None,
        seed=0,
    ):
        if embed_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide embed_dim {embed_dim}")
        if str(dtype) not in ("float32", "float64"):
            raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if stem_kernel < 1 or stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be a positive odd int, got {stem_kernel}")
        stages = [[int(c), int(n), int(s)] for c, n, s in stages]
        for i, (c, n, s) in enumerate(stages):
            if c < 1 or n < 1 or s < 1:
                raise ValueError(f"stages[{i}] must be [channels >= 1, blocks >= 1, stride >= 1]")
        if not 0.0 <= drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(
                f"drop_rate and drop_path_rate must be in [0, 1), got {drop_rate}, {drop_path_rate}"
            )
        self.config = dict(
            img_size=int(img_size),
            in_chans=int(in_chans),
            num_classes=int(num_classes),
            stem_chs=int(stem_chs),
            stem_kernel=int(stem_kernel),
            stem_pool=bool(stem_pool),
            stages=stages,
            gn_groups=int(gn_groups),
            gn_eps=float(gn_eps),
            embed_dim=int(embed_dim),
            depth=int(depth),
            num_heads=int(num_heads),
            mlp_ratio=float(mlp_ratio),
            qkv_bias=bool(qkv_bias),
            eps=float(eps),
            drop_rate=float(drop_rate),
            drop_path_rate=float(drop_path_rate),
        )
        self.__dict__.update(self.config)
        self.dtype = str(dtype)
        self.backend = get_backend(backend)

        # The grid after the backbone: "same" convs keep the size, the pool and strides shrink it.
        side, reduction = self.img_size, 1
        if self.stem_pool:
            if side < 2:
                raise ValueError(f"img_size {img_size} is too small for the stem's 2x2 max-pool")
            side, reduction = side // 2, 2
        for _, _, s in stages:
            side = ops.conv_output_size(side, 3, s, 1)
            reduction *= s
        self.grid = (side, side)
        self.num_patches = side * side
        self.patch_size = reduction
        self.feature_chs = stages[-1][0] if stages else self.stem_chs
        self.mlp_hidden = int(self.embed_dim * self.mlp_ratio)
        self.drop_path = [
            self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)
        ]
        self.params = self._init_params(seed)
        self.grads = {}
        self.rng = self.backend.rng(seed)  # dropout masks
        self._cache = None

    # ------------------------------------------------------------------------------------------
    # the backbone's layout

    def _blocks(self):
        """(prefix, in_chs, out_chs, stride, has_downsample) for every residual block, in order."""
        out, c_in = [], self.stem_chs
        for si, (c, n, s) in enumerate(self.stages):
            for bi in range(n):
                stride = s if bi == 0 else 1
                prefix = f"{BACKBONE}stages.{si}.blocks.{bi}."
                out.append((prefix, c_in, c, stride, stride != 1 or c_in != c))
                c_in = c
        return out

    # ------------------------------------------------------------------------------------------
    # parameters

    def param_shapes(self):
        """name -> shape: backbone, proj, then ViT's names in timm's order."""
        D, C, k = self.embed_dim, self.in_chans, self.stem_kernel
        shapes = {
            "cls_token": (1, 1, D),
            "pos_embed": (1, 1 + self.num_patches, D),
            BACKBONE + "stem.conv.weight": (self.stem_chs, C, k, k),
            BACKBONE + "stem.norm.weight": (self.stem_chs,),
            BACKBONE + "stem.norm.bias": (self.stem_chs,),
        }
        for prefix, cin, cout, _, down in self._blocks():
            shapes[prefix + "conv1.weight"] = (cout, cin, 3, 3)
            shapes[prefix + "norm1.weight"] = (cout,)
            shapes[prefix + "norm1.bias"] = (cout,)
            shapes[prefix + "conv2.weight"] = (cout, cout, 3, 3)
            shapes[prefix + "norm2.weight"] = (cout,)
            shapes[prefix + "norm2.bias"] = (cout,)
            if down:
                shapes[prefix + "downsample.conv.weight"] = (cout, cin, 1, 1)
                shapes[prefix + "downsample.norm.weight"] = (cout,)
                shapes[prefix + "downsample.norm.bias"] = (cout,)
        shapes["patch_embed.proj.weight"] = (D, self.feature_chs, 1, 1)
        shapes["patch_embed.proj.bias"] = (D,)
        for i in range(self.depth):
            shapes.update(block_param_shapes(f"blocks.{i}.", D, self.mlp_hidden, self.qkv_bias))
        shapes["norm.weight"] = (D,)
        shapes["norm.bias"] = (D,)
        if self.num_classes > 0:
            shapes["head.weight"] = (self.num_classes, D)
            shapes["head.bias"] = (self.num_classes,)
        return shapes

    def _init_params(self, seed):
        # Convs: He (kaiming) normal, fan_out, for ReLU nets as torchvision/timm ResNets; norms
        # ones/zeros except each block's last norm scale, which starts at zero so every residual
        # block starts as the identity (timm's zero_init_last). The transformer half as ViT.
        host = get_backend("numpy")
        rng = host.rng(seed)
        xp = host.xp
        p = {}
        for name, shape in self.param_shapes().items():
            if name.startswith(BACKBONE) and len(shape) == 4:  # conv weights
                fan_out = shape[0] * shape[2] * shape[3]
                p[name] = rng.standard_normal(shape) * (2.0 / fan_out) ** 0.5
            elif name.startswith(BACKBONE) and name.endswith(".weight"):  # group norm scales
                p[name] = xp.zeros(shape) if name.endswith("norm2.weight") else xp.ones(shape)
            elif name.startswith(BACKBONE):  # group norm shifts
                p[name] = xp.zeros(shape)
        D, F = self.embed_dim, self.feature_chs
        bound = 1.0 / F**0.5  # PyTorch's default conv init for the 1x1 proj (fan_in = F)
        p["cls_token"] = rng.standard_normal((1, 1, D)) * 1e-6
        p["pos_embed"] = trunc_normal(rng, (1, 1 + self.num_patches, D), std=0.02)
        p["patch_embed.proj.weight"] = rng.uniform(-bound, bound, (D, F, 1, 1))
        p["patch_embed.proj.bias"] = rng.uniform(-bound, bound, (D,))
        for i in range(self.depth):
            p.update(init_block_params(f"blocks.{i}.", D, self.mlp_hidden, self.qkv_bias, rng=rng))
        p["norm.weight"] = xp.ones(D)
        p["norm.bias"] = xp.zeros(D)
        if self.num_classes > 0:
            p["head.weight"] = trunc_normal(rng, (self.num_classes, D), std=0.02)
            p["head.bias"] = xp.zeros(self.num_classes)
        order = self.param_shapes()
        return {k: self.backend.asarray(p[k], dtype=self.dtype) for k in order}

    def state_dict(self):
        """name -> numpy array (a host copy)."""
        return {k: self.backend.to_numpy(v).copy() for k, v in self.params.items()}

    def load_state_dict(self, state_dict, strict=True):
        """As ViT.load_state_dict: one ValueError naming every missing/unexpected/mis-shaped key;
        returns (missing, unexpected)."""
        return load_state_dict_into(self, state_dict, strict)

    def zero_grads(self):
        self.grads = {}

    def num_params(self):
        return sum(int(v.size) for v in self.params.values())

    def forward_flops(self, batch_size: int) -> float:
        """Forward GEMM FLOPs of one batch (2 per multiply-add; convs, proj, encoder, head),
        the numerator of a roofline figure; norms and activations are left out."""
        B, S, k = batch_size, self.img_size, self.stem_kernel
        f = 2.0 * B * S * S * self.stem_chs * self.in_chans * k * k  # stem conv, "same" size
        side = S // 2 if self.stem_pool else S
        for _, cin, cout, stride, down in self._blocks():
            side_out = ops.conv_output_size(side, 3, stride, 1)
            px = B * side_out * side_out
            f += 2.0 * px * cout * (cin * 9 + cout * 9 + (cin if down else 0))
            side = side_out
        N, T, D = self.num_patches, 1 + self.num_patches, self.embed_dim
        f += 2.0 * B * N * self.feature_chs * D  # 1x1 proj
        per_block = 2.0 * B * T * D * (4 * D + 2 * self.mlp_hidden) + 4.0 * B * T * T * D
        f += self.depth * per_block
        f += 2.0 * B * D * max(self.num_classes, 0)
        return f

    # ------------------------------------------------------------------------------------------
    # backbone: forward and backward

    def _gn(self, x, name):
        """Group norm with the parameters ``name.weight`` / ``name.bias``."""
        C = x.shape[1]
        return ops.groupnorm_forward(
            x,
            self.params[name + ".weight"],
            self.params[name + ".bias"],
            _gn_groups(C, self.gn_groups),
            self.gn_eps,
        )

    def _backbone_forward(self, images):
        p = self.params
        c = ops.Cache()
        k = self.stem_kernel
        stem = BACKBONE + "stem."
        x, c.stem_conv = ops.conv2d_forward(images, p[stem + "conv.weight"], None, 1, k // 2)
        x, c.stem_norm = self._gn(x, stem + "norm")
        x, c.stem_relu = ops.relu_forward(x)  # (B, stem_chs, S, S)
        c.stem_pool = None
        if self.stem_pool:
            x, c.stem_pool = ops.maxpool2d_forward(x, 2)  # (B, stem_chs, S/2, S/2)
        c.blocks = []
        for prefix, _, _, stride, down in self._blocks():
            bc = ops.Cache()
            h, bc.conv1 = ops.conv2d_forward(x, p[prefix + "conv1.weight"], None, stride, 1)
            h, bc.norm1 = self._gn(h, prefix + "norm1")
            h, bc.relu1 = ops.relu_forward(h)
            h, bc.conv2 = ops.conv2d_forward(h, p[prefix + "conv2.weight"], None, 1, 1)
            h, bc.norm2 = self._gn(h, prefix + "norm2")  # (B, Cout, h', w')
            if down:
                s, bc.down_conv = ops.conv2d_forward(
                    x, p[prefix + "downsample.conv.weight"], None, stride, 0
                )
                s, bc.down_norm = self._gn(s, prefix + "downsample.norm")
            else:
                s = x  # identity shortcut
            x, bc.relu_out = ops.relu_forward(h + s)  # (B, Cout, h', w')
            c.blocks.append(bc)
        return x, c  # (B, F, h, w)

    def _backbone_backward(self, dx, c, g):
        """dfeatures (B, F, h, w) -> dimages; backbone parameter grads go into ``g``."""
        for (prefix, _, _, _, down), bc in reversed(list(zip(self._blocks(), c.blocks))):
            (dsum,) = ops.relu_backward(dx, bc.relu_out)  # d(h + s): both paths get it
            if down:
                ds, g[prefix + "downsample.norm.weight"], g[prefix + "downsample.norm.bias"] = (
                    ops.groupnorm_backward(dsum, bc.down_norm)
                )
                dx_skip, g[prefix + "downsample.conv.weight"], _ = ops.conv2d_backward(
                    ds, bc.down_conv
                )
            else:
                dx_skip = dsum
            dh, g[prefix + "norm2.weight"], g[prefix + "norm2.bias"] = ops.groupnorm_backward(
                dsum, bc.norm2
            )
            dh, g[prefix + "conv2.weight"], _ = ops.conv2d_backward(dh, bc.conv2)
            (dh,) = ops.relu_backward(dh, bc.relu1)
            dh, g[prefix + "norm1.weight"], g[prefix + "norm1.bias"] = ops.groupnorm_backward(
                dh, bc.norm1
            )
            dx_branch, g[prefix + "conv1.weight"], _ = ops.conv2d_backward(dh, bc.conv1)
            dx = dx_branch + dx_skip  # the block's input fed both paths
        stem = BACKBONE + "stem."
        if c.stem_pool is not None:
            (dx,) = ops.maxpool2d_backward(dx, c.stem_pool)
        (dx,) = ops.relu_backward(dx, c.stem_relu)
        dx, g[stem + "norm.weight"], g[stem + "norm.bias"] = ops.groupnorm_backward(dx, c.stem_norm)
        dimages, g[stem + "conv.weight"], _ = ops.conv2d_backward(dx, c.stem_conv)
        return dimages  # (B, C, S, S)

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

        feat, c.backbone = self._backbone_forward(images)  # (B, F, h, w)
        # The 1x1 proj is a patch embedding with 1x1 patches: (B, F, h, w) -> (B, N, D), the
        # positions in row-major order.
        x, c.proj = ops.patch_embed_forward(
            feat, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], 1
        )  # (B, N, D)
        cls = xp.broadcast_to(p["cls_token"], (B, 1, D))  # (B, 1, D)
        x = xp.concatenate([cls, x], axis=1)  # (B, T, D)
        x += p["pos_embed"]
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
        x, c.norm = ops.layernorm_forward(x, p["norm.weight"], p["norm.bias"], self.eps)
        self._cache = c
        return x

    def forward(self, images, train=False):
        """images (B, C, S, S) -> logits (B, K) (pooled features (B, D) when num_classes=0)."""
        x = self.forward_features(images, train)
        c = self._cache
        drop = self.drop_rate if train else 0.0
        pooled = x[:, 0]  # (B, D) the CLS token
        pooled, c.head_drop = ops.dropout_forward(pooled, drop, rng=self.rng, train=train)
        if self.num_classes == 0:
            c.head = None
            return pooled
        logits, c.head = ops.linear_forward(
            pooled, self.params["head.weight"], self.params["head.bias"]
        )
        return logits  # (B, K)

    def backward(self, dlogits):
        """dlogits (B, K) -> dimages (B, C, S, S). Overwrites ``grads`` with every parameter's."""
        c = self._cache
        if c is None:
            raise RuntimeError("backward called before forward: run forward(images) first")
        xp = self.backend.xp
        g = {}
        if c.head is not None:
            dpooled, g["head.weight"], g["head.bias"] = ops.linear_backward(dlogits, c.head)
        else:
            dpooled = dlogits
        (dpooled,) = ops.dropout_backward(dpooled, c.head_drop)  # (B, D)
        B, T, D = dpooled.shape[0], 1 + self.num_patches, self.embed_dim
        dx = xp.zeros((B, T, D), dtype=dpooled.dtype)  # only the CLS row was read
        dx[:, 0] = dpooled
        dx, g["norm.weight"], g["norm.bias"] = ops.layernorm_backward(dx, c.norm)
        dx = encoder_backward(dx, c.encoder, g)  # (B, T, D)
        (dx,) = ops.dropout_backward(dx, c.pos_drop)
        g["pos_embed"] = dx.sum(axis=0, keepdims=True)  # (1, T, D)
        g["cls_token"] = dx[:, :1].sum(axis=0, keepdims=True)  # (1, 1, D)
        dfeat, g["patch_embed.proj.weight"], g["patch_embed.proj.bias"] = ops.patch_embed_backward(
            dx[:, 1:], c.proj
        )  # (B, F, h, w)
        dimages = self._backbone_backward(dfeat, c.backbone, g)  # (B, C, S, S)
        self.grads = {k: g[k] for k in self.params}
        return dimages

    def __call__(self, images, train=False):
        return self.forward(images, train)

    def __repr__(self):
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"HybridViT({cfg}, dtype={self.dtype!r}, backend={self.backend.name!r})"


# ----------------------------------------------------------------------------------------------
# named configs

# 8x8 digits: a 3x3 stem at 32 channels, one residual block with stride 2 to 64 channels, so the
# 4x4 feature grid gives 16 tokens + CLS, as vit_digits's 2x2 patches do.
register_config(
    "hybrid_digits",
    HybridViT,
    img_size=8,
    in_chans=1,
    num_classes=10,
    stem_chs=32,
    stem_kernel=3,
    stem_pool=False,
    stages=[[64, 1, 2]],
    embed_dim=64,
    depth=2,
    num_heads=4,
    mlp_ratio=2.0,
)
# 32x32 RGB (CIFAR-sized), ResNet-18-like at small width: 3x3 stem, three stages of two basic
# blocks (32, 64 and 128 channels, strides 1, 2, 2) give an 8x8 grid, 64 tokens, of width 192.
register_config(
    "hybrid_resnet_small_32",
    HybridViT,
    img_size=32,
    in_chans=3,
    num_classes=10,
    stem_chs=32,
    stem_kernel=3,
    stem_pool=False,
    stages=[[32, 2, 1], [64, 2, 2], [128, 2, 2]],
    gn_groups=8,
    embed_dim=192,
    depth=6,
    num_heads=3,
    mlp_ratio=4.0,
)
