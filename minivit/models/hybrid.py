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

``HybridViT`` is a ``ViT`` subclass that replaces only the patch embedding: ``_embed_forward``
(backbone -> 1x1 proj) and ``_embed_backward`` (the same read bottom-up, each residual gradient
added where the paths meet), with their parameters. ``ViT.forward`` and ``ViT.backward`` run the
rest, the token pipeline, unchanged.
"""

from __future__ import annotations

from .. import ops
from ..blocks import trunc_normal
from .base import float_arg, int_arg
from .registry import register_config
from .vit import ViT, transformer_config

__all__ = ["HybridViT"]

BACKBONE = "patch_embed.backbone."


def _gn_groups(channels: int, max_groups: int) -> int:
    """The largest group count <= max_groups that divides ``channels``."""
    g = max(1, min(max_groups, channels))
    while channels % g:
        g -= 1
    return g


def _stages_arg(stages):
    """``stages`` checked: a list of [channels >= 1, num_blocks >= 1, stride >= 1] (lists or
    tuples of three ints), returned as a list of lists."""
    if isinstance(stages, (str, bytes)) or not hasattr(stages, "__iter__"):
        raise TypeError(f"stages must be a list of [channels, num_blocks, stride], got {stages!r}")
    out = []
    for i, entry in enumerate(stages):
        if isinstance(entry, (str, bytes)) or not hasattr(entry, "__len__") or len(entry) != 3:
            raise ValueError(
                f"stages[{i}] must be [channels, num_blocks, stride] (three ints), got {entry!r}"
            )
        parts = zip(("channels", "num_blocks", "stride"), entry)
        out.append([int_arg(f"stages[{i}] {what}", v) for what, v in parts])
    return out


class HybridViT(ViT):
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
        transformer = transformer_config(
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias, eps, drop_rate, drop_path_rate
        )
        stem_kernel = int_arg("stem_kernel", stem_kernel)
        if stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be a positive odd int, got {stem_kernel}")
        config = dict(
            img_size=int_arg("img_size", img_size),
            in_chans=int_arg("in_chans", in_chans),
            num_classes=int_arg("num_classes", num_classes, 0),  # 0: no head
            stem_chs=int_arg("stem_chs", stem_chs),
            stem_kernel=stem_kernel,
            stem_pool=bool(stem_pool),
            stages=_stages_arg(stages),
            gn_groups=int_arg("gn_groups", gn_groups),
            gn_eps=float_arg("gn_eps", gn_eps),
            **transformer,
        )
        stages = config["stages"]
        self._setup(config, dtype, backend)
        # ViT's token pipeline with timm's defaults: pool the CLS token after the final norm.
        self.global_pool = "token"

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
        self._build(seed)

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
    # parameters: ViT's, with the backbone and the 1x1 proj as the patch embedding

    def _embed_param_shapes(self):
        """The backbone's parameters, then the 1x1 proj (ViT.param_shapes puts cls_token and
        pos_embed before them and the encoder, norm and head after)."""
        C, k = self.in_chans, self.stem_kernel
        shapes = {
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
        shapes["patch_embed.proj.weight"] = (self.embed_dim, self.feature_chs, 1, 1)
        shapes["patch_embed.proj.bias"] = (self.embed_dim,)
        return shapes

    def _init_embed_params(self, rng, xp):
        # Convs: He (kaiming) normal, fan_out, for ReLU nets as torchvision/timm ResNets; norms
        # ones/zeros except each block's last norm scale, which starts at zero so every residual
        # block starts as the identity (timm's zero_init_last). Then cls_token, pos_embed and
        # the proj as ViT's (ViT._init_params draws the encoder and head after these).
        p = {}
        for name, shape in self._embed_param_shapes().items():
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
        return p

    # ------------------------------------------------------------------------------------------
    # cost

    def stem_flops(self, batch_size: int) -> float:
        """Forward FLOPs of the stem convolution ("same" size), the layer that reads the images."""
        k = self.stem_kernel
        return 2.0 * batch_size * self.img_size**2 * self.stem_chs * self.in_chans * k * k

    def forward_flops(self, batch_size: int) -> float:
        """Forward GEMM FLOPs of one batch (2 per multiply-add; convs, proj, encoder, head),
        the numerator of a roofline figure; norms and activations are left out."""
        B, S = batch_size, self.img_size
        f = self.stem_flops(B)
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
        """images (B, C, S, S) -> (features (B, F, h, w), cache); the cache is None under
        ``no_grad()``, where each op's cache is dropped as soon as the next op has run."""
        p = self.params
        keep = ops.grad_enabled()
        c = ops.Cache()
        k = self.stem_kernel
        stem = BACKBONE + "stem."
        x, c.stem_conv = ops.conv2d_forward(images, p[stem + "conv.weight"], None, 1, k // 2)
        x, c.stem_norm = self._gn(x, stem + "norm")
        x, c.stem_relu = ops.relu_forward(x)  # (B, stem_chs, S, S)
        c.stem_pool = None
        if self.stem_pool:
            x, c.stem_pool = ops.maxpool2d_forward(x, 2)  # (B, stem_chs, S/2, S/2)
        if keep:
            c.blocks = []
        else:
            c = None  # inference: the stem's caches go now
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
            if keep:
                c.blocks.append(bc)
            del bc, h, s  # under no_grad() this block's activations go now
        return x, c  # (B, F, h, w)

    def _backbone_backward(self, dx, c, g, input_grad=True):
        """dfeatures (B, F, h, w) -> dimages (None without input_grad); backbone parameter
        grads go into ``g``."""
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
        dimages, g[stem + "conv.weight"], _ = ops.conv2d_backward(
            dx, c.stem_conv, need_dx=input_grad
        )
        return dimages  # (B, C, S, S)

    # ------------------------------------------------------------------------------------------
    # the patch embedding: backbone, then the 1x1 proj. ViT.forward_features / ViT.backward call
    # these in place of the PxP patch conv; the rest of the model is ViT's token pipeline.

    def _embed_forward(self, images, c):
        """images (B, C, S, S) -> tokens (B, N, D): the CNN, then the 1x1 proj."""
        feat, c.backbone = self._backbone_forward(images)  # (B, F, h, w)
        # The 1x1 proj is a patch embedding with 1x1 patches: (B, F, h, w) -> (B, N, D), the
        # positions in row-major order.
        x, c.proj = ops.patch_embed_forward(
            feat, self.params["patch_embed.proj.weight"], self.params["patch_embed.proj.bias"], 1
        )  # (B, N, D)
        return x

    def _embed_backward(self, dx, c, g, input_grad=True):
        """dtokens (B, N, D) -> dimages (B, C, S, S): the proj's backward, then the CNN's."""
        dfeat, g["patch_embed.proj.weight"], g["patch_embed.proj.bias"] = ops.patch_embed_backward(
            dx, c.proj
        )  # (B, F, h, w)
        return self._backbone_backward(dfeat, c.backbone, g, input_grad)  # (B, C, S, S)


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
