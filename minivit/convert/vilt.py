"""Hugging Face ViLT names -> minivit (original dandelin/ViLT) names.

Accepted inputs: the state_dict of ``ViltModel`` (no prefix) or of ``ViltForMaskedLM`` /
``ViltForImageAndTextRetrieval`` / ``ViltForQuestionAnswering`` (prefix ``vilt.``), with the
encoder either as published on the hub and kept by transformers 5 for ViLT
(``encoder.layer.N.attention.attention.query``, ``.intermediate.dense``, ``.output.dense``) or in
transformers 5's newer layout used by its other vision models (``layers.N.attention.q_proj``,
``.mlp.fc1``). Query, key and value are fused into one ``attn.qkv`` matrix (rows [q; k; v]).

Heads: ``mlm_score.*`` (HF keeps the decoder bias as ``mlm_score.decoder.bias``, the original as
``mlm_score.bias``; either is accepted), ``rank_output`` (HF's retrieval score, not a ViLT
pre-training head) is skipped, and ``classifier.{0,1,3}`` (VQA) becomes ``vqa_classifier.*``.

The input is a dict of numpy arrays (as ``safetensors.numpy.load_file`` gives); the output
too. Keys that have no counterpart raise ``ValueError`` naming them.
"""

from __future__ import annotations

import re

import numpy as np

from .vit import default_num_heads, mlp_ratio_for, square_grid_side

__all__ = ["from_hf_vilt", "infer_vilt_config", "is_hf_vilt"]

_EMB = {
    "embeddings.text_embeddings.word_embeddings.weight": "text_embeddings.word_embeddings.weight",
    "embeddings.text_embeddings.position_embeddings.weight": (
        "text_embeddings.position_embeddings.weight"
    ),
    "embeddings.text_embeddings.token_type_embeddings.weight": (
        "text_embeddings.token_type_embeddings.weight"
    ),
    "embeddings.text_embeddings.LayerNorm.weight": "text_embeddings.LayerNorm.weight",
    "embeddings.text_embeddings.LayerNorm.bias": "text_embeddings.LayerNorm.bias",
    "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "embeddings.cls_token": "transformer.cls_token",
    "embeddings.position_embeddings": "transformer.pos_embed",
    "embeddings.patch_embeddings.projection.weight": "transformer.patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "transformer.patch_embed.proj.bias",
    "layernorm.weight": "transformer.norm.weight",
    "layernorm.bias": "transformer.norm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}

_HEADS = {
    "mlm_score.transform.dense.weight": "mlm_score.transform.dense.weight",
    "mlm_score.transform.dense.bias": "mlm_score.transform.dense.bias",
    "mlm_score.transform.LayerNorm.weight": "mlm_score.transform.LayerNorm.weight",
    "mlm_score.transform.LayerNorm.bias": "mlm_score.transform.LayerNorm.bias",
    "mlm_score.decoder.weight": "mlm_score.decoder.weight",
    "mlm_score.decoder.bias": "mlm_score.bias",
    "mlm_score.bias": "mlm_score.bias",
    "classifier.0.weight": "vqa_classifier.0.weight",
    "classifier.0.bias": "vqa_classifier.0.bias",
    "classifier.1.weight": "vqa_classifier.1.weight",
    "classifier.1.bias": "vqa_classifier.1.bias",
    "classifier.3.weight": "vqa_classifier.3.weight",
    "classifier.3.bias": "vqa_classifier.3.bias",
    "itm_score.fc.weight": "itm_score.fc.weight",
    "itm_score.fc.bias": "itm_score.fc.bias",
}

# per-layer names (after "encoder.layer.N." or "layers.N.") -> (minivit name, q/k/v slot or None)
_LAYER = {
    "attention.attention.query": ("attn.qkv", 0),
    "attention.attention.key": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2),
    "attention.output.dense": ("attn.proj", None),
    "intermediate.dense": ("mlp.fc1", None),
    "output.dense": ("mlp.fc2", None),
    "layernorm_before": ("norm1", None),
    "layernorm_after": ("norm2", None),
    # transformers 5's newer layout
    "attention.q_proj": ("attn.qkv", 0),
    "attention.k_proj": ("attn.qkv", 1),
    "attention.v_proj": ("attn.qkv", 2),
    "attention.o_proj": ("attn.proj", None),
    "mlp.fc1": ("mlp.fc1", None),
    "mlp.fc2": ("mlp.fc2", None),
}

