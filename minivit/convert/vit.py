"""ViT weights from other namings into minivit's (which are timm's), and position-embedding resize.

Three namings are understood (an optional leading ``vit.`` or ``model.`` is ignored):

* timm: ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.attn.qkv.*``, ... —
  validated and passed through.
* Hugging Face hub checkpoints (``model.safetensors`` as published):
  ``vit.embeddings.{cls_token, position_embeddings, patch_embeddings.projection.*}``,
  ``vit.encoder.layer.N.attention.attention.{query,key,value}.*``,
  ``vit.encoder.layer.N.attention.output.dense.*``, ``vit.encoder.layer.N.intermediate.dense.*``,
  ``vit.encoder.layer.N.output.dense.*``, ``vit.encoder.layer.N.layernorm_{before,after}.*``,
  ``vit.layernorm.*``, ``classifier.*``.
* transformers 5 in memory (``ViTForImageClassification().state_dict()``):
  ``vit.layers.N.attention.{q,k,v,o}_proj.*``, ``vit.layers.N.mlp.fc{1,2}.*``,
  ``vit.layers.N.layernorm_{before,after}.*``, embeddings, ``vit.layernorm`` and ``classifier``
  as above.

HF keeps query, key and value as three (D, D) linears; timm fuses them into one (3D, D) ``qkv``
whose rows are [q; k; v]. Both split each of q, k, v into heads the same way (head-major rows),
so the fused weight is a plain concatenation. HF's optional pooler (``vit.pooler.dense``, used
by ``ViTModel`` only, never by the classifier) has no timm counterpart and is dropped.
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = [
    "from_hf_vit",
    "detect_vit_naming",
    "check_timm_vit",
    "to_timm_vit",
    "infer_vit_config",
    "default_num_heads",
    "resample_abs_pos_embed",
    "bicubic_resize_matrix",
]

_TIMM_BLOCK = re.compile(
    r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"
)
_TIMM_TOP = {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    "fc_norm.weight",  # global_pool="avg": the norm after the mean of the patch tokens
    "fc_norm.bias",
    "head.weight",
    "head.bias",
}

# HF per-layer sub-names (after "encoder.layer.N." or "layers.N.") -> timm's or a q/k/v slot.
_HF_HUB_LAYER = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_HF_V5_LAYER = {
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def _strip(key):
    for prefix in ("model.", "vit."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def detect_vit_naming(state_dict) -> str:
    """'timm', 'hf_hub' or 'hf_v5' from the keys; ValueError when none fits."""
    keys = [_strip(k) for k in state_dict]
    if any(k.startswith("encoder.layer.") for k in keys):
        return "hf_hub"
    if any(k.startswith("layers.") for k in keys):
        return "hf_v5"
    if any(k.startswith("blocks.") for k in keys) or "pos_embed" in keys:
        return "timm"
    if any(k.startswith("embeddings.") for k in keys):
        return "hf_v5"  # no layers at all; both HF namings agree on the rest
    sample = ", ".join(list(state_dict)[:5])
    raise ValueError(f"cannot tell the naming of this ViT state dict (first keys: {sample})")


def vit_dict_problems(sd, name=str) -> list[str]:
    """What makes a timm-named ViT state dict incomplete or inconsistent, as readable lines
    (empty when it is whole): every missing and every mis-shaped key, named by ``name(key)``
    (the key the caller was given, where it was another naming).

    Whole means what minivit's ViT (and timm's VisionTransformer) holds: ``cls_token``,
    ``pos_embed`` and the patch conv with its bias; blocks 0 .. depth-1, each with all of its
    weights and biases (``attn.qkv.bias`` in every block or in none: ``qkv_bias``); the final
    norm (``norm``, or ``fc_norm`` for average pooling) as a weight and bias pair. The head is
    optional (``num_classes=0``) but comes as a pair. Shapes follow from the width D of
    ``cls_token`` (else of the patch conv) and the MLP width of the first block.
    """
    missing, misshaped = [], []

    def shape(k):
        return tuple(np.shape(sd[k]))

    def need(k, expected=None):
        """k must be there, with the expected shape where that is known (no None in it)."""
        if k not in sd:
            missing.append(k)
        elif expected is not None and None not in expected and shape(k) != expected:
            misshaped.append(f"{name(k)}: expected {expected}, got {shape(k)}")

    D = None
    for k, axis in (("cls_token", -1), ("patch_embed.proj.weight", 0)):
        if D is None and k in sd and len(shape(k)) >= 1:
            D = shape(k)[axis]
    need("cls_token", (1, 1, D))
    need("pos_embed")
    pos = shape("pos_embed") if "pos_embed" in sd else None
    if pos is not None and D is not None and (len(pos) != 3 or pos[::2] != (1, D)):
        misshaped.append(f"{name('pos_embed')}: expected (1, 1 + patches, {D}), got {pos}")
    need("patch_embed.proj.weight")
    if "patch_embed.proj.weight" in sd:
        w = shape("patch_embed.proj.weight")
        if len(w) != 4 or (D is not None and w[0] != D) or w[2] != w[3]:
            misshaped.append(f"{name('patch_embed.proj.weight')}: expected ({D}, C, P, P), got {w}")
    need("patch_embed.proj.bias", (D,))

    depth = 1 + max((int(m.group(1)) for m in map(_TIMM_BLOCK.match, sd) if m), default=-1)
    qkv_bias = any(f"blocks.{i}.attn.qkv.bias" in sd for i in range(depth))
    D3 = None if D is None else 3 * D  # the fused [q; k; v] rows
    fc1 = "blocks.0.mlp.fc1.weight"
    hidden = shape(fc1)[0] if fc1 in sd and len(shape(fc1)) == 2 else None
    for i in range(depth):
        b = f"blocks.{i}."
        need(b + "norm1.weight", (D,))
        need(b + "norm1.bias", (D,))
        need(b + "attn.qkv.weight", (D3, D))
        if qkv_bias:
            need(b + "attn.qkv.bias", (D3,))
        need(b + "attn.proj.weight", (D, D))
        need(b + "attn.proj.bias", (D,))
        need(b + "norm2.weight", (D,))
        need(b + "norm2.bias", (D,))
        need(b + "mlp.fc1.weight", (hidden, D))
        need(b + "mlp.fc1.bias", (hidden,))
        need(b + "mlp.fc2.weight", (D, hidden))
        need(b + "mlp.fc2.bias", (D,))

    norms = [n for n in ("norm", "fc_norm") if f"{n}.weight" in sd or f"{n}.bias" in sd]
    for n in norms or ["norm"]:
        need(f"{n}.weight", (D,))
        need(f"{n}.bias", (D,))
    if "head.weight" in sd or "head.bias" in sd:
        hw = shape("head.weight") if "head.weight" in sd else None
        classes = hw[0] if hw is not None and len(hw) == 2 else None
        need("head.weight", (classes, D))
        if hw is not None and classes is None:
            misshaped.append(f"{name('head.weight')}: expected (num_classes, {D}), got {hw}")
        need("head.bias", (classes,))
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(name(k) for k in missing))
    if misshaped:
        problems.append("mis-shaped: " + "; ".join(misshaped))
    return problems


def check_timm_vit(state_dict) -> dict:
    """Validate timm names (a leading 'vit.'/'model.' is stripped); returns a new dict.

    Raises ValueError naming every key that is not a timm ViT parameter, then one naming every
    missing and mis-shaped key (:func:`vit_dict_problems`): a block that lacks a parameter
    that its siblings have, a missing ``pos_embed``, a qkv that is not (3D, D), ...
    """
    out, bad, given = {}, [], {}
    for k, v in state_dict.items():
        s = _strip(k)
        if s in _TIMM_TOP or _TIMM_BLOCK.match(s):
            out[s] = v
            given[s] = k
        else:
            bad.append(k)
    if bad:
        raise ValueError("not timm ViT parameter names: " + ", ".join(bad))
    problems = vit_dict_problems(out, lambda k: given.get(k, k))
    if problems:
        raise ValueError(
            "timm ViT state dict is incomplete or inconsistent: " + " | ".join(problems)
        )
    return out


def from_hf_vit(state_dict) -> dict:
    """Map a Hugging Face ViT state dict (either naming) to timm names, fusing q/k/v into qkv.

    The input is a dict of numpy arrays (as ``safetensors.numpy.load_file`` gives); so is the
    output. Every key must be understood: unknown keys raise one ValueError naming them all.
    The result must be a whole ViT, as :func:`check_timm_vit` requires of a timm dict (both
    paths refuse the same things): one ValueError names every missing and mis-shaped key by its
    Hugging Face name (a query, key or value that is not (D, D) is named before it is fused).
    Left out on purpose: ``ViTModel``'s pooler (no timm counterpart), and the classifier as a
    whole (``ViTModel`` has none: ``num_classes=0``); q/k/v biases, in every layer or in none.
    """
    naming = detect_vit_naming(state_dict)
    if naming == "timm":
        return check_timm_vit(state_dict)
    layer_map = _HF_HUB_LAYER if naming == "hf_hub" else _HF_V5_LAYER
    out, qkv, unknown, given = {}, {}, [], {}
    for key, value in state_dict.items():
        k = _strip(key)
        v = np.asarray(value)
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            given[_HF_TOP[k]] = key
            continue
        if k.startswith("pooler."):
            continue  # ViTModel's pooler: no timm counterpart
        m = _HF_LAYER_RE.match(k)
        if m and m.group(2) in layer_map:
            i, sub, kind = int(m.group(1)), layer_map[m.group(2)], m.group(3)
            if sub in ("q", "k", "v"):
                qkv.setdefault((i, kind), {})[sub] = (key, v)
            else:
                out[f"blocks.{i}.{sub}.{kind}"] = v
                given[f"blocks.{i}.{sub}.{kind}"] = key
            continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"keys not understood as {naming} ViT names: " + ", ".join(unknown))
    prefix = "vit." if any(str(k).startswith("vit.") for k in state_dict) else ""
    name = _hf_namer(naming, prefix, given)
    problems = []
    D = np.shape(out["cls_token"])[-1] if np.ndim(out.get("cls_token", 0)) == 3 else None
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            problems.append(f"layer {i}: {kind} of {missing} missing (query/key/value)")
            continue
        want = None if D is None else ((D, D) if kind == "weight" else (D,))
        shapes = {n: np.shape(v) for n, (_, v) in parts.items()}
        if want is None:  # no width to hold them to: they must at least agree
            want = shapes["q"] if len(set(shapes.values())) == 1 else None
        bad = [
            f"{parts[n][0]}: expected {want}, got {shapes[n]}"
            for n in "qkv"
            if want is None or shapes[n] != want
        ]
        if bad:
            problems.append("mis-shaped: " + "; ".join(bad))
            continue
        # timm's rows are [q; k; v]: one concatenation along the output axis.
        out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(
            [parts["q"][1], parts["k"][1], parts["v"][1]], axis=0
        )
    if not problems:  # (a q/k/v problem above would be named again as a missing qkv)
        problems = vit_dict_problems(out, name)
    if problems:
        raise ValueError(
            f"{naming} ViT state dict is incomplete or inconsistent: " + " | ".join(problems)
        )
    return _timm_order(out)


def _hf_namer(naming, prefix, given):
    """timm key -> the Hugging Face key it came from (``given``), or would have come from."""
    top = {timm: hf for hf, timm in _HF_TOP.items()}
    layer_map = _HF_HUB_LAYER if naming == "hf_hub" else _HF_V5_LAYER
    subs = {timm: hf for hf, timm in layer_map.items() if timm not in ("q", "k", "v")}
    layer = "encoder.layer" if naming == "hf_hub" else "layers"

    def name(k):
        if k in given:
            return given[k]
        if k in top:
            return top[k] if k.startswith("head.") else prefix + top[k]
        m = _TIMM_BLOCK.match(k)
        if m and m.group(2) == "attn.qkv":
            qkv = [hf for hf, timm in layer_map.items() if timm in ("q", "k", "v")]
            return "/".join(f"{prefix}{layer}.{m.group(1)}.{hf}.{m.group(3)}" for hf in qkv)
        if m:
            return f"{prefix}{layer}.{m.group(1)}.{subs[m.group(2)]}.{m.group(3)}"
        return k

    return name


def to_timm_vit(state_dict) -> dict:
    """Any understood naming -> timm names (timm dicts are validated and passed through)."""
    return from_hf_vit(state_dict)


def _timm_order(sd):
    def rank(k):
        m = _TIMM_BLOCK.match(k)
        if m:
            order = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
            return (1, int(m.group(1)), order.index(m.group(2)), m.group(3) == "bias")
        top = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
        if k in top:
            return (0, top.index(k), 0, 0)
        last = ["norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight"]
        return (2, (last + ["head.bias"]).index(k), 0, 0)

    return {k: sd[k] for k in sorted(sd, key=rank)}


def square_grid_side(pos_embed, name="pos_embed") -> int:
    """The side of the square patch grid a position embedding (1, 1 + g*g, D) is laid out for
    (one CLS token first); ValueError when its token count is not 1 + a square."""
    n_tokens = pos_embed.shape[1]
    grid = int(round((n_tokens - 1) ** 0.5))
    if grid * grid != n_tokens - 1:
        raise ValueError(f"{name} has {n_tokens} tokens: not 1 + a square grid")
    return grid


# timm's ViT widths whose heads are not 64 wide: SigLIP's so400m (1152), ViT-H (1280), ViT-g
# (1408) and ViT-G (1664) all have 16 heads, of 72, 80, 88 and 104 numbers.
_HEADS_BY_WIDTH = {1152: 16, 1280: 16, 1408: 16, 1664: 16}


def default_num_heads(embed_dim: int) -> int:
    """The head count that timm's common ViT configs give a width: 16 for the widths in
    _HEADS_BY_WIDTH, else heads of 64 (Ti 3, S 6, B 12, L 16). A guess all the same: a width
    can have other counts in other models (DINOv2's ViT-g has 1536 and 24 heads of 64, which
    the rule gives). The heads leave no trace in the weights, so pass ``num_heads=`` when the
    checkpoint's model had another. Of timm's weights at these four widths, the ViT-H ones
    without CLIP's extra norm load here; CLIP and SigLIP towers have layers minivit's ViT lacks,
    and ``check_timm_vit`` refuses them."""
    return _HEADS_BY_WIDTH.get(int(embed_dim), max(1, int(embed_dim) // 64))


def mlp_ratio_for(hidden: int, width: int) -> float:
    """The ``mlp_ratio`` that gives an MLP of ``hidden`` units at ``width``: the models (as timm)
    size it ``int(width * mlp_ratio)``, and ``hidden / width`` times ``width`` can round to just
    below ``hidden`` (15 / 11 * 11 is 14.999...), so the ratio is nudged up until it does not."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def infer_vit_config(state_dict, num_heads=None) -> dict:
    """ViT keyword arguments read off a timm-named state dict.

    The number of heads leaves no trace in the weights; unless given, it is the count timm's
    configs use for the width (:func:`default_num_heads`). img_size assumes a square grid.
    """
    sd = state_dict
    D, C, P, _ = sd["patch_embed.proj.weight"].shape
    grid = square_grid_side(sd["pos_embed"], "pos_embed")
    depth = len({int(_TIMM_BLOCK.match(k).group(1)) for k in sd if _TIMM_BLOCK.match(k)})
    cfg = dict(
        img_size=grid * P,
        patch_size=int(P),
        in_chans=int(C),
        num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
        embed_dim=int(D),
        depth=depth,
        num_heads=int(num_heads) if num_heads else default_num_heads(D),
        qkv_bias=any(k.endswith("attn.qkv.bias") for k in sd),
    )
    if depth:
        cfg["mlp_ratio"] = mlp_ratio_for(int(sd["blocks.0.mlp.fc1.weight"].shape[0]), int(D))
    # timm's global_pool="avg" has its final norm as fc_norm, after the pooling
    cfg["global_pool"] = "avg" if "fc_norm.weight" in sd else "token"
    return cfg


