"""ViLT: one transformer over text tokens and image patches (early fusion), as dandelin/ViLT.

Shape legend: B batch, L text length (<= max_text_len), S image side, P patch side,
g = S/P patches per side, Np = g*g patches, K kept patches (Np unless max_image_len samples
fewer), I = 1 + K image tokens (CLS first), N = L + I fused tokens, D width, V vocabulary.

    input_ids (B, L)
      -> word + position + token-type(0) embeddings, LayerNorm(text_eps)   (B, L, D)
      -> + modality embedding 0                                           (B, L, D)
    images (B, C, S, S)
      -> patch_embed (a PxP stride-P conv as one GEMM)                    (B, Np, D)
      -> + position embeddings (bilinear, align_corners, for other grids)  (B, Np, D)
      -> keep K patches (all, in row-major order, unless max_image_len)   (B, K, D)
      -> [cls + pos_0 ; patches] + modality embedding 1                   (B, I, D)
    [text ; image]                                                        (B, N, D)
      -> depth x pre-LN block with the key-padding mask [text_mask ; image_mask]
      -> transformer.norm                                                 (B, N, D)
      -> text_feats (B, L, D), image_feats (B, I, D)
      -> pooled = tanh(pooler.dense(text_feats[:, 0]))                    (B, D)

``backward`` reads the list bottom-up. Heads and losses (ITM, MLM, WPA, VQA) live in
``minivit.models.vilt_heads``; docs/vilt.md walks through everything with shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .. import ops
from ..backend import _library_of, backend_of, get_backend, require_array
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
from .sharding import begin_consuming, sharded_backward, sharded_forward
from .vilt_heads import MLM_DECODER, WORD_EMBEDDINGS
from .vit import transformer_config

__all__ = ["ViLT", "interpolation_matrix"]


def interpolation_matrix(n_out: int, n_in: int):
    """The (n_out, n_in) matrix of 1-D linear interpolation with align_corners=True, as Python
    lists (PyTorch's ``interpolate(mode="bilinear", align_corners=True)`` along one axis)."""
    rows = []
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(src), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        w = src - lo
        row = [0.0] * n_in
        row[lo] += 1.0 - w
        row[hi] += w
        rows.append(row)
    return rows


def _same_values(a, b) -> bool:
    """Whether two arrays (NumPy or CuPy, either) hold the same shape and values."""
    if _library_of(a) is None or _library_of(b) is None or tuple(a.shape) != tuple(b.shape):
        return False
    host_a, host_b = (backend_of(x).to_numpy(x) for x in (a, b))
    return bool((host_a == host_b).all())


class ViLT(Model):
    """ViLT with a flat ``params`` dict keyed by the original ViLT checkpoint's names.

    Args:
        vocab_size, max_text_len: the text vocabulary and the longest caption (positions).
        img_size, patch_size, in_chans: the image the position embeddings are laid out for.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the shared encoder (blocks.py).
        eps: the encoder's layernorm epsilon; text_eps: that of the text embeddings and of the
            MLM transform (BERT's 1e-12).
        dtype: "float32" or "float64". backend: a name, a Backend or None.
        seed: seeds the initialisation (drawn on the host) and the patch-sampling generator.
        max_image_len: keyword only; if > 0, forward keeps at most this many patches per image,
            sampled with the model's seeded generator (the original samples too, but here the
            default -1 keeps every patch, in row-major order, so outputs are deterministic). It
            samples in every forward, inference included, as the original and Hugging Face do;
            ``forward(..., max_image_len=-1)`` keeps every patch for one call.
        num_vqa_labels: keyword only; > 0 adds the VQA classifier head ``vqa_classifier.*``.
        drop_rate: keyword only; dropout in training (``forward(..., train=True)``) where the
            original has it (its ``drop_rate``, 0.1 there; 0 here by default): after the text
            embeddings' LayerNorm, on the image tokens after their position embeddings, and in
            every block after the attention projection and in the MLP. Masks come from ``rng``.
        tie_mlm_decoder: keyword only; True makes the MLM decoder the word-embedding table, as
            Hugging Face's ``ViltForMaskedLM`` does (BERT's tie): ``params`` then has no
            ``mlm_score.decoder.weight``, and the table's gradient is the sum of its two uses.
            False (the default) keeps a decoder of its own, as the original ViLT does
            (docs/vilt.md, "MLM").
    """

    def __init__(
        self,
        vocab_size=30522,
        max_text_len=40,
        img_size=384,
        patch_size=32,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        eps=1e-6,
        text_eps=1e-12,
        dtype="float32",
        backend=None,
        seed=0,
        *,
        max_image_len=-1,
        num_vqa_labels=0,
        drop_rate=0.0,
        tie_mlm_decoder=False,
    ):
        # each bad value raises a ValueError (TypeError for a non-number) naming the argument;
        # the transformer's arguments are checked as ViT's are (no stochastic depth here)
        t = transformer_config(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, eps, drop_rate, 0)
        config = dict(
            vocab_size=int_arg("vocab_size", vocab_size),
            max_text_len=int_arg("max_text_len", max_text_len),
            img_size=int_arg("img_size", img_size),
            patch_size=int_arg("patch_size", patch_size),
            in_chans=int_arg("in_chans", in_chans),
            **{k: t[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")},
            eps=t["eps"],
            text_eps=float_arg("text_eps", text_eps),
            # <= 0 keeps every patch (-1 by default); > 0 samples that many
            max_image_len=int_arg("max_image_len", max_image_len, -math.inf),
            num_vqa_labels=int_arg("num_vqa_labels", num_vqa_labels, 0),
            drop_rate=t["drop_rate"],
            tie_mlm_decoder=bool(tie_mlm_decoder),
        )
        if config["img_size"] % config["patch_size"]:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self._setup(config, dtype, backend)  # dtype, backend, config (models/base.py)
        self.grid = self.img_size // self.patch_size
        self.num_patches = self.grid**2
        self.mlp_hidden = int(self.embed_dim * self.mlp_ratio)
        self.params = self._init_params(seed)
        self.rng = self.backend.rng(seed)  # patch sampling (max_image_len) and dropout masks
        self._interp = {}  # (grid_h, grid_w, h, w) -> (Nh*Nw, g*g) matrix on the backend

    # ------------------------------------------------------------------------------------------
    # parameters

    def param_shapes(self):
        """name -> shape, in the original checkpoint's order."""
        D, C, P, V = self.embed_dim, self.in_chans, self.patch_size, self.vocab_size
        s = {
            "text_embeddings.word_embeddings.weight": (V, D),
            "text_embeddings.position_embeddings.weight": (self.max_text_len, D),
            "text_embeddings.token_type_embeddings.weight": (2, D),
            "text_embeddings.LayerNorm.weight": (D,),
            "text_embeddings.LayerNorm.bias": (D,),
            "token_type_embeddings.weight": (2, D),
            "transformer.cls_token": (1, 1, D),
            "transformer.pos_embed": (1, 1 + self.num_patches, D),
            "transformer.patch_embed.proj.weight": (D, C, P, P),
            "transformer.patch_embed.proj.bias": (D,),
        }
        for i in range(self.depth):
            s.update(
                block_param_shapes(f"transformer.blocks.{i}.", D, self.mlp_hidden, self.qkv_bias)
            )
        s["transformer.norm.weight"] = (D,)
        s["transformer.norm.bias"] = (D,)
        s["pooler.dense.weight"] = (D, D)
        s["pooler.dense.bias"] = (D,)
        s["itm_score.fc.weight"] = (2, D)
        s["itm_score.fc.bias"] = (2,)
        s["mlm_score.bias"] = (V,)
        s["mlm_score.transform.dense.weight"] = (D, D)
        s["mlm_score.transform.dense.bias"] = (D,)
        s["mlm_score.transform.LayerNorm.weight"] = (D,)
        s["mlm_score.transform.LayerNorm.bias"] = (D,)
        if not self.tie_mlm_decoder:  # tied: the word embeddings serve (mlm_decoder_key)
            s[MLM_DECODER] = (V, D)
        if self.num_vqa_labels > 0:
            s["vqa_classifier.0.weight"] = (2 * D, D)
            s["vqa_classifier.0.bias"] = (2 * D,)
            s["vqa_classifier.1.weight"] = (2 * D,)
            s["vqa_classifier.1.bias"] = (2 * D,)
            s["vqa_classifier.3.weight"] = (self.num_vqa_labels, 2 * D)
            s["vqa_classifier.3.bias"] = (self.num_vqa_labels,)
        return s

    @property
    def mlm_decoder_key(self) -> str:
        """The name of the MLM decoder's (V, D) weight in ``params``: its own, or the word
        embeddings' when ``tie_mlm_decoder`` is set."""
        return WORD_EMBEDDINGS if self.tie_mlm_decoder else MLM_DECODER

    def load_state_dict(self, state_dict, strict=True):
        """As ``Model.load_state_dict``. A tied model (``tie_mlm_decoder``) also takes a state
        dict that has a decoder, as an untied model's or ``from_hf_vilt``'s output has, when the
        decoder equals the word embeddings beside it: the tie then loses nothing. A decoder that
        differs from them (an untied model after training) is refused: loading it would drop
        trained weights without a word."""
        if self.tie_mlm_decoder and isinstance(state_dict, Mapping) and MLM_DECODER in state_dict:
            dec, word = state_dict[MLM_DECODER], state_dict.get(WORD_EMBEDDINGS)
            if word is None:
                raise ValueError(
                    f"this ViLT ties its MLM decoder to {WORD_EMBEDDINGS} "
                    f"(tie_mlm_decoder=True): the state dict's {MLM_DECODER} needs that table "
                    "beside it, equal to it"
                )
            if dec is not word and not _same_values(dec, word):
                raise ValueError(
                    f"this ViLT ties its MLM decoder to {WORD_EMBEDDINGS} "
                    f"(tie_mlm_decoder=True), but the state dict's {MLM_DECODER} differs from "
                    "that table (an untied model's trained decoder?): load it into "
                    "ViLT(..., tie_mlm_decoder=False), or drop the key to tie the decoder to the "
                    "word embeddings"
                )
            state_dict = {k: v for k, v in state_dict.items() if k != MLM_DECODER}
        return super().load_state_dict(state_dict, strict)

    def _init_params(self, seed):
        # The original's init_weights: Linear and Embedding weights N(0, 0.02) (here truncated at
        # 2 std, as timm does for the vision part), zero biases, LayerNorm ones/zeros; the
        # patch conv keeps PyTorch's default U(+-1/sqrt(fan_in)); pos_embed and cls_token
        # trunc-normal 0.02 as timm's ViT.
        host = get_backend("numpy")
        rng = host.rng(seed)
        xp = host.xp
        D, C, P = self.embed_dim, self.in_chans, self.patch_size
        bound = 1.0 / (C * P * P) ** 0.5
        p = {}
        for name, shape in self.param_shapes().items():
            if name.startswith("transformer.blocks."):
                continue
            if name == "transformer.patch_embed.proj.weight":
                p[name] = rng.uniform(-bound, bound, shape)
            elif name == "transformer.patch_embed.proj.bias":
                p[name] = rng.uniform(-bound, bound, shape)
            elif (
                "LayerNorm.weight" in name
                or name.endswith("norm.weight")
                or name == "vqa_classifier.1.weight"
            ):
                p[name] = xp.ones(shape)
            elif name.endswith(".bias"):
                p[name] = xp.zeros(shape)
            else:
                p[name] = trunc_normal(rng, shape, std=0.02)
        for i in range(self.depth):
            p.update(
                init_block_params(
                    f"transformer.blocks.{i}.", D, self.mlp_hidden, self.qkv_bias, rng=rng
                )
            )
        return {k: self.backend.asarray(p[k], dtype=self.dtype) for k in self.param_shapes()}

    def to(self, backend):
        """As ``Model.to``; the cached position-interpolation matrices live on the old backend."""
        super().to(backend)
        self._interp = {}
        return self

    # ------------------------------------------------------------------------------------------
    # input checks

    def _check_inputs(self, input_ids, text_mask, images, image_mask, interpolate_pos_encoding):
        xp = self.backend.xp
        for name, a in (("input_ids", input_ids), ("text_mask", text_mask), ("images", images)):
            require_array(name, a)
            if backend_of(a).name != self.backend.name:
                raise TypeError(
                    f"{name} lives on backend {backend_of(a).name!r} but the model lives on "
                    f"{self.backend.name!r}; move it with Backend.asarray"
                )
        if input_ids.dtype.kind not in "iu":
            raise TypeError(f"input_ids must be an integer array, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if L > self.max_text_len:
            raise ValueError(
                f"text is longer than max_text_len: input_ids has {L} tokens per row, the model "
                f"has position embeddings for max_text_len={self.max_text_len}"
            )
        if L < 1:
            raise ValueError("input_ids must hold at least one token ([CLS]) per row")
        if tuple(text_mask.shape) != (B, L):
            raise ValueError(
                f"text_mask must have the shape of input_ids {(B, L)}, got {tuple(text_mask.shape)}"
            )
        if text_mask.dtype.kind not in "biu":
            raise TypeError(
                f"text_mask must be boolean (or integer 0/1), got dtype {text_mask.dtype}"
            )
        tmask = text_mask if text_mask.dtype.kind == "b" else text_mask != 0
        # The checks of values, read on the host in one transfer (one wait on a GPU).
        # (a batch of 0 has no ids to range over: min and max of a zero-size array raise)
        ids = input_ids if input_ids.size else xp.zeros(1, dtype=input_ids.dtype)
        checks = [ids.min(), ids.max(), tmask[:, 0].all()]
        if text_mask.dtype.kind != "b":
            checks.append((tmask == text_mask).all())  # integer masks: 0 and 1 only
        lo, hi, cls_valid, *zero_one = self.backend.host_values(*checks)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.vocab_size}), got the id {bad}"
            )
        if zero_one and not zero_one[0]:
            raise TypeError(
                f"text_mask must be boolean (or integer 0/1), got dtype {text_mask.dtype}"
            )
        if not cls_valid:
            raise ValueError("text_mask must mark the first token ([CLS]) of every row as valid")
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"images must have shape (B, {self.in_chans}, H, W) (in_chans={self.in_chans}), "
                f"got {tuple(images.shape)}"
            )
        if images.shape[0] != B:
            raise ValueError(
                f"images hold {images.shape[0]} images but input_ids holds {B} captions"
            )
        H, W = images.shape[2:]
        if (H, W) != (self.img_size, self.img_size):
            if not interpolate_pos_encoding:
                raise ValueError(
                    f"images must be {self.img_size}x{self.img_size} (img_size), got {H}x{W}; "
                    "pass interpolate_pos_encoding=True to interpolate the position embeddings"
                )
            if H % self.patch_size or W % self.patch_size:
                raise ValueError(
                    f"image size {H}x{W} must be divisible by patch_size {self.patch_size}"
                )
        if str(images.dtype) != self.dtype:
            raise TypeError(
                f"images must have the model's dtype {self.dtype}, got {images.dtype}; "
                f"convert them first (e.g. images.astype('{self.dtype}'))"
            )
        gh, gw = H // self.patch_size, W // self.patch_size
        if image_mask is None:
            pmask = xp.ones((B, gh * gw), dtype=bool)
        else:
            if backend_of(image_mask).name != self.backend.name:
                raise TypeError("image_mask must live on the model's backend")
            if image_mask.dtype.kind not in "biu":
                raise TypeError(f"image_mask must be boolean, got dtype {image_mask.dtype}")
            m = image_mask != 0
            if tuple(m.shape) == (B, H, W):  # a pixel mask, as HF's pixel_mask
                # nearest-neighbour down-sampling picks each patch's top-left pixel, as the
                # original's F.interpolate(pixel_mask, size=(gh, gw))
                m = m[:, :: self.patch_size, :: self.patch_size]
                pmask = m.reshape(B, gh * gw)
            elif tuple(m.shape) == (B, gh * gw):
                pmask = m
            else:
                raise ValueError(
                    f"image_mask must have shape (B, H, W) = {(B, H, W)} (pixels) or "
                    f"(B, Np) = {(B, gh * gw)} (patches), got {tuple(image_mask.shape)}"
                )
            if not bool(pmask.any(axis=1).all()):
                raise ValueError("image_mask leaves an image without any valid patch")
        return tmask, pmask, gh, gw

    # ------------------------------------------------------------------------------------------
    # position embeddings for a grid of valid patches

    def _pos_matrix(self, gh, gw, h, w):
        """(gh*gw, g*g) matrix: bilinear (align_corners) resize of the g x g table to h x w,
        placed at the top left of a gh x gw grid, zero rows elsewhere (the original pads)."""
        key = (gh, gw, h, w)
        if key not in self._interp:
            g = self.grid
            rh = interpolation_matrix(h, g)
            rw = interpolation_matrix(w, g)
            rows = []
            for i in range(gh):
                for j in range(gw):
                    if i < h and j < w:
                        rows.append([a * b for a in rh[i] for b in rw[j]])
                    else:
                        rows.append([0.0] * (g * g))
            self._interp[key] = self.backend.asarray(rows, dtype=self.dtype)
        return self._interp[key]

    # ------------------------------------------------------------------------------------------
    # forward and backward

    def forward_draws_random(self, inputs) -> bool:
        """Patch sampling (max_image_len > 0) and dropout in training draw from ``rng``."""
        k = inputs.get("max_image_len")
        sampling = (self.max_image_len if k is None else int(k)) > 0
        return sampling or super().forward_draws_random(inputs)  # dropout (models/base.py)

    @sharded_forward(
        batched=("input_ids", "text_mask", "images", "image_mask"),
        check=lambda m, a: m._check_inputs(
            a["input_ids"], a["text_mask"], a["images"], a["image_mask"],
            a["interpolate_pos_encoding"],
        ),
    )  # fmt: skip
    def forward(
        self,
        input_ids,
        text_mask,
        images,
        image_mask=None,
        *,
        interpolate_pos_encoding=False,
        max_image_len=None,
        train=False,
    ):
        """Returns a dict of
        text_feats (B, L, D), image_feats (B, I, D), pooled (B, D), text_mask (B, L) bool,
        image_mask (B, I) bool (CLS first), patch_index (B, K) (which patches, row-major ids)
        and attn (the blocks' (B, H, N, N) attention probabilities: a list, or after a
        sharded forward a ``JoinedList`` that joins each block's shards when it is read).

        Under ``minivit.no_grad()`` (inference) no cache is kept, so backward refuses and
        ``attn`` is None.

        ``image_mask``: None (all valid), a pixel mask (B, H, W) or a patch mask (B, Np).
        ``max_image_len`` overrides the constructor's; > 0 samples that many patches.
        ``train=True`` turns dropout on (``drop_rate`` > 0; none by default).
        """
        tmask, pmask, gh, gw = self._check_inputs(
            input_ids, text_mask, images, image_mask, interpolate_pos_encoding
        )
        self._drop_cache()  # the last forward's, now that the inputs are accepted (sharding.py)
        p = self.params
        xp = self.backend.xp
        B, L = input_ids.shape
        D = self.embed_dim
        Np = gh * gw
        c = ops.Cache(L=L, gh=gh, gw=gw, B=B)
        drop = self.drop_rate if train else 0.0

        # ---- text: BERT embeddings (token type 0 everywhere), then LayerNorm(text_eps)
        w_emb, c.word = ops.embedding_forward(
            input_ids, p["text_embeddings.word_embeddings.weight"]
        )
        t = w_emb + p["text_embeddings.position_embeddings.weight"][:L]  # (B, L, D)
        t += p["text_embeddings.token_type_embeddings.weight"][0]
        t, c.text_ln = ops.layernorm_forward(
            t,
            p["text_embeddings.LayerNorm.weight"],
            p["text_embeddings.LayerNorm.bias"],
            self.text_eps,
        )  # (B, L, D)
        t, c.text_drop = maybe_dropout(t, drop, self.rng, train)  # BERT's embedding dropout
        t = t + p["token_type_embeddings.weight"][0]  # modality 0 = text

        # ---- image: patches + (interpolated) position embeddings
        x, c.patch = ops.patch_embed_forward(
            images,
            p["transformer.patch_embed.proj.weight"],
            p["transformer.patch_embed.proj.bias"],
            self.patch_size,
        )  # (B, Np, D)
        spatial = p["transformer.pos_embed"][0, 1:]  # (g*g, D)
        pm = pmask.reshape(B, gh, gw)
        # valid rows and columns per image, read on the host in one transfer
        hw = self.backend.to_numpy(self.backend.xp.stack((pm[:, :, 0].sum(1), pm[:, 0, :].sum(1))))
        sizes = list(zip(hw[0].tolist(), hw[1].tolist()))
        if all(s == (self.grid, self.grid) for s in sizes) and (gh, gw) == (self.grid,) * 2:
            c.pos_mats = None
            x = x + spatial  # (B, Np, D), the native grid: no resampling
        else:
            # one matrix per distinct valid size (not per image): M (B, Np, g*g)
            mats = {s: self._pos_matrix(gh, gw, *s) for s in set(sizes)}
            M = xp.stack([mats[s] for s in sizes])  # (B, Np, g*g)
            c.pos_mats = M
            x = x + M @ spatial  # (B, Np, D)

        # ---- which patches: all (row-major) or a seeded sample of max_image_len of them
        K = self.max_image_len if max_image_len is None else int(max_image_len)
        if 0 < K < Np:
            # valid patches score in [1, 2), padding in [0, 1): the top K prefer valid ones
            score = pmask.astype(self.dtype) + self.rng.random((B, Np), dtype=self.dtype)
            keep = xp.argsort(-score, axis=1)[:, :K]  # (B, K)
            keep = xp.sort(keep, axis=1)  # row-major order among the kept
            x = xp.take_along_axis(x, keep[:, :, None], axis=1)  # (B, K, D)
            kmask = xp.take_along_axis(pmask, keep, axis=1)  # (B, K)
            c.keep = keep
        else:
            keep = xp.broadcast_to(xp.arange(Np), (B, Np))
            kmask = pmask
            c.keep = None
        cls = p["transformer.cls_token"][0] + p["transformer.pos_embed"][0, :1]  # (1, D)
        v = xp.concatenate([xp.broadcast_to(cls, (B, 1, D)), x], axis=1)  # (B, I, D)
        v, c.image_drop = maybe_dropout(v, drop, self.rng, train)  # the ViT's pos_drop
        v += p["token_type_embeddings.weight"][1]  # modality 1 = image (v is a fresh array)
        imask = xp.concatenate([xp.ones((B, 1), dtype=bool), kmask], axis=1)  # (B, I)

        # ---- fuse: text first, then image; one key-padding mask for both
        z = xp.concatenate([t, v], axis=1)  # (B, N, D)
        key_mask = xp.concatenate([tmask, imask], axis=1)  # (B, N)
        z, c.encoder = encoder_forward(
            z,
            p,
            "transformer.blocks.",
            self.depth,
            self.num_heads,
            key_mask=key_mask,
            eps=self.eps,
            drop=drop,
            rng=self.rng,
            train=train,
        )
        z, c.norm = ops.layernorm_forward(
            z, p["transformer.norm.weight"], p["transformer.norm.bias"], self.eps
        )  # (B, N, D)

        # ---- pooler on the text CLS
        h, c.pool_dense = ops.linear_forward(
            z[:, 0], p["pooler.dense.weight"], p["pooler.dense.bias"]
        )
        pooled, c.pool_tanh = ops.tanh_forward(h)  # (B, D)
        c.N = z.shape[1]
        self._cache = c  # dropped under no_grad() by the decorator (models/sharding.py)
        return dict(
            text_feats=z[:, :L],
            image_feats=z[:, L:],
            pooled=pooled,
            text_mask=tmask,
            image_mask=imask,
            patch_index=keep,
            attn=None if c.encoder.blocks is None else [b.attn for b in c.encoder.blocks],
        )

    # the outputs backward takes gradients for (the keys of its dict; models/sharding.py)
    output_grad_keys = ("text_feats", "image_feats", "pooled")

    @sharded_backward
    def backward(self, grads, *, input_grad=True):
        """grads: a dict with any of text_feats (B, L, D), image_feats (B, I, D), pooled (B, D)
        (a missing key or None counts as zero; each shape must be its output's, and any other
        key or a plain array is refused before anything is computed). Overwrites
        ``self.grads`` with every parameter's gradient (heads the grads do not reach get zeros)
        and returns dimages (B, C, H, W), or None with ``input_grad=False`` (training needs no
        image gradient)."""
        # the decorator has checked that there is a cache and that ``grads`` fits the forward's
        # output: a dict of output_grad_keys, each None or of its output's shape (sharding.py)
        c = self._cache
        p = self.params
        xp = self.backend.xp
        B, L, N, D = c.B, c.L, c.N, self.embed_dim
        g = {}
        dz = xp.zeros((B, N, D), dtype=self.dtype)  # (B, N, D)
        if grads.get("text_feats") is not None:
            dz[:, :L] += grads["text_feats"]
        if grads.get("image_feats") is not None:
            dz[:, L:] += grads["image_feats"]
        if grads.get("pooled") is not None:
            (dh,) = ops.tanh_backward(grads["pooled"], c.pool_tanh)
            dcls, g["pooler.dense.weight"], g["pooler.dense.bias"] = ops.linear_backward(
                dh, c.pool_dense
            )
            dz[:, 0] += dcls  # pooled read only the text CLS
        dz, g["transformer.norm.weight"], g["transformer.norm.bias"] = ops.layernorm_backward(
            dz, c.norm
        )
        begin_consuming(c)  # an error from here on leaves the cache incomplete
        c.norm = None  # consumed, as the blocks' caches will be (blocks.encoder_backward)
        dz = encoder_backward(dz, c.encoder, g)  # (B, N, D)
        dt, dv = dz[:, :L], dz[:, L:]  # (B, L, D), (B, I, D)

        # ---- image side: modality row 1 was added to every image token
        dtt = xp.zeros((2, D), dtype=self.dtype)
        dtt[1] = dv.sum(axis=(0, 1))
        dtt[0] = dt.sum(axis=(0, 1))
        g["token_type_embeddings.weight"] = dtt
        dv = maybe_dropout_back(dv, c.image_drop)  # (B, I, D)
        dcls = dv[:, 0].sum(axis=0)  # (D,) cls_token and pos_embed[0] were added to it
        g["transformer.cls_token"] = dcls.reshape(1, 1, D)
        dx = dv[:, 1:]  # (B, K, D)
        Np = c.gh * c.gw
        if c.keep is not None:  # scatter the kept patches back to the grid (indices unique)
            full = xp.zeros((B, Np, D), dtype=self.dtype)
            full[xp.arange(B)[:, None], c.keep] = dx
            dx = full  # (B, Np, D)
        dpos = xp.zeros_like(p["transformer.pos_embed"])  # (1, 1 + g*g, D)
        dpos[0, 0] = dcls
        if c.pos_mats is None:
            dpos[0, 1:] = dx.sum(axis=0)
        else:  # x += M @ spatial  =>  dspatial = sum_b M_b^T dx_b
            dpos[0, 1:] = (c.pos_mats.transpose(0, 2, 1) @ dx).sum(axis=0)
        g["transformer.pos_embed"] = dpos
        (
            dimages,
            g["transformer.patch_embed.proj.weight"],
            g["transformer.patch_embed.proj.bias"],
        ) = ops.patch_embed_backward(dx, c.patch, need_dx=input_grad)

        # ---- text side: t = dropout(LN(word + pos + type0)) + modality0
        dt = maybe_dropout_back(dt, c.text_drop)
        dt, g["text_embeddings.LayerNorm.weight"], g["text_embeddings.LayerNorm.bias"] = (
            ops.layernorm_backward(dt, c.text_ln)
        )
        (g["text_embeddings.word_embeddings.weight"],) = ops.embedding_backward(dt, c.word)
        dpe = xp.zeros_like(p["text_embeddings.position_embeddings.weight"])
        dpe[:L] = dt.sum(axis=0)
        g["text_embeddings.position_embeddings.weight"] = dpe
        dte = xp.zeros((2, D), dtype=self.dtype)
        dte[0] = dt.sum(axis=(0, 1))
        g["text_embeddings.token_type_embeddings.weight"] = dte

        self.grads = {k: g[k] if k in g else xp.zeros_like(v) for k, v in p.items()}
        return dimages


# ----------------------------------------------------------------------------------------------
# named configs

# The published checkpoint (dandelin/vilt-b32-mlm): BERT's vocabulary, 384px images, ViT-B/32.
register_config("vilt_b32_mlm", ViLT)
# The small model `minivit train vilt` trains on the generated shapes (48px, 3x3 patches of 16px).
register_config(
    "vilt_shapes_small",
    ViLT,
    vocab_size=23,
    max_text_len=16,
    img_size=48,
    patch_size=16,
    embed_dim=96,
    depth=3,
    num_heads=4,
    mlp_ratio=2.0,
)
