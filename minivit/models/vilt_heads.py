"""ViLT's heads and pre-training losses, each an explicit composition of ops with its backward.

Heads read ``model.params`` by the original checkpoint's names and *accumulate* their parameter
gradients into a dict (``grads[name] += g``), so a caller can run several heads on one forward:

    itm_forward(pooled, params)            pooled (B, D) -> logits (B, 2)        itm_score.fc
    mlm_forward(feats, params, text_eps)   feats (..., D) -> logits (..., V)     mlm_score.*
        (its decoder weight is ``params[decoder]``: ``model.mlm_decoder_key``, which names the
        word embeddings for a model built with ``tie_mlm_decoder=True``)
    vqa_forward(pooled, params)            pooled (B, D) -> logits (B, A)        vqa_classifier.*
    wpa_forward(text_feats, image_feats, text_valid, image_valid)
        -> distance (B,), the IPOT optimal-transport distance between the valid words and the
           valid patches on the cosine cost, with the transport plan held constant.

``pretrain_forward`` / ``pretrain_backward`` run the model once on a batch whose rows are either
MLM rows (matching pairs with masked captions) or ITM rows (pairs labelled match / no match),
and combine the three losses as the original does:

    loss = itm_ce + mlm_ce + wpa_weight * (sum_pos dist - sum_neg dist) / n_itm

Shape legend: B batch, L text length, I image tokens (CLS first), D width, V vocabulary,
M masked positions in the batch.
"""

from __future__ import annotations

from .. import ops
from .._parallel import pool_only
from ..backend import array_module
from ..blocks import accumulate

__all__ = [
    "MLM_DECODER",
    "WORD_EMBEDDINGS",
    "itm_forward",
    "itm_backward",
    "mlm_forward",
    "mlm_backward",
    "vqa_forward",
    "vqa_backward",
    "wpa_valid_masks",
    "wpa_forward",
    "wpa_backward",
    "pretrain_forward",
    "pretrain_backward",
]


# the MLM decoder's own weight, and the word-embedding table that a tied model uses in its place
MLM_DECODER = "mlm_score.decoder.weight"
WORD_EMBEDDINGS = "text_embeddings.word_embeddings.weight"


# ----------------------------------------------------------------------------------------------
# ITM: a linear layer on the pooled text CLS


def itm_forward(pooled, params):
    """pooled (B, D) -> logits (B, 2) (index 1 = the caption matches the image)."""
    return ops.linear_forward(pooled, params["itm_score.fc.weight"], params["itm_score.fc.bias"])


def itm_backward(dlogits, cache, grads):
    dpooled, dw, db = ops.linear_backward(dlogits, cache)
    accumulate(grads, "itm_score.fc.weight", dw)
    accumulate(grads, "itm_score.fc.bias", db)
    return dpooled  # (B, D)


# ----------------------------------------------------------------------------------------------
# MLM: BERT's prediction head  dense -> GELU -> LayerNorm(text_eps) -> decoder + bias


def mlm_forward(feats, params, text_eps=1e-12, decoder=MLM_DECODER):
    """feats (..., D) -> logits (..., V). ``decoder`` names the (V, D) decoder weight in
    ``params``: ``model.mlm_decoder_key`` (``WORD_EMBEDDINGS`` for a tied model). The backward
    adds the decoder's gradient under the same name."""
    p = params
    # dense, then BERT's exact (erf) GELU
    h, c_dense = ops.linear_gelu_forward(
        feats, p["mlm_score.transform.dense.weight"], p["mlm_score.transform.dense.bias"]
    )
    h, c_ln = ops.layernorm_forward(
        h,
        p["mlm_score.transform.LayerNorm.weight"],
        p["mlm_score.transform.LayerNorm.bias"],
        text_eps,
    )
    # The decoder has no bias of its own; the separate vector mlm_score.bias is added (the
    # original's MLMHead; HF stores the same vector as mlm_score.decoder.bias).
    logits, c_dec = ops.linear_forward(h, p[decoder], p["mlm_score.bias"])
    return logits, (c_dense, c_ln, c_dec, decoder)