_LAYER_KEY = re.compile(r"^(?:encoder\.layer|encoder\.layers|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_SKIP = ("embeddings.text_embeddings.position_ids", "embeddings.text_embeddings.token_type_ids")


def from_hf_vilt(state_dict):
    """Map a Hugging Face ViLT state_dict to minivit's ViLT names (see the module docstring)."""
    out = {}
    qkv = {}  # (layer, "weight"|"bias") -> [q, k, v]
    unknown = []
    for key, value in state_dict.items():
        arr = np.asarray(value)
        k = key[len("vilt.") :] if key.startswith("vilt.") else key
        if k in _SKIP or k.startswith("rank_output."):
            continue
        if k in _EMB:
            out[_EMB[k]] = arr
            continue
        if k in _HEADS:
            out[_HEADS[k]] = arr
            continue
        m = _LAYER_KEY.match(k)
        if m and m.group(2) in _LAYER:
            i, sub, kind = int(m.group(1)), m.group(2), m.group(3)
            name, slot = _LAYER[sub]
            if slot is None:
                out[f"transformer.blocks.{i}.{name}.{kind}"] = arr
            else:
                qkv.setdefault((i, kind), [None, None, None])[slot] = arr
            continue
        unknown.append(key)
    if unknown:
        raise ValueError("from_hf_vilt: keys with no ViLT counterpart: " + ", ".join(unknown))
    if not out and not qkv:
        raise ValueError(
            f"from_hf_vilt: no ViLT weights in a state dict of {len(state_dict)} entries "
            f"(first keys: {', '.join(list(state_dict)[:5])})"
        )
    for (i, kind), parts in sorted(qkv.items()):
        missing = [n for n, a in zip("qkv", parts) if a is None]
        if missing:
            raise ValueError(
                f"from_hf_vilt: layer {i} has no {', '.join(missing)} {kind} to fuse into attn.qkv"
            )
        out[f"transformer.blocks.{i}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    # transformers ties the MLM decoder to the word embeddings for ViLT, and save_pretrained
    # then leaves the decoder out of the file: the tie is the value
    word = "text_embeddings.word_embeddings.weight"
    if "mlm_score.bias" in out and "mlm_score.decoder.weight" not in out and word in out:
        out["mlm_score.decoder.weight"] = out[word]
    return out


_BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.")


def is_hf_vilt(state_dict) -> bool:
    """Whether a state dict holds Hugging Face ViLT weights (its text embeddings' names)."""
    return any(
        k.removeprefix("vilt.").startswith("embeddings.text_embeddings.") for k in state_dict
    )


def infer_vilt_config(state_dict, num_heads=None, eps=1e-12) -> dict:
    """ViLT keyword arguments read off a state dict in minivit's names (``from_hf_vilt``'s
    output).

    The weights give the vocabulary, the text length, the width, the depth, the patch and the
    image size (a square grid), the MLP ratio and a VQA head's label count. Two things leave no
    trace in them: the number of heads (default ``default_num_heads``: 12 for ViLT-B/32) and the
    layernorm epsilon. Hugging Face's ViLT uses its ``layer_norm_eps`` (1e-12 by default, the
    published checkpoints' value) in every layernorm, so ``eps`` sets both minivit's encoder
    epsilon and its text one; read both from the checkpoint's config.json when there is one.
    """
    sd = state_dict
    V, D = sd["text_embeddings.word_embeddings.weight"].shape
    _, C, P, _ = sd["transformer.patch_embed.proj.weight"].shape
    grid = square_grid_side(sd["transformer.pos_embed"], "transformer.pos_embed")
    depth = len({int(m.group(1)) for m in map(_BLOCK.match, sd) if m})
    if not depth:
        raise ValueError("no transformer.blocks.N.* weights: not a ViLT encoder")
    cfg = dict(
        vocab_size=int(V),
        max_text_len=int(sd["text_embeddings.position_embeddings.weight"].shape[0]),
        img_size=grid * int(P),
        patch_size=int(P),
        in_chans=int(C),
        embed_dim=int(D),
        depth=depth,
        num_heads=int(num_heads) if num_heads else default_num_heads(D),
        mlp_ratio=mlp_ratio_for(int(sd["transformer.blocks.0.mlp.fc1.weight"].shape[0]), int(D)),
        qkv_bias="transformer.blocks.0.attn.qkv.bias" in sd,
        eps=float(eps),
        text_eps=float(eps),
    )
    if "vqa_classifier.3.weight" in sd:
        cfg["num_vqa_labels"] = int(sd["vqa_classifier.3.weight"].shape[0])
    return cfg