# ----------------------------------------------------------------------------------------------
# position-embedding resize


def _cubic(x, a=-0.5):
    # Keys' cubic convolution kernel; a = -0.5 as in PIL and torch's antialiased bicubic.
    x = np.abs(x)
    return np.where(
        x < 1,
        ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0),
    )


def bicubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an antialiased bicubic resize along one axis (float64).

    Pixel centres are aligned as with align_corners=False. When shrinking, the kernel is
    stretched by n_in / n_out so that every input contributes (antialiasing); taps falling off
    the border are dropped and each row is renormalised to sum to 1. This is the separable
    filter of PIL's ``Image.resize(BICUBIC)`` and of
    ``torch.nn.functional.interpolate(mode="bicubic", antialias=True, align_corners=False)``,
    which timm's ``resample_abs_pos_embed`` calls.
    """
    scale = n_in / n_out
    support_scale = max(scale, 1.0)
    support = 2.0 * support_scale
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _cubic((j - center + 0.5) / support_scale)
        W[i, lo:hi] = w / w.sum()
    return W


def resample_abs_pos_embed(pos_embed, new_size, old_size=None, num_prefix_tokens=1):
    """Resize a learned position embedding (1, prefix + gh*gw, D) to a new grid, like timm.

    new_size, old_size: (gh, gw) grids of patches (old_size defaults to a square grid). The
    prefix tokens (the CLS token) are kept as they are; the grid is resized with
    :func:`bicubic_resize_matrix` along each axis, in float64, and cast back to the input dtype.
    """
    pe = np.asarray(pos_embed)
    if pe.ndim != 3 or pe.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, T, D), got {pe.shape}")
    new_size = tuple(int(s) for s in new_size)
    n_grid = pe.shape[1] - num_prefix_tokens
    if old_size is None:
        g = int(round(n_grid**0.5))
        if g * g != n_grid:
            raise ValueError(f"pos_embed grid of {n_grid} tokens is not square; give old_size")
        old_size = (g, g)
    old_size = tuple(int(s) for s in old_size)
    if old_size[0] * old_size[1] != n_grid:
        raise ValueError(f"old_size {old_size} does not hold the {n_grid} grid tokens")
    if new_size == old_size:
        return pe.copy()
    prefix, grid = pe[:, :num_prefix_tokens], pe[0, num_prefix_tokens:]
    D = pe.shape[2]
    grid = grid.reshape(old_size[0], old_size[1], D).astype(np.float64)  # (gh, gw, D)
    Wh = bicubic_resize_matrix(old_size[0], new_size[0])  # (gh', gh)
    Ww = bicubic_resize_matrix(old_size[1], new_size[1])  # (gw', gw)
    out = np.einsum("ah,hwd,bw->abd", Wh, grid, Ww)  # (gh', gw', D)
    out = out.reshape(1, new_size[0] * new_size[1], D).astype(pe.dtype)
    return np.concatenate([prefix, out], axis=1)