def mlm_backward(dlogits, cache, grads):
    c_dense, c_ln, c_dec, decoder = cache
    dh, dw, db = ops.linear_backward(dlogits, c_dec)
    accumulate(grads, decoder, dw)  # tied: added to the word embeddings' gradient
    accumulate(grads, "mlm_score.bias", db)
    dh, dg, dbeta = ops.layernorm_backward(dh, c_ln)
    accumulate(grads, "mlm_score.transform.LayerNorm.weight", dg)
    accumulate(grads, "mlm_score.transform.LayerNorm.bias", dbeta)
    dfeats, dw, db = ops.linear_gelu_backward(dh, c_dense)
    accumulate(grads, "mlm_score.transform.dense.weight", dw)
    accumulate(grads, "mlm_score.transform.dense.bias", db)
    return dfeats


# ----------------------------------------------------------------------------------------------
# VQA: the original's classifier  Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, A)


def vqa_forward(pooled, params, eps=1e-5):
    p = params
    h, c1 = ops.linear_forward(pooled, p["vqa_classifier.0.weight"], p["vqa_classifier.0.bias"])
    h, c2 = ops.layernorm_forward(h, p["vqa_classifier.1.weight"], p["vqa_classifier.1.bias"], eps)
    h, c3 = ops.gelu_forward(h)
    logits, c4 = ops.linear_forward(h, p["vqa_classifier.3.weight"], p["vqa_classifier.3.bias"])
    return logits, (c1, c2, c3, c4)


def vqa_backward(dlogits, cache, grads):
    c1, c2, c3, c4 = cache
    dh, dw, db = ops.linear_backward(dlogits, c4)
    accumulate(grads, "vqa_classifier.3.weight", dw)
    accumulate(grads, "vqa_classifier.3.bias", db)
    (dh,) = ops.gelu_backward(dh, c3)
    dh, dg, dbeta = ops.layernorm_backward(dh, c2)
    accumulate(grads, "vqa_classifier.1.weight", dg)
    accumulate(grads, "vqa_classifier.1.bias", dbeta)
    dpooled, dw, db = ops.linear_backward(dh, c1)
    accumulate(grads, "vqa_classifier.0.weight", dw)
    accumulate(grads, "vqa_classifier.0.bias", db)
    return dpooled


# ----------------------------------------------------------------------------------------------
# WPA: word-patch alignment by optimal transport


def wpa_valid_masks(text_mask, image_mask):
    """Which tokens take part in the alignment: the words (not CLS, not SEP, not padding) and
    the patches (not the image CLS, not padding). text_mask (B, L), image_mask (B, I) bool."""
    xp = array_module(text_mask)
    L = text_mask.shape[1]
    n_text = text_mask.sum(axis=1)  # (B,) [CLS] ... [SEP]
    pos = xp.arange(L)[None, :]  # (1, L)
    # SEP is the last valid token of each caption (captions are left-aligned)
    tv = text_mask & (pos > 0) & (pos != (n_text[:, None] - 1))  # (B, L)
    iv = image_mask.copy()
    iv[:, 0] = False  # (B, I)
    return tv, iv


def wpa_forward(text_feats, image_feats, text_valid, image_valid, *, plan=None, **ot_options):
    """(B, L, D), (B, I, D), bool (B, L), (B, I) -> distance (B,) and a cache.

    The marginals are uniform over the valid tokens (zero on the others, so the plan has zero
    rows and columns there); the IPOT plan is treated as a constant, so
    d distance / d cost = plan, and the gradient reaches the features only through the cosine
    cost. A row with no valid word gets distance 0 and no gradient.

    ``plan`` (B, L, I), if given, is used instead of solving (to check gradients with the plan
    frozen, or to replay a plan), in the features' dtype; ``ot_options`` go to
    ``ops.ot_distance_forward``.
    """
    xp = array_module(text_feats)
    dtype = text_feats.dtype
    cost, c_cost = ops.cosine_cost_forward(text_feats, image_feats)  # (B, L, I)
    tv = text_valid.astype(dtype)
    iv = image_valid.astype(dtype)
    nt = tv.sum(axis=1, keepdims=True)  # (B, 1)
    ni = iv.sum(axis=1, keepdims=True)
    has = (nt[:, 0] > 0) & (ni[:, 0] > 0)  # (B,)
    # rows without words get a dummy uniform marginal; their distance is zeroed below
    a = xp.where(has[:, None], tv / xp.maximum(nt, 1), 1.0 / tv.shape[1])
    b = xp.where(has[:, None], iv / xp.maximum(ni, 1), 1.0 / iv.shape[1])
    options = dict(method="ipot")
    options.update(ot_options)
    if plan is None:
        dist, c_ot = ops.ot_distance_forward(cost, a.astype(dtype), b.astype(dtype), **options)
    else:  # in the features' dtype and backend (a replayed plan may have been saved in float64)
        plan = xp.asarray(plan, dtype=dtype)
        if plan.shape != cost.shape:
            raise ValueError(
                f"plan has shape {tuple(plan.shape)}, but the cost between words and patches "
                f"is {tuple(cost.shape)}: a plan is (B, L, I)"
            )
        dist, c_ot = (plan * cost).sum(axis=(-2, -1)), ops.Cache(plan=plan)  # (B,)
    keep = has.astype(dtype)
    return dist * keep, (c_cost, c_ot, keep)


def wpa_plan(cache):
    """The transport plan (B, L, I) kept in a wpa_forward cache (for plots and replays)."""
    return cache[1].plan


def wpa_backward(ddist, cache):
    """ddist (B,) -> (dtext_feats (B, L, D), dimage_feats (B, I, D))."""
    c_cost, c_ot, keep = cache
    (dcost,) = ops.ot_distance_backward(ddist * keep, c_ot)  # (B, L, I) = ddist * plan
    dtext, dimage = ops.cosine_cost_backward(dcost, c_cost)
    return dtext, dimage


# ----------------------------------------------------------------------------------------------
# the pre-training objective on one fused batch


@pool_only()
def pretrain_forward(
    model,
    input_ids,
    text_mask,
    images,
    mlm_labels,
    itm_labels,
    *,
    wpa_weight=0.1,
    train=True,
    ot_options=None,
    wpa_plan=None,
):
    """One forward of ``model`` and the three losses.

    Args:
        input_ids (B, L): captions, masked on the MLM rows.
        mlm_labels (B, L): the original ids at masked positions, -100 elsewhere (all -100 on ITM
            rows).
        itm_labels (B,): 1 match, 0 no match, -100 on rows that take no part in ITM/WPA (the
            MLM rows, which the original runs as a separate forward).
        wpa_weight: 0.1 as in the original; 0 skips the alignment.
        wpa_plan: a fixed transport plan (B_itm, L, I) for the ITM rows, used instead of solving
            (gradient checks).

    Returns (losses, cache): losses holds "loss", "itm", "mlm", "wpa" (Python floats except
    "loss", a 0-d array), "itm_logits" (B, 2), "mlm_logits" (M, V), "mlm_index" (the (row,
    position) pairs of the M masked tokens), "wpa_distance" (B,) (0 on MLM rows), "wpa_plan"
    (B_itm, L, I) (the ITM rows' plans) and "out" (the model's dict).
    """
    xp = model.backend.xp
    p = model.params
    dtype = p["pooler.dense.weight"].dtype
    out = model.forward(input_ids, text_mask, images, train=train)
    B, L = input_ids.shape
    cache = {"B": B, "L": L, "out": out}
    losses = {"out": out}

    # ITM on the pooled output
    itm_logits, cache["itm"] = itm_forward(out["pooled"], p)
    itm_loss, cache["itm_ce"] = ops.cross_entropy_forward(itm_logits, itm_labels, ignore_index=-100)
    losses["itm_logits"] = itm_logits

    # MLM only where a label is given: gather the M masked positions first (a big vocabulary
    # makes the decoder the costliest matmul of the model otherwise)
    rows, cols = xp.nonzero(mlm_labels != -100)  # (M,), (M,)
    cache["mlm_index"] = (rows, cols)
    if rows.shape[0]:
        feats = out["text_feats"][rows, cols]  # (M, D)
        mlm_logits, cache["mlm"] = mlm_forward(feats, p, model.text_eps, model.mlm_decoder_key)
        mlm_loss, cache["mlm_ce"] = ops.cross_entropy_forward(mlm_logits, mlm_labels[rows, cols])
    else:
        mlm_logits, cache["mlm"] = None, None
        mlm_loss = xp.zeros((), dtype=dtype)
    losses["mlm_logits"] = mlm_logits
    losses["mlm_index"] = (rows, cols)

    # WPA on the ITM rows only: + distance for matches, - distance for mismatches
    sign = xp.where(itm_labels == 1, 1.0, xp.where(itm_labels == 0, -1.0, 0.0)).astype(dtype)
    n_itm = max(int((itm_labels != -100).sum()), 1)
    (rows_itm,) = xp.nonzero(itm_labels != -100)  # (B_itm,)
    cache["wpa_rows"] = rows_itm
    if wpa_weight and rows_itm.shape[0]:
        tv, iv = wpa_valid_masks(out["text_mask"][rows_itm], out["image_mask"][rows_itm])
        dist, cache["wpa"] = wpa_forward(
            out["text_feats"][rows_itm],
            out["image_feats"][rows_itm],
            tv,
            iv,
            plan=wpa_plan,
            **(ot_options or {}),
        )  # (B_itm,)
        wpa_loss = wpa_weight * (sign[rows_itm] * dist).sum() / n_itm
        full = xp.zeros((B,), dtype=dtype)
        full[rows_itm] = dist
        losses["wpa_distance"] = full
        losses["wpa_plan"] = cache["wpa"][1].plan  # (B_itm, L, I)
    else:
        cache["wpa"] = None
        wpa_loss = xp.zeros((), dtype=dtype)
        losses["wpa_distance"] = None
    cache.update(sign=sign, n_itm=n_itm, wpa_weight=wpa_weight)

    total = itm_loss + mlm_loss + wpa_loss
    losses.update(loss=total, itm=float(itm_loss), mlm=float(mlm_loss), wpa=float(wpa_loss))
    return losses, cache


@pool_only()
def pretrain_backward(model, cache, dloss=1.0):
    """Fills ``model.grads`` with d loss / d params for the cache of ``pretrain_forward``."""
    xp = model.backend.xp
    out = cache["out"]
    dtype = out["pooled"].dtype
    g = {}
    (dlogits,) = ops.cross_entropy_backward(xp.asarray(dloss, dtype=dtype), cache["itm_ce"])
    dpooled = itm_backward(dlogits, cache["itm"], g)  # (B, D)
    dtext = xp.zeros_like(out["text_feats"])  # (B, L, D)
    dimage = None
    if cache["mlm"] is not None:
        (dml,) = ops.cross_entropy_backward(xp.asarray(dloss, dtype=dtype), cache["mlm_ce"])
        dfeats = mlm_backward(dml, cache["mlm"], g)  # (M, D)
        rows, cols = cache["mlm_index"]
        dtext[rows, cols] += dfeats  # each (row, position) appears once
    if cache["wpa"] is not None:
        rows = cache["wpa_rows"]
        ddist = (dloss * cache["wpa_weight"] / cache["n_itm"]) * cache["sign"][rows]  # (B_itm,)
        dt, di = wpa_backward(ddist.astype(dtype), cache["wpa"])
        dtext[rows] += dt  # rows are distinct
        dimage = xp.zeros_like(out["image_feats"])  # (B, I, D)
        dimage[rows] = di
    model.backward(dict(text_feats=dtext, image_feats=dimage, pooled=dpooled), input_grad=False)
    # the heads' parameters (model.backward left them at zero), and a tied decoder's gradient
    # onto the word embeddings' own
    for k, v in g.items():
        model.grads[k] = model.grads[k] + v
    return model.grads
